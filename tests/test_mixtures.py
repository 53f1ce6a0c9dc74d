"""Multi-task mixtures: task specs, mixing rates, the seeded sampler, per-task splits, training on a mixture."""

from __future__ import annotations

import collections
import json
import math

import pytest

from peftlab.config import TrainConfig
from peftlab.data.mixtures import MixtureSampler, TaskSpec, mix, mixing_rates, parse_task
from peftlab.data.pipeline import mixture_records, prepare, prepare_mixture
from peftlab.errors import UserError
from peftlab.training.loop import train

SIZES = {"big": 6000, "mid": 1500, "small": 300}
DEMO_TASKS = ["summarize=demo:dialogsum", "rating:review_rating=demo:reviews", "code=demo:python", "qa=demo:qa"]


def one_line(info) -> str:
    message = str(info.value)
    assert message and "\n" not in message
    return message


def test_parse_task():
    assert parse_task("summarize=demo:dialogsum") == TaskSpec("summarize", "demo:dialogsum", None)
    assert parse_task("rating:review_rating=demo:reviews") == TaskSpec("rating", "demo:reviews", "review_rating")
    assert parse_task("x:my/t.yaml=hf:org/name:config@test") == TaskSpec("x", "hf:org/name:config@test", "my/t.yaml")
    assert parse_task("odd=data/a=b.jsonl") == TaskSpec("odd", "data/a=b.jsonl", None)  # the first '=' splits
    for bad, expected in [("demo:reviews", "no data source"), ("x=", "no data source"), ("a b=f.jsonl", "task name"),
                          ("=f.jsonl", "task name"), ("x:=f.jsonl", "empty template")]:  # fmt: skip
        with pytest.raises(UserError) as info:
            parse_task(bad)
        assert expected in one_line(info) and "NAME[:TEMPLATE]=SOURCE" in one_line(info)


def test_rates_by_formula():
    total = sum(SIZES.values())
    assert mixing_rates(SIZES) == pytest.approx({k: n / total for k, n in SIZES.items()})
    capped = {"big": 2000, "mid": 1500, "small": 300}
    assert mixing_rates(SIZES, cap=2000) == pytest.approx({k: n / 3800 for k, n in capped.items()})
    weights = {k: n ** (1 / 3) for k, n in SIZES.items()}
    assert mixing_rates(SIZES, "temperature", temperature=3) == pytest.approx(
        {k: w / sum(weights.values()) for k, w in weights.items()})
    weights = {k: n ** 0.5 for k, n in capped.items()}  # the cap applies before the temperature (T5)
    assert mixing_rates(SIZES, "temperature", cap=2000, temperature=2) == pytest.approx(
        {k: w / sum(weights.values()) for k, w in weights.items()})
    assert mixing_rates(SIZES, "temperature", temperature=1) == pytest.approx(mixing_rates(SIZES))
    assert mixing_rates(SIZES, "equal") == pytest.approx({k: 1 / 3 for k in SIZES})


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"strategy": "mix"}, "unknown mixing strategy 'mix'"),
        ({"cap": 0}, "cap must be a positive"),
        ({"strategy": "temperature", "temperature": 0}, "temperature must be > 0"),
        ({"temperature": 2.0}, "only applies to the temperature strategy"),
        ({"sizes": {}}, "at least one task"),
        ({"sizes": {"a": 3, "b": 0}}, "task(s) b have no training examples"),
    ],
)
def test_rate_errors(kwargs, expected):
    sizes = kwargs.pop("sizes", SIZES)
    with pytest.raises(UserError) as info:
        mixing_rates(sizes, **kwargs)
    assert expected in one_line(info)


@pytest.mark.parametrize(
    "options",
    [{"strategy": "proportional"}, {"strategy": "proportional", "cap": 1000},
     {"strategy": "temperature", "temperature": 2.0}, {"strategy": "equal"}],  # fmt: skip
)
def test_realised_proportions_within_two_percent_over_10000_draws(options):
    tasks = {name: range(n) for name, n in SIZES.items()}
    mixture = mix(tasks, size=10_000, seed=3, **options)
    target = mixing_rates(SIZES, **options)
    assert mixture.target == target and len(mixture.examples) == 10_000 == sum(mixture.counts.values())
    assert mixture.counts == dict(collections.Counter(mixture.tasks))
    for name in SIZES:
        assert abs(mixture.realised[name] - target[name]) < 0.02, (name, mixture.realised, target)
    log = mixture.log_dict()
    assert log["size"] == 10_000 and log["tasks"]["small"]["target"] == target["small"]


