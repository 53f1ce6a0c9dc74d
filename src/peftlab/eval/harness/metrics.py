"""Benchmark metrics: per-item scores and their aggregates (the harness's definitions).

Multiple choice, from the loglikelihoods ``ll_i`` of the choices ``c_i``::

    acc      = [argmax_i ll_i            is gold]
    acc_norm = [argmax_i ll_i / len(c_i) is gold]        len in characters, as the harness does
    multiple_choice_grade = score of the chosen choice    (BIG-bench; = acc for one-hot scores)

Generation: ``exact_match`` (the harness's: optional regexes removed, case / punctuation /
digits ignored, then string equality; ``strip`` and ``first_line`` are peftlab options), ``exact_str_match``
(BIG-bench: equality after stripping), ``token_f1`` (SQuAD: bag-of-words F1 after lower-casing and
removing punctuation and articles; the best over references).

Corpus level, from all items' (gold, prediction) pairs: ``f1`` (binary F1 of class 1 when the
labels are 0/1, else macro F1), ``mcc`` (Matthews correlation, multi-class form), ``pearson`` and
``spearman`` (correlation of the first number in each generation with the numeric target;
pairs without a number are left out). Means carry the
standard error ``sqrt(Σ(x - mean)² / (n - 1)) / sqrt(n)``.
"""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Sequence

from peftlab.errors import UserError

MC_METRICS = ("acc", "acc_norm", "multiple_choice_grade", "f1", "mcc")
GEN_METRICS = ("exact_match", "exact_str_match", "token_f1", "pearson", "spearman")
CORPUS_METRICS = ("f1", "mcc", "pearson", "spearman")
_EXACT_MATCH_OPTIONS = ("regexes_to_ignore", "ignore_case", "ignore_punctuation", "ignore_numbers", "strip", "first_line")
_BOOKKEEPING = ("metric", "name", "aggregation", "higher_is_better", "hf_evaluate")


def check_metric(entry: dict, output_type: str, where: str) -> tuple[str, str, dict]:
    """``(reported name, metric, options)`` of one ``metric_list`` entry; unknown names fail here."""
    metric = str(entry["metric"])
    allowed = MC_METRICS if output_type == "multiple_choice" else GEN_METRICS
    if metric not in allowed:
        raise UserError(f"{where}: metric '{metric}' is not available for {output_type} tasks; use one of {', '.join(allowed)}")
    options = {k: v for k, v in entry.items() if k not in _BOOKKEEPING}
    if metric == "exact_match":
        unknown = [k for k in options if k not in _EXACT_MATCH_OPTIONS]
        if unknown:
            raise UserError(f"{where}: exact_match has no option {', '.join(unknown)}; options: {', '.join(_EXACT_MATCH_OPTIONS)}")
    elif options:
        raise UserError(f"{where}: metric '{metric}' takes no options (got {', '.join(options)})")
    return str(entry.get("name", metric)), metric, options


