"""Split records into train / validation / test, deterministically.

The permutation comes from ``random.Random(seed)`` (seeded by an int, so independent of
``PYTHONHASHSEED``): the same records and seed always give the same split. Split sizes are
``n * fraction`` rounded by the largest-remainder rule, so they add up to ``n`` exactly and a
split whose fraction is 0 stays empty. Each record is a shallow copy carrying its position in
the input under ``"_index"``, which keys the per-example choice of prompt phrasing
(:func:`peftlab.data.templates.render`), so an example keeps its phrasing whatever split it is in.
"""

from __future__ import annotations

import math
import random

from peftlab.errors import UserError

SPLITS = ("train", "validation", "test")


def parse_fractions(text: str) -> tuple[float, float, float]:
    """``"0.8,0.1,0.1"`` -> ``(0.8, 0.1, 0.1)``: three non-negative numbers summing to 1."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 3:
        raise UserError(
            f"--split-fractions {text!r}: give three comma-separated fractions train,validation,test, e.g. 0.8,0.1,0.1"
        )
    return _check(values, f"--split-fractions {text!r}")


def split_records(
    records: list[dict], fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 0, require_train: bool = True
) -> dict[str, list[dict]]:
    """``{"train": [...], "validation": [...], "test": [...]}``; each split in input order.

    ``require_train=False`` allows an empty train split (evaluating a separate test file needs none)."""
    fractions = _check(list(fractions), f"split fractions {tuple(fractions)}")
    n = len(records)
    sizes = _sizes(n, fractions)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    if sizes[0] == 0 and require_train:
        raise UserError(
            f"the train split is empty: {n} records with fractions {fractions}; "
            "give more records or a larger train fraction (--split-fractions)"
        )
    splits, start = {}, 0
    for name, size in zip(SPLITS, sizes):
        chosen = sorted(order[start : start + size])
        splits[name] = [{**records[i], "_index": i} for i in chosen]
        start += size
    return splits


def _check(values: list[float], what: str) -> tuple[float, float, float]:
    if len(values) != 3 or any(not math.isfinite(v) or v < 0 for v in values):
        raise UserError(f"{what}: fractions must be three non-negative numbers, e.g. 0.8,0.1,0.1")
    total = math.fsum(values)
    if abs(total - 1.0) > 1e-6:
        raise UserError(f"{what}: fractions must sum to 1, these sum to {total:g}")
    return values[0], values[1], values[2]


def _sizes(n: int, fractions: tuple[float, float, float]) -> list[int]:
    """Largest-remainder rounding of ``n * fractions`` (ties go to the earlier split)."""
    total = math.fsum(fractions)  # 1 within 1e-6; dividing makes the exact sizes add up to n
    exact = [n * f / total for f in fractions]
    sizes = [math.floor(x) for x in exact]
    by_remainder = sorted(range(3), key=lambda i: (-(exact[i] - sizes[i]), i))
    for i in by_remainder[: n - sum(sizes)]:
        sizes[i] += 1
    return sizes