def test_cap_bounds_a_huge_tasks_share():
    tasks = {"huge": range(100_000), "a": range(500), "b": range(500)}
    capped = mix(tasks, size=10_000, cap=1000, seed=0)
    assert capped.target["huge"] == pytest.approx(0.5)  # min(100000, 1000) / (1000 + 500 + 500)
    assert abs(capped.realised["huge"] - 0.5) < 0.02 and abs(capped.realised["a"] - 0.25) < 0.02
    uncapped = mix(tasks, size=10_000, seed=0)
    assert uncapped.realised["huge"] > 0.97
    assert len(mix(tasks, cap=1000).examples) == 2000  # default size: one capped pass


def test_sampler_is_seeded_and_uses_every_example_once_per_pass():
    tasks = {"a": list(range(10)), "b": list(range(100, 137))}
    rates = {"a": 0.3, "b": 0.7}
    draws = [d for d, _ in zip(MixtureSampler(tasks, rates, seed=5), range(400))]
    assert draws == [d for d, _ in zip(MixtureSampler(tasks, rates, seed=5), range(400))]
    assert draws != [d for d, _ in zip(MixtureSampler(tasks, rates, seed=6), range(400))]
    for name, examples in tasks.items():
        mine = [x for t, x in draws if t == name]
        n = len(examples)
        for start in range(0, len(mine) - n + 1, n):  # each full pass is a permutation
            assert sorted(mine[start : start + n]) == examples
        assert mine[:n] != examples or n == 1  # shuffled, not in file order


def test_per_task_splits_are_disjoint_and_only_training_examples_are_mixed():
    data = prepare_mixture(DEMO_TASKS, size=2000, cap=300, seed=1)
    assert list(data.tasks) == ["summarize", "rating", "code", "qa"]
    assert data.tasks["rating"].task.task == "review_rating" and data.tasks["code"].task.task == "python"
    for name, prepared in data.tasks.items():
        index = {split: {ex.index for ex in rows} for split, rows in prepared.splits.items()}
        assert not index["train"] & index["validation"] and not index["train"] & index["test"]
        assert not index["validation"] & index["test"]
        assert len(index["train"] | index["validation"] | index["test"]) == 400
        # each task split on its own, exactly as a single-task run with the same settings
        alone = prepare({"summarize": "demo:dialogsum", "rating": "demo:reviews", "code": "demo:python",
                         "qa": "demo:qa"}[name], prepared.task.task, "0.8,0.1,0.1", 0)  # fmt: skip
        assert [(e.index, e.prompt) for e in alone.splits["test"]] == [(e.index, e.prompt) for e in prepared.splits["test"]]
        mixed = {ex.index for ex, task in zip(data.train, data.mixture.tasks) if task == name}
        assert mixed <= index["train"]
    assert data.split("validation")["qa"] is data.tasks["qa"].splits["validation"]
    for name in data.tasks:
        assert abs(data.mixture.realised[name] - 0.25) < 0.04  # 4 tasks of 320 training examples, cap 300


def test_duplicate_task_names_are_refused():
    with pytest.raises(UserError) as info:
        prepare_mixture(["a=demo:qa", "a=demo:python"])
    assert "a given more than once" in one_line(info)
    with pytest.raises(UserError, match="no tasks"):
        prepare_mixture([])


def test_a_mixture_trains_with_the_unchanged_loop(tiny_llama_dir, tmp_path):
    data = prepare_mixture(["rating:review_rating=demo:reviews", "code=demo:python"], size=24, seed=0)
    records = mixture_records(data.mixture)
    assert [r["task"] for r in records] == data.mixture.tasks
    assert all((r["prompt"], r["completion"]) == (e.prompt, e.completion) for r, e in zip(records, data.train))
    path = tmp_path / "mixture.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = train(TrainConfig(model=str(tiny_llama_dir), data=str(path), template="prompt_completion",
                               split_fractions="1,0,0", out=str(tmp_path / "run"), max_steps=2, batch_size=4,
                               lr=1e-3, device="cpu"))  # fmt: skip
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["data"]["train"] == 24 and result.steps == 2
    losses = [r["loss"] for r in map(json.loads, (result.run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
