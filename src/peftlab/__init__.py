"""peftlab: instruction fine-tuning and parameter-efficient fine-tuning (PEFT) of LLMs.

The Python API mirrors the CLI: ``peftlab.train``, ``peftlab.evaluate``, ``peftlab.generate``,
``peftlab.score_files`` and ``peftlab.demo`` take the same options as ``peftlab train|eval|
generate|score|demo`` (as keyword arguments or a typed config).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Resolved on first use, so `import peftlab.data` (or the CLI's --help) does not pay for torch.
_API = {
    "train": "peftlab.api", "evaluate": "peftlab.api", "generate": "peftlab.api", "score_files": "peftlab.api",
    "demo": "peftlab.api", "merge": "peftlab.api", "harness": "peftlab.api", "holistic": "peftlab.api", "compare": "peftlab.api", "sweep": "peftlab.api", "report": "peftlab.api",
    "export": "peftlab.api", "forgetting": "peftlab.api", "merge_adapters": "peftlab.api",
    "CompareConfig": "peftlab.config", "SweepConfig": "peftlab.config", "MergeConfig": "peftlab.config", "TrainConfig": "peftlab.config", "EvalConfig": "peftlab.config",
    "GenerateConfig": "peftlab.config", "ScoreConfig": "peftlab.config", "DemoConfig": "peftlab.config", "ExportConfig": "peftlab.config",
    "MergeAdaptersConfig": "peftlab.config",
    "UserError": "peftlab.errors",
}
__all__ = list(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'peftlab' has no attribute {name!r}")
    return getattr(importlib.import_module(_API[name]), name)
