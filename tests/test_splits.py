"""Train/validation/test splits: fraction parsing, sizes, determinism, disjointness, _index."""

from __future__ import annotations

import pytest

from peftlab.data.splits import parse_fractions, split_records
from peftlab.data.templates import builtin_templates, render
from peftlab.errors import UserError


def records(n: int) -> list[dict]:
    return [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(n)]


def sizes(splits) -> tuple[int, int, int]:
    return len(splits["train"]), len(splits["validation"]), len(splits["test"])


def test_parse_fractions():
    assert parse_fractions("0.8,0.1,0.1") == (0.8, 0.1, 0.1)
    assert parse_fractions(" 0.9 , 0.1 , 0 ") == (0.9, 0.1, 0.0)
    assert parse_fractions("1,0,0") == (1.0, 0.0, 0.0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.8,0.2", "three comma-separated"),
        ("0.8,0.1,0.1,0", "three comma-separated"),
        ("a,b,c", "three comma-separated"),
        ("", "three comma-separated"),
        ("1.2,-0.1,-0.1", "non-negative"),
        ("nan,0.5,0.5", "non-negative"),
        ("0.8,0.1,0.05", "sum to 0.95"),
        ("0.5,0.5,0.5", "sum to 1.5"),
    ],
)
def test_parse_fractions_errors(text, expected):
    with pytest.raises(UserError) as info:
        parse_fractions(text)
    message = str(info.value)
    assert "\n" not in message and expected in message and text in message


def test_sum_tolerance():
    assert parse_fractions("0.7,0.2,0.1") == (0.7, 0.2, 0.1)  # 0.7 + 0.2 + 0.1 is not exactly 1 in floats
    assert parse_fractions("0.3333333,0.3333333,0.3333334") == (0.3333333, 0.3333333, 0.3333334)
    with pytest.raises(UserError, match="sum to"):
        parse_fractions("0.33,0.33,0.33")


@pytest.mark.parametrize(
    ("n", "fractions", "expected"),
    [
        (10, (0.8, 0.1, 0.1), (8, 1, 1)),
        (100, (0.8, 0.1, 0.1), (80, 10, 10)),
        (101, (0.8, 0.1, 0.1), (81, 10, 10)),
        (7, (0.8, 0.1, 0.1), (5, 1, 1)),  # 5.6, 0.7, 0.7: the two largest remainders get the 2 left over
        (3, (0.8, 0.1, 0.1), (3, 0, 0)),
        (1, (0.8, 0.1, 0.1), (1, 0, 0)),
        (3, (0.5, 0.5, 0.0), (2, 1, 0)),  # a tie goes to the earlier split; a zero fraction stays empty
        (9, (1 / 3, 1 / 3, 1 / 3), (3, 3, 3)),
        (50, (1.0, 0.0, 0.0), (50, 0, 0)),
    ],
)
def test_sizes_use_every_record(n, fractions, expected):
    assert sizes(split_records(records(n), fractions, seed=0)) == expected


def test_disjoint_complete_and_records_kept():
    data = records(57)
    splits = split_records(data, (0.6, 0.2, 0.2), seed=3)
    indices = [r["_index"] for name in ("train", "validation", "test") for r in splits[name]]
    assert sorted(indices) == list(range(57))  # every record once
    for name, part in splits.items():
        assert [r["_index"] for r in part] == sorted(r["_index"] for r in part)  # input order within a split
        for r in part:
            assert {k: v for k, v in r.items() if k != "_index"} == data[r["_index"]]
    assert all("_index" not in r for r in data)  # the input is not modified


def test_deterministic_by_seed():
    data = records(40)
    a, b = split_records(data, seed=5), split_records(data, seed=5)
    assert a == b
    c = split_records(data, seed=6)
    assert [r["_index"] for r in a["test"]] != [r["_index"] for r in c["test"]]
    # Pinned: the split must not change between versions (random.Random(seed).shuffle is hash-seed free).
    pinned = split_records(records(10), seed=0)
    assert [r["_index"] for r in pinned["validation"]] == [9]
    assert [r["_index"] for r in pinned["test"]] == [6]


def test_empty_train_split():
    with pytest.raises(UserError, match="train split is empty"):
        split_records([], seed=0)
    with pytest.raises(UserError, match="train split is empty"):
        split_records(records(5), (0.0, 0.5, 0.5))
    with pytest.raises(UserError, match="sum to"):
        split_records(records(5), (0.5, 0.2, 0.2))


def test_phrasing_follows_the_original_index_across_seeds():
    task = builtin_templates()["dialogsum"]
    data = [{"dialogue": f"#Person1#: hello {i}", "summary": f"s{i}"} for i in range(30)]
    prompts = {}
    for split_seed in (0, 1, 2):
        for part in split_records(data, seed=split_seed).values():
            for r in part:
                prompt, _ = render(task, r, r["_index"], seed=0)
                assert prompts.setdefault(r["_index"], prompt) == prompt
    assert len(prompts) == 30
