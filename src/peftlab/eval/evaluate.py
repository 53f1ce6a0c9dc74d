"""``peftlab eval``: generate on a held-out split and score it.

Writes ``predictions.jsonl`` (one line per example: index, prompt, reference, prediction and its
per-example scores) and ``metrics.json`` (ROUGE-1/2/L/Lsum means, corpus BLEU with its sacrebleu
signature, the course notes' sentence BLEU, optional bootstrap intervals, generation speed).
Both files are written to a temporary name and renamed, so an interrupted evaluation never
leaves a half-written file, and existing results are only replaced with ``--overwrite``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from peftlab.config import EvalConfig, to_dict
from peftlab.data.encode import uses_chat_template
from peftlab.data.pipeline import Example, prepare
from peftlab.errors import UserError
from peftlab.eval.generate import generate
from peftlab.eval.score import score
from peftlab.models import LoadedModel, load_model
from peftlab.progress import ProgressFactory, silent

OUTPUT_FILES = ("predictions.jsonl", "metrics.json")


@dataclass
class EvalResult:
    metrics: dict
    predictions_file: Path
    metrics_file: Path
    predictions: list[str]


def load_for_inference(model: str, adapter: str | None, dtype: str, device: str, trust_pickle: bool = False,
                       progress: ProgressFactory = silent) -> LoadedModel:
    """The base model, with a PEFT adapter applied when one is given."""
    loaded = load_model(model, dtype=dtype, device=device, progress=progress)
    if adapter:
        from peftlab.peft import load_adapter

        loaded.model = load_adapter(loaded.model, adapter, trust_pickle=trust_pickle)
        loaded.model.eval()
    return loaded


def select_examples(config: EvalConfig) -> list[Example]:
    data = prepare(config.data, config.template, config.split_fractions, config.split_seed)
    if config.split == "all":
        examples = sorted((ex for rows in data.splits.values() for ex in rows), key=lambda ex: ex.index)
    else:
        examples = data.splits[config.split]
    examples = examples[: config.limit]
    if not examples:
        raise UserError(f"the {config.split} split of {config.data} is empty; change --split or --split-fractions")
    return examples


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def evaluate(config: EvalConfig, progress: ProgressFactory = silent, log: Callable[[str], None] = lambda _: None,
             loaded: LoadedModel | None = None) -> EvalResult:
    """Generate for every example of the split and score against its reference.

    ``loaded`` lets a caller that already holds the model (the demo) skip loading it again.
    """
    out = Path(config.out)
    existing = [name for name in OUTPUT_FILES if (out / name).exists()]
    if existing and not config.overwrite:
        raise UserError(f"{out} already holds {', '.join(existing)}; pass --overwrite to replace them or choose another --out")
    examples = select_examples(config)
    if loaded is None:
        loaded = load_for_inference(config.model, config.adapter, config.dtype, config.device, config.trust_pickle, progress)
    chat = uses_chat_template(loaded.tokenizer, config.chat_template)
    generation = generate(
        loaded.model, loaded.tokenizer, [ex.prompt for ex in examples], is_seq2seq=loaded.is_seq2seq, chat=chat,
        max_new_tokens=config.max_new_tokens, max_length=config.max_length, batch_size=config.batch_size, progress=progress,
    )
    references = [ex.completion for ex in examples]
    report = score(generation.texts, references, use_stemmer=config.use_stemmer, bootstrap=config.bootstrap)

    metrics = {
        **report.aggregate,
        "bleu_signature": report.bleu_signature,
        "intervals": {k: list(v) for k, v in report.intervals.items()},
        "num_examples": len(examples),
        "use_stemmer": config.use_stemmer,
        "split": config.split,
        "model": config.model,
        "adapter": config.adapter,
        "chat_template": chat,
        "generation": {"new_tokens": generation.new_tokens, "seconds": generation.seconds,
                       "tokens_per_second": generation.tokens_per_second},
        "config": to_dict(config),
    }
    lines = [
        json.dumps({"index": ex.index, "prompt": ex.prompt, "reference": ref, "prediction": pred, "scores": scores})
        for ex, ref, pred, scores in zip(examples, references, generation.texts, report.per_example)
    ]
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "predictions.jsonl", "\n".join(lines) + "\n")
    write_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return EvalResult(metrics, out / "predictions.jsonl", out / "metrics.json", generation.texts)
