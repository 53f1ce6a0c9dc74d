"""Score any system's outputs against references: ROUGE-1/2/L/Lsum, corpus BLEU and sentence BLEU.

    report = score(read_texts("predictions.jsonl"), read_texts("references.jsonl"), bootstrap=1000)
    report.aggregate["rougeL"], report.intervals["rougeL"]

Each aggregate ROUGE number is the mean F1 over examples (as HF ``evaluate`` and rouge-score's
aggregator report it). With ``bootstrap=B`` its percentile interval comes from B resamples of
the examples with replacement: the (1-c)/2 and (1+c)/2 quantiles of the B resampled means.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from peftlab.errors import UserError
from peftlab.eval.bleu import corpus_bleu, sentence_bleu
from peftlab.eval.rouge import ROUGE_TYPES, rouge
from peftlab.progress import ProgressFactory, silent


@dataclass
class ScoreReport:
    aggregate: dict[str, float]
    """Mean F1 of each ROUGE type, ``bleu`` (sacrebleu corpus BLEU, 0-1) and ``sentence_bleu`` (mean)."""
    bleu_signature: str
    """sacrebleu's signature of the corpus BLEU settings."""
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Bootstrap confidence interval (low, high) of each aggregate ROUGE mean; empty without bootstrap."""
    per_example: list[dict] = field(default_factory=list)
    """Per example: ``{rouge_type: {"precision", "recall", "fmeasure"}}`` plus ``bleu`` (sentence BLEU)."""
    num_examples: int = 0
    use_stemmer: bool = False


def score(
    predictions: list[str],
    references: list[str],
    use_stemmer: bool = False,
    bootstrap: int = 0,
    confidence: float = 0.95,
    seed: int = 0,
    progress: ProgressFactory = silent,
) -> ScoreReport:
    """Score ``predictions[i]`` against ``references[i]``; ``bootstrap`` resamples (0: no intervals)."""
    if len(predictions) != len(references):
        raise UserError(
            f"{len(predictions)} predictions but {len(references)} references: give one reference per prediction"
        )
    if not predictions:
        raise UserError("no examples to score: give at least one prediction and its reference")
    if bootstrap < 0:
        raise UserError(f"bootstrap must be 0 (no intervals) or a number of resamples, got {bootstrap}")
    if not 0 < confidence < 1:
        raise UserError(f"confidence must lie strictly between 0 and 1 (e.g. 0.95), got {confidence}")

    per_example = []
    bar = progress("scoring", len(predictions), "example")
    for prediction, reference in zip(predictions, references):
        scores = rouge(prediction, reference, use_stemmer=use_stemmer)
        row: dict = {
            t: {"precision": s.precision, "recall": s.recall, "fmeasure": s.fmeasure} for t, s in scores.items()
        }
        row["bleu"] = sentence_bleu(prediction, reference)
        per_example.append(row)
        bar.update(1)
    bar.close()

    n = len(per_example)
    fmeasures = np.array([[row[t]["fmeasure"] for t in ROUGE_TYPES] for row in per_example])  # (n, types)
    aggregate = {t: sum(row[t]["fmeasure"] for row in per_example) / n for t in ROUGE_TYPES}
    aggregate["bleu"], signature = corpus_bleu(predictions, references)
    aggregate["sentence_bleu"] = sum(row["bleu"] for row in per_example) / n

    intervals = {}
    if bootstrap:
        rng = np.random.default_rng(seed)
        means = np.empty((bootstrap, len(ROUGE_TYPES)))  # (B, types)
        for b in range(bootstrap):
            means[b] = fmeasures[rng.integers(0, n, size=n)].mean(axis=0)
        tail = 100 * (1 - confidence) / 2
        low, high = np.percentile(means, [tail, 100 - tail], axis=0)  # (types,) each
        intervals = {t: (float(lo), float(hi)) for t, lo, hi in zip(ROUGE_TYPES, low, high)}

    return ScoreReport(aggregate, signature, intervals, per_example, n, use_stemmer)


def read_texts(path, fields: tuple[str, ...] = ("text",)) -> list[str]:
    """One text per example: ``.jsonl`` lines are JSON strings or objects with one of ``fields`` (the first
    present; blank lines skipped); any other file is plain text, one example per line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"text file not found: {path} (give a .jsonl or a .txt file, one example per line)")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}): save it as UTF-8") from None
    if path.suffix != ".jsonl":
        lines = content.split("\n")
        return lines[:-1] if lines[-1] == "" else lines  # a final newline ends the last line
    texts = []
    for number, line in enumerate(content.split("\n"), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path} line {number} is not valid JSON ({err.msg}): fix or remove that line") from None
        wanted = " or ".join(f'"{name}"' for name in fields)
        if isinstance(item, dict):
            present = [name for name in fields if name in item]
            if not present:
                raise UserError(f"{path} line {number} is an object without a {wanted} field: add one")
            item = item[present[0]]
        if not isinstance(item, str):
            raise UserError(
                f"{path} line {number} holds {type(item).__name__}, not a string or an object with a {wanted} string"
            )
        texts.append(item)
    return texts
