"""From a data source to rendered (prompt, completion) examples of each split.

``prepare(source, template, fractions, seed)`` is what ``train``, ``eval`` and ``demo`` share, so
a test split evaluated later is exactly the one held out in training.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.data.sources import load_records
from peftlab.data.splits import parse_fractions, split_records
from peftlab.data.templates import TaskTemplates, render, resolve_templates


@dataclass
class Example:
    prompt: str
    completion: str
    index: int  # position of the record in the source, stable across runs
    record: dict


@dataclass
class PreparedData:
    task: TaskTemplates
    splits: dict[str, list[Example]]  # "train", "validation", "test"

    def examples(self, split: str) -> list[Example]:
        """One split's examples, or every example in source order for ``"all"``."""
        if split == "all":
            return sorted((ex for rows in self.splits.values() for ex in rows), key=lambda ex: ex.index)
        return self.splits[split]


def prepare(source: str, template: str | None, fractions: str, seed: int) -> PreparedData:
    records = load_records(source)
    task = resolve_templates(template, records)
    splits = split_records(records, parse_fractions(fractions), seed=seed)
    rendered = {}
    for name, rows in splits.items():
        examples = []
        for row in rows:
            index = row["_index"]
            prompt, completion = render(task, row, index, seed)
            examples.append(Example(prompt, completion, index, row))
        rendered[name] = examples
    return PreparedData(task, rendered)