# ------------------------------------------------------------------------------- multiple choice


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first on ties (numpy's argmax)."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def softmax(values: Sequence[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def multiple_choice_item(lls: Sequence[float], choices: Sequence[str], gold: Sequence[int]) -> dict:
    """Prediction and scores of one multiple-choice item (``gold``: acceptable choice indices)."""
    pred = argmax(lls)
    pred_norm = argmax([ll / len(c) if len(c) else ll for ll, c in zip(lls, choices)])
    probs = softmax(lls)
    return {
        "pred": pred,
        "pred_norm": pred_norm,
        "acc": float(pred in gold),
        "acc_norm": float(pred_norm in gold),
        "confidence": probs[pred],
        "probs": probs,
    }


# ------------------------------------------------------------------------------------ generation


def exact_match(prediction: str, reference: str, regexes_to_ignore: Sequence[str] | None = None,
                ignore_case: bool = False, ignore_punctuation: bool = False, ignore_numbers: bool = False,
                strip: bool = False, first_line: bool = False) -> float:
    """The harness's ``exact_match`` of one pair (HF evaluate's rules).

    peftlab options, applied first: ``strip`` trims whitespace off both sides; ``first_line``
    keeps the prediction's first non-empty line (stripped), for models that keep talking.
    """
    pred, ref = prediction, reference
    if first_line:
        pred = next((line.strip() for line in pred.splitlines() if line.strip()), "")
    if strip or first_line:
        pred, ref = pred.strip(), ref.strip()
    for pattern in regexes_to_ignore or []:
        pred, ref = re.sub(pattern, "", pred), re.sub(pattern, "", ref)
    if ignore_case:
        pred, ref = pred.lower(), ref.lower()
    if ignore_punctuation:
        table = str.maketrans("", "", string.punctuation)
        pred, ref = pred.translate(table), ref.translate(table)
    if ignore_numbers:
        table = str.maketrans("", "", string.digits)
        pred, ref = pred.translate(table), ref.translate(table)
    return float(pred == ref)


def squad_tokens(text: str) -> list[str]:
    """SQuAD v1.1's normalised answer tokens: lower case, no punctuation, no articles."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return text.split()


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's bag-of-words F1 between a prediction and one reference."""
    pred, ref = squad_tokens(prediction), squad_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def generation_item(prediction: str, references: Sequence[str], metric: str, options: dict) -> float | None:
    """Per-item score of a generation metric (best over references); None for corpus metrics."""
    if metric == "exact_match":
        return max(exact_match(prediction, r, **options) for r in references)
    if metric == "exact_str_match":
        return max(float(prediction.strip() == r.strip()) for r in references)
    if metric == "token_f1":
        return max(token_f1(prediction, r) for r in references)
    return None


def to_number(text: str) -> float:
    """The first number in ``text`` (NaN when there is none): how a generated score is read."""
    match = re.search(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?", text)
    return float(match.group()) if match else math.nan


# ------------------------------------------------------------------------------------ aggregates


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def f1_score(golds: Sequence[int], preds: Sequence[int]) -> float:
    """Binary F1 of class 1 when every label is 0 or 1 (scikit-learn's default), else macro F1."""
    labels = sorted(set(golds) | set(preds))
    if set(labels) <= {0, 1}:
        return _f1_of(1, golds, preds)
    return sum(_f1_of(c, golds, preds) for c in labels) / len(labels)


def _f1_of(label: int, golds: Sequence[int], preds: Sequence[int]) -> float:
    tp = sum(g == label and p == label for g, p in zip(golds, preds))
    fp = sum(g != label and p == label for g, p in zip(golds, preds))
    fn = sum(g == label and p != label for g, p in zip(golds, preds))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def matthews(golds: Sequence[int], preds: Sequence[int]) -> float:
    """Matthews correlation, multi-class form (Gorodkin 2004); 0 when undefined."""
    labels = sorted(set(golds) | set(preds))
    n = len(golds)
    correct = sum(g == p for g, p in zip(golds, preds))
    true_counts = [sum(g == c for g in golds) for c in labels]
    pred_counts = [sum(p == c for p in preds) for c in labels]
    cov_tp = correct * n - sum(t * p for t, p in zip(true_counts, pred_counts))
    cov_pp = n * n - sum(p * p for p in pred_counts)
    cov_tt = n * n - sum(t * t for t in true_counts)
    if cov_pp == 0 or cov_tt == 0:
        return 0.0
    return cov_tp / math.sqrt(cov_pp * cov_tt)


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Pearson's r; NaN when fewer than two pairs or a constant side."""
    n = len(xs)
    if n < 2:
        return math.nan
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return math.nan
    return sxy / math.sqrt(sxx * syy)


def _ranks(values: Sequence[float]) -> list[float]:
    """Ranks from 1, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman's rho: Pearson's r of the (tie-averaged) ranks."""
    return pearson(_ranks(xs), _ranks(ys))


def corpus_metric(metric: str, golds: Sequence, preds: Sequence) -> float:
    if metric == "f1":
        return f1_score(golds, preds)
    if metric == "mcc":
        return matthews(golds, preds)
    pairs = [(float(g), float(p)) for g, p in zip(golds, preds) if not (math.isnan(float(g)) or math.isnan(float(p)))]
    if not pairs:
        return math.nan
    xs, ys = zip(*pairs)
    return pearson(xs, ys) if metric == "pearson" else spearman(xs, ys)
