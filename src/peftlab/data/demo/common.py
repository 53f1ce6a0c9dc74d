"""What the demo generators share: people and places, and the seeded draw of unique records."""

from __future__ import annotations

import random
from collections.abc import Callable

from peftlab.errors import UserError

# People and places of the dialogues (dialogsum) and of the reading passages (qa).
NAMES = [
    "Anna", "Ben", "Carlos", "Diana", "Emma", "Farid", "Grace", "Hiro", "Isabel", "Jack", "Kemal", "Laura",
    "Mei", "Nora", "Omar", "Priya", "Rosa", "Sam", "Tariq", "Uma", "Victor", "Wen", "Yusuf", "Zoe", "Lucas",
    "Elena", "Marco", "Hannah", "Ivan", "Julia", "Kofi", "Leila", "Mateo", "Nadia", "Oscar", "Paula", "Rahul",
    "Sofia", "Tom", "Amara",
]  # fmt: skip
CITIES = ["Lisbon", "Kyoto", "Vienna", "Edinburgh", "Seville", "Oslo", "Montreal", "Krakow", "Marrakesh", "Istanbul",
          "Dublin", "Budapest", "Porto", "Copenhagen"]  # fmt: skip


def draw_records(name: str, n: int, seed: int, draw: Callable[[random.Random, int], dict], key: str) -> list[dict]:
    """``n`` records ``draw(rng, i)``, each from ``random.Random(f"{name}-demo:{seed}:{i}:{attempt}")``.

    A draw whose ``record[key]`` was already produced is rejected and drawn again (next attempt),
    so the texts are unique and record ``i`` depends only on ``(seed, i)`` and the earlier ones.
    """
    if n < 1:
        raise UserError(f"the demo data set needs n >= 1 examples, got {n}")
    records, seen = [], set()
    for i in range(n):
        for attempt in range(1000):
            record = draw(random.Random(f"{name}-demo:{seed}:{i}:{attempt}"), i)
            if record[key] not in seen:
                break
        else:  # a generator bug: its pools are too small for n
            raise RuntimeError(f"the {name} demo generator produced no new {key} for example {i}")
        seen.add(record[key])
        records.append({"id": f"{name}_{i}", **record})
    return records


def rotation(name: str, seed: int, i: int, values: list) -> object:
    """``values[k]`` for example ``i``: each block of ``len(values)`` examples holds every value once."""
    block = random.Random(f"{name}-demo-rotation:{seed}:{i // len(values)}").sample(values, len(values))
    return block[i % len(values)]
