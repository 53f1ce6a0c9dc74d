"""Multi-task instruction tuning: several tasks, each with its own splits, mixed into one training list.

    peftlab train --model smollm2-135m-instruct --out runs/multi \\
        --task summarize=demo:dialogsum --task rating:review_rating=demo:reviews --task code=demo:python \\
        --mix proportional --mix-cap 3000

A task is written ``NAME[:TEMPLATE]=SOURCE``: a name of your choice (letters, digits, ``_ - .``),
optionally the prompt template of the task (a built-in name or a YAML file; default: detected from
the fields), and any data source ``--data`` accepts (``demo:reviews``, ``hf:NAME@SPLIT``, a file).
The template sits left of ``=`` because sources hold colons themselves (``demo:qa``, ``hf:a:b``).

Each task goes through the data pass on its own (:func:`peftlab.data.pipeline.prepare_mixture`): its
template, its seeded train / validation / test split. Only the training splits are mixed, here; each
task keeps its validation and test examples, so per-task evaluation sees exactly what training held out.

Mixing rates, with n_i the training examples of task i, K the cap and T the temperature
(Raffel et al. 2020, section 3.5.2; FLAN, Wei et al. 2022 and Chung et al. 2022):

    proportional   r_i = min(n_i, K) / sum_j min(n_j, K)                   (no cap: K = infinity)
    temperature    r_i = min(n_i, K)^(1/T) / sum_j min(n_j, K)^(1/T)       (T = 1: proportional; T -> inf: equal)
    equal          r_i = 1 / k

The cap keeps one huge task from crowding out the others: beyond K examples a task gets no larger
share. The cap sets rates only; every example of a task can still be drawn.

Sampling is seeded and deterministic (``random.Random`` seeded by strings and ints, so independent
of ``PYTHONHASHSEED``): each draw picks a task with probability r_i, then the task's next example in
a seeded permutation of its training split; when a task runs out, a new permutation starts. So no
example of a task repeats before all its examples have been drawn. :func:`mix` draws a list of a
given size (default: ``sum_i min(n_i, K)``, one capped pass) that the unchanged training loop
treats as its training split, and reports the realised proportions beside the target rates.
"""

from __future__ import annotations

import bisect
import itertools
import random
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from peftlab.errors import UserError

T = TypeVar("T")

STRATEGIES = ("proportional", "temperature", "equal")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_HOW = "write --task NAME[:TEMPLATE]=SOURCE, e.g. --task rating:review_rating=demo:reviews"


@dataclass(frozen=True)
class TaskSpec:
    """One task of a mixture."""

    name: str
    source: str
    """A data source, as ``--data`` takes it."""
    template: str | None = None
    """A built-in template name or a YAML file; None: detected from the records' fields."""


def parse_task(text: str) -> TaskSpec:
    """``"NAME[:TEMPLATE]=SOURCE"`` -> :class:`TaskSpec`."""
    left, sep, source = text.partition("=")
    name, colon, template = left.partition(":")
    name, template, source = name.strip(), template.strip(), source.strip()
    if not sep or not source:
        raise UserError(f"bad --task '{text}': no data source after '='; {_HOW}")
    if not _NAME.match(name):
        raise UserError(f"bad --task '{text}': the task name '{name}' must be letters, digits, _ - or .; {_HOW}")
    if colon and not template:
        raise UserError(f"bad --task '{text}': empty template after ':'; {_HOW}")
    return TaskSpec(name, source, template or None)


def parse_tasks(specs: Sequence[str | TaskSpec]) -> list[TaskSpec]:
    """The tasks of a mixture as :class:`TaskSpec`: at least one, each name once."""
    parsed = [parse_task(s) if isinstance(s, str) else s for s in specs]
    if not parsed:
        raise UserError(f"no tasks given; {_HOW}")
    names = [spec.name for spec in parsed]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"task name(s) {', '.join(repeated)} given more than once; give each --task its own NAME")
    return parsed


def mixing_rates(
    sizes: dict[str, int], strategy: str = "proportional", cap: int | None = None, temperature: float = 1.0
) -> dict[str, float]:
    """Target share of each task in the mixture (see the module docstring); the shares sum to 1."""
    if strategy not in STRATEGIES:
        raise UserError(f"unknown mixing strategy '{strategy}'; choose one of {', '.join(STRATEGIES)}")
    if cap is not None and cap < 1:
        raise UserError(f"the mixing cap must be a positive number of examples, got {cap}")
    if not temperature > 0:
        raise UserError(f"the mixing temperature must be > 0 (1: proportional), got {temperature}")
    if temperature != 1.0 and strategy != "temperature":
        raise UserError(f"a mixing temperature ({temperature}) only applies to the temperature strategy, not {strategy}")
    if not sizes:
        raise UserError(f"a mixture needs at least one task; {_HOW}")
    empty = [name for name, n in sizes.items() if n < 1]
    if empty:
        raise UserError(f"task(s) {', '.join(empty)} have no training examples; add data or change --split-fractions")
    if strategy == "equal":
        weights = {name: 1.0 for name in sizes}
    else:
        power = 1.0 / temperature if strategy == "temperature" else 1.0
        weights = {name: float(min(n, cap) if cap else n) ** power for name, n in sizes.items()}
    total = sum(weights.values())
    return {name: w / total for name, w in weights.items()}


