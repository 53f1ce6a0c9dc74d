"""The HELM measures, as pure functions of scores, confidences and texts (see :mod:`peftlab.eval.holistic`).

Calibration (:func:`ece_equal_mass`, :func:`selective_accuracy`), robustness and fairness as
per-item worst cases (:func:`worst_case`), bias (:func:`representation_bias`,
:func:`stereotype_bias`), toxicity (:func:`toxic_fraction`) and efficiency (:func:`efficiency_numbers`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from peftlab.eval.holistic.words import words_pattern

# -------------------------------------------------------------------------------------- calibration


def ece_equal_mass(confidences: Sequence[float], correct: Sequence[float], bins: int = 10) -> float:
    """Expected calibration error with ``bins`` equal-mass bins: ``Σ_b |B_b|/N · |acc_b - conf_b|``."""
    n = len(confidences)
    if n == 0:
        return math.nan
    order = sorted(range(n), key=lambda i: confidences[i])
    bins = min(bins, n)
    size, extra = divmod(n, bins)
    total, start = 0.0, 0
    for b in range(bins):
        members = order[start : start + size + (1 if b < extra else 0)]
        start += len(members)
        accuracy = sum(correct[i] for i in members) / len(members)
        confidence = sum(confidences[i] for i in members) / len(members)
        total += len(members) / n * abs(accuracy - confidence)
    return total


def selective_accuracy(confidences: Sequence[float], correct: Sequence[float], coverage: float = 0.1) -> float:
    """Accuracy on the ``coverage`` fraction of items with the highest confidence (at least one item)."""
    n = len(confidences)
    if n == 0:
        return math.nan
    keep = max(1, round(coverage * n))
    order = sorted(range(n), key=lambda i: -confidences[i])[:keep]
    return sum(correct[i] for i in order) / keep


# -------------------------------------------------------------------------- robustness and fairness


def worst_case(*scores: Sequence[float | None]) -> list[float | None]:
    """Per item, the lowest score over the variants (None when an item has no per-item score):
    ``worst_case([1, 1, 0], [1, 0, 0]) == [1, 0, 0]``, robustness 1/3 where accuracy was 2/3."""
    return [None if None in values else min(values) for values in zip(*scores)]


# -------------------------------------------------------------------------------- bias and toxicity


def total_variation_from_uniform(counts: Sequence[float]) -> float | None:
    """``½ Σ_g |p_g - 1/G|`` of the normalised counts; None when there is nothing to count."""
    total = sum(counts)
    if total == 0:
        return None
    return 0.5 * sum(abs(c / total - 1 / len(counts)) for c in counts)


def _count(pattern: re.Pattern, text: str) -> int:
    return len(pattern.findall(text))


def representation_bias(texts: Sequence[str], groups: dict[str, Sequence[str]]) -> float | None:
    """Distance from uniform of how often each group's words are mentioned across ``texts``."""
    patterns = [words_pattern(words) for words in groups.values()]
    return total_variation_from_uniform([sum(_count(p, t) for t in texts) for p in patterns])


def stereotype_bias(texts: Sequence[str], groups: dict[str, Sequence[str]], targets: Sequence[str]) -> float | None:
    """Mean over target words of the distance from uniform of their co-occurrence with each group.

    Within one text, a target word mentioned ``a`` times next to ``b`` mentions of a group adds
    ``a·b`` to that pair (HELM's count); target words that meet no group word are left out.
    """
    patterns = [words_pattern(words) for words in groups.values()]
    distances = []
    for target in targets:
        target_pattern = words_pattern([target])
        counts = [0] * len(patterns)
        for text in texts:
            hits = _count(target_pattern, text)
            if hits:
                for g, p in enumerate(patterns):
                    counts[g] += hits * _count(p, text)
        distance = total_variation_from_uniform(counts)
        if distance is not None:
            distances.append(distance)
    return sum(distances) / len(distances) if distances else None


def toxic_fraction(texts: Sequence[str], terms: Sequence[str]) -> float | None:
    if not texts:
        return None
    pattern = words_pattern(terms)
    return sum(1 for t in texts if pattern.search(t)) / len(texts)


# --------------------------------------------------------------------------------------- efficiency


def efficiency_numbers(gen_tokens: int, gen_seconds: float, mc_items: int, mc_seconds: float) -> dict:
    """Generation throughput and per-token latency, and multiple-choice items scored per second (None where 0)."""
    return {
        "generated_tokens": gen_tokens,
        "generation_seconds": gen_seconds,
        "tokens_per_second": gen_tokens / gen_seconds if gen_seconds > 0 else None,
        "seconds_per_output_token": gen_seconds / gen_tokens if gen_tokens > 0 else None,
        "mc_items_per_second": mc_items / mc_seconds if mc_seconds > 0 else None,
    }
