"""The data pass, in one place: source -> records -> templates -> splits -> examples.

    records = load_records(source)                       # sources.py: a file, a folder, demo:NAME, hf:NAME
    task = resolve_templates(template, records)          # templates.py: by name or file, or detected
    splits = split_records(records, fractions, seed)     # splits.py: seeded train / validation / test
    prompt, completion = render(task, row, index, seed)  # templates.py: each example, phrasing by (seed, index)

:func:`prepare` is that pass for one data source. ``train``, ``eval`` and ``forgetting`` share
it, so a test split evaluated later is exactly the one held out in training.

:func:`prepare_mixture` is a multi-task mixture (``--task NAME[:TEMPLATE]=SOURCE``, repeated): the
same pass for each task, then the mixing of the training splits (:mod:`peftlab.data.mixtures`).
Each task keeps its own validation and test examples, so per-task evaluation sees exactly what
training held out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from peftlab.data.mixtures import Mixture, TaskSpec, mix, parse_tasks
from peftlab.data.sources import load_records
from peftlab.data.splits import parse_fractions, split_records
from peftlab.data.templates import TaskTemplates, render, resolve_templates
from peftlab.errors import UserError

# ------------------------------------------------------------------------------------------ one task


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


def prepare(source: str, template: str | None, fractions: str, seed: int, require_train: bool = True) -> PreparedData:
    """One source through the pass; ``seed`` draws the split and each example's phrasing.

    ``require_train=False``: an empty train split is fine (evaluation without few-shot examples).
    Data whose every completion renders empty is refused: nothing to learn or score."""
    records = load_records(source)
    task = resolve_templates(template, records)
    splits = split_records(records, parse_fractions(fractions), seed=seed, require_train=require_train)
    data = PreparedData(task, {name: [_example(task, row, seed) for row in rows] for name, rows in splits.items()})
    if all(not ex.completion.strip() for rows in data.splits.values() for ex in rows):
        raise UserError(f"every record of {source} has an empty completion (the target of template '{task.task}'); "
                        "fill in the target field, or choose another --template")
    return data


def _example(task: TaskTemplates, row: dict, seed: int) -> Example:
    """``row`` rendered; its position in the source (``row["_index"]``, kept by the split) picks the phrasing."""
    index = row["_index"]
    return Example(*render(task, row, index, seed), index, row)


# ----------------------------------------------------------------------------------------- a mixture


@dataclass
class MultiTaskData:
    """Every task prepared on its own, and the mixture of their training splits."""

    tasks: dict[str, PreparedData]
    """Per task: its templates and its train / validation / test examples."""
    mixture: Mixture[Example]

    @property
    def train(self) -> list[Example]:
        """The mixed training list: what the training loop takes as its training split."""
        return self.mixture.examples

    def split(self, name: str) -> dict[str, list[Example]]:
        """``split("validation")`` -> {task: that task's validation examples}."""
        return {task: data.splits[name] for task, data in self.tasks.items()}


def prepare_mixture(
    specs: Sequence[str | TaskSpec],
    fractions: str = "0.8,0.1,0.1",
    split_seed: int = 0,
    strategy: str = "proportional",
    cap: int | None = None,
    temperature: float = 1.0,
    size: int | None = None,
    seed: int = 0,
    limit: int | None = None,
) -> MultiTaskData:
    """:func:`prepare` for each task (the same fractions and split seed for all), then :func:`mix`
    of their training splits (each cut to ``limit`` first), drawn with ``seed``."""
    tasks = {spec.name: prepare(spec.source, spec.template, fractions, split_seed) for spec in parse_tasks(specs)}
    train = {name: data.splits["train"][:limit] for name, data in tasks.items()}
    return MultiTaskData(tasks, mix(train, size, strategy, cap, temperature, seed))


def mixture_records(mixture: Mixture[Example]) -> list[dict]:
    """The mixed list as ``{"prompt", "completion", "task"}`` records: written to a .jsonl file, it trains
    with the unchanged loop as ``--data FILE --template prompt_completion --split-fractions 1,0,0``."""
    return [{"prompt": ex.prompt, "completion": ex.completion, "task": task}
            for ex, task in zip(mixture.examples, mixture.tasks)]  # fmt: skip