class MixtureSampler(Generic[T]):
    """An endless, seeded stream of ``(task, example)`` draws.

    Task: ``rng.random()`` against the cumulative rates (one ``random.Random(f"mixture:{seed}")``).
    Example: the next one in a permutation of the task's examples, seeded by
    ``(seed, task, pass)``; every example is drawn once per pass.
    """

    def __init__(self, tasks: dict[str, Sequence[T]], rates: dict[str, float], seed: int = 0):
        if set(tasks) != set(rates):
            raise ValueError(f"tasks {sorted(tasks)} and rates {sorted(rates)} differ")
        self.tasks, self.seed = tasks, seed
        self.names = list(tasks)
        self.cumulative = list(itertools.accumulate(rates[name] for name in self.names))
        self.rng = random.Random(f"mixture:{seed}")
        self.position = {name: 0 for name in self.names}
        self.passes = {name: 0 for name in self.names}
        self.order = {name: self._permutation(name, 0) for name in self.names}

    def _permutation(self, name: str, pass_: int) -> list[int]:
        order = list(range(len(self.tasks[name])))
        random.Random(f"mixture:{self.seed}:{name}:{pass_}").shuffle(order)
        return order

    def draw(self) -> tuple[str, T]:
        u = self.rng.random() * self.cumulative[-1]
        name = self.names[min(bisect.bisect_right(self.cumulative, u), len(self.names) - 1)]
        if self.position[name] == len(self.order[name]):  # the pass over this task ended: reshuffle
            self.passes[name] += 1
            self.order[name], self.position[name] = self._permutation(name, self.passes[name]), 0
        example = self.tasks[name][self.order[name][self.position[name]]]
        self.position[name] += 1
        return name, example

    def __iter__(self) -> Iterator[tuple[str, T]]:
        while True:
            yield self.draw()


@dataclass
class Mixture(Generic[T]):
    """A drawn training list and how it splits over the tasks."""

    examples: list[T]
    tasks: list[str]
    """``tasks[i]``: the task ``examples[i]`` came from."""
    sizes: dict[str, int]
    """Training examples available per task (n_i)."""
    target: dict[str, float]
    """The mixing rates r_i."""
    counts: dict[str, int]
    """Draws per task."""
    strategy: str
    cap: int | None
    temperature: float
    seed: int

    @property
    def realised(self) -> dict[str, float]:
        """Share of each task in :attr:`examples`."""
        return {name: self.counts[name] / max(len(self.examples), 1) for name in self.sizes}

    def log_dict(self) -> dict:
        """For ``run.json`` and the log: per task n_i, target rate, draws and realised share."""
        realised = self.realised
        return {
            "strategy": self.strategy, "cap": self.cap, "temperature": self.temperature, "seed": self.seed,
            "size": len(self.examples),
            "tasks": {name: {"examples": self.sizes[name], "target": self.target[name], "drawn": self.counts[name],
                             "realised": realised[name]} for name in self.sizes},
        }  # fmt: skip

    def __str__(self) -> str:
        parts = [f"{name} {self.realised[name]:.1%} (target {self.target[name]:.1%})" for name in self.sizes]
        return f"mixture of {len(self.examples)} examples ({self.strategy}): " + ", ".join(parts)


def mix(
    tasks: dict[str, Sequence[T]],
    size: int | None = None,
    strategy: str = "proportional",
    cap: int | None = None,
    temperature: float = 1.0,
    seed: int = 0,
) -> Mixture[T]:
    """The first ``size`` draws of :class:`MixtureSampler` (default size: ``sum_i min(n_i, cap)``)."""
    sizes = {name: len(examples) for name, examples in tasks.items()}
    rates = mixing_rates(sizes, strategy, cap, temperature)
    if size is None:
        size = sum(min(n, cap) if cap else n for n in sizes.values())
    if size < 1:
        raise UserError(f"the mixture size must be at least 1 example, got {size}")
    draws = list(itertools.islice(MixtureSampler(tasks, rates, seed), size))
    counts = Counter(name for name, _ in draws)
    return Mixture(
        examples=[example for _, example in draws],
        tasks=[name for name, _ in draws],
        sizes=sizes,
        target=rates,
        counts={name: counts.get(name, 0) for name in sizes},
        strategy=strategy,
        cap=cap,
        temperature=temperature,
        seed=seed,
    )
