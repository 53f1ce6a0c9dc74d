"""peftlab: instruction fine-tuning and parameter-efficient fine-tuning (PEFT) of LLMs.

The Python API mirrors the CLI: ``peftlab.train``, ``peftlab.evaluate``, ``peftlab.generate``,
``peftlab.score_files`` and ``peftlab.demo`` take the same options as ``peftlab train|eval|
generate|score|demo`` (as keyword arguments or a typed config).
"""

__version__ = "0.1.0"

from peftlab.api import demo, evaluate, generate, score_files, train  # noqa: E402
from peftlab.config import DemoConfig, EvalConfig, GenerateConfig, ScoreConfig, TrainConfig  # noqa: E402
from peftlab.errors import UserError  # noqa: E402

__all__ = ["train", "evaluate", "generate", "score_files", "demo", "TrainConfig", "EvalConfig", "GenerateConfig",
           "ScoreConfig", "DemoConfig", "UserError"]
