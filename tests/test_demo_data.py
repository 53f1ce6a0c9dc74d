"""The generated DialogSum-style demo data: schema, determinism, variety, bounds, summaries grounded in dialogues."""

from __future__ import annotations

import collections
import re

import pytest

from peftlab.data.demo import dialogsum_demo
from peftlab.data.templates import resolve_templates
from peftlab.errors import UserError

DAY = r"(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday)"
TIME = r"\d{1,2}(?::\d\d)? [ap]m"


@pytest.fixture(scope="module")
def data() -> list[dict]:
    return dialogsum_demo()


def test_schema_and_format(data):
    assert len(data) == 400
    assert [r["id"] for r in data] == [f"demo_{i}" for i in range(400)]
    for r in data:
        assert set(r) == {"id", "dialogue", "summary", "topic"}
        lines = r["dialogue"].split("\n")
        for k, line in enumerate(lines):
            assert line.startswith(f"#Person{1 + k % 2}#: ") and len(line) > len("#Person1#: ")
    assert resolve_templates(None, data).task == "dialogsum"


def test_deterministic_by_seed_and_prefix_stable(data):
    assert dialogsum_demo(400, seed=0) == data
    assert dialogsum_demo(60, seed=0) == data[:60]  # example i depends only on (seed, i)
    other = dialogsum_demo(400, seed=1)
    shared = {r["dialogue"] for r in data} & {r["dialogue"] for r in other}
    assert len(shared) < 20, len(shared)


def test_no_duplicate_dialogues_and_many_scenarios(data):
    assert len({r["dialogue"] for r in data}) == len(data)
    topics = collections.Counter(r["topic"] for r in data)
    assert len(topics) >= 10
    assert max(topics.values()) - min(topics.values()) <= 1  # families take turns
    assert len({r["summary"] for r in data}) > 0.95 * len(data)


def test_lengths_within_bounds(data):
    for r in data:
        turns = r["dialogue"].split("\n")
        assert 4 <= len(turns) <= 8, r
        assert 50 <= len(r["dialogue"].split()) <= 110, r
        assert 12 <= len(r["summary"].split()) <= 35, r
    lengths = [len(r["dialogue"].split()) for r in data]
    assert max(lengths) - min(lengths) > 30  # not one fixed shape


def _words(text: str) -> list[str]:
    return re.findall(r"[#\w]+", text)


def test_summary_facts_come_from_the_dialogue(data):
    """Every name, day, place (a capitalised word not opening a sentence) and number of a summary is in its dialogue."""
    for r in data:
        dialogue_words = set(_words(r["dialogue"]))
        for sentence in re.split(r"(?<=[.!?;])\s+", r["summary"]):
            for word in _words(sentence)[1:]:
                if word[0].isupper():
                    assert word in dialogue_words, (word, r)
        numbers = re.findall(r"\d+(?:[,:]\d+)*", r["summary"])
        assert set(numbers) <= set(re.findall(r"\d+(?:[,:]\d+)*", r["dialogue"])), r
        # and the summary is specific: it names at least one such fact
        assert re.search(r"\b[A-Z][a-z]+|\d", r["summary"].replace("#Person", "")), r


def test_summary_keeps_the_final_decision_after_a_change_of_plan(data):
    changed = 0
    for r in data:
        if r["topic"] == "reschedule a meeting":
            slots = re.findall(f"{DAY} at {TIME}", r["dialogue"])
            original, final = slots[0], slots[-1]
            assert final in r["summary"] and original not in r["summary"], r
            changed += len(set(slots)) > 2  # a second proposal was turned down too
        if r["topic"] == "book a table" and "full" in r["dialogue"]:
            times = re.findall(TIME, r["dialogue"])
            assert times[-1] in r["summary"] and times[-1] != times[0], r
            assert re.search(f"{DAY}", r["summary"]), r
    assert changed > 0


def test_small_talk_is_not_summarised(data):
    with_small_talk = [r for r in data if "How was your weekend?" in r["dialogue"]]
    assert with_small_talk
    for r in with_small_talk:
        assert "weekend" not in r["summary"] and "finished" not in r["summary"], r


def test_bad_size():
    with pytest.raises(UserError, match="n >= 1"):
        dialogsum_demo(0)
