"""The generated demo tasks beyond DialogSum: reviews, python, qa (schema, determinism, grounding, templates)."""

from __future__ import annotations

import ast
import collections
import re

import pytest

from peftlab.data.demo import python_demo, qa_demo, reviews_demo
from peftlab.data.sources import DEMO_SOURCES, load_records
from peftlab.data.templates import builtin_templates, render_template, resolve_templates
from peftlab.errors import UserError

GENERATORS = {"reviews": reviews_demo, "python": python_demo, "qa": qa_demo}
SCHEMAS = {
    "reviews": {"id", "product", "text", "stars", "label"},
    "python": {"id", "description", "code", "inputs", "expected"},
    "qa": {"id", "context", "question", "answer"},
}
TEXT_KEY = {"reviews": "text", "python": "description", "qa": "question"}
TEMPLATES = {"reviews": ["review_rating", "sentiment"], "python": ["python"], "qa": ["qa"]}


@pytest.fixture(scope="module")
def data() -> dict[str, list[dict]]:
    return {name: generate() for name, generate in GENERATORS.items()}


@pytest.mark.parametrize("name", GENERATORS)
def test_registered_schema_and_ids(name, data):
    records = data[name]
    assert DEMO_SOURCES[name] is GENERATORS[name] and load_records(f"demo:{name}") == records
    assert len(records) == 400 and [r["id"] for r in records] == [f"{name}_{i}" for i in range(400)]
    assert all(set(r) == SCHEMAS[name] for r in records)
    assert resolve_templates(None, records).task == TEMPLATES[name][0]  # auto-detected from the fields


@pytest.mark.parametrize("name", GENERATORS)
def test_deterministic_prefix_stable_and_seeded(name, data):
    generate = GENERATORS[name]
    assert generate(400, seed=0) == data[name]
    assert generate(37, seed=0) == data[name][:37]
    other = generate(400, seed=1)
    key = TEXT_KEY[name] if name != "qa" else "context"
    assert len({r[key] for r in other} & {r[key] for r in data[name]}) < 40
    with pytest.raises(UserError, match="n >= 1"):
        generate(0)


@pytest.mark.parametrize("name", GENERATORS)
def test_every_record_renders_through_every_template_of_its_tasks(name, data):
    tasks = builtin_templates()
    for task_name in TEMPLATES[name]:
        task = tasks[task_name]
        for record in data[name][:60]:
            for template in task.templates:
                prompt, target = render_template(task, template, record)
                assert prompt and target and target in prompt + target
                if task.answer_choices is not None:
                    assert target in task.answer_choices


def test_reviews_ratings_balanced_and_labels_follow_stars(data):
    records = data["reviews"]
    for block in range(0, 400, 5):  # every block of five holds each rating once
        assert sorted(r["stars"] for r in records[block : block + 5]) == [1, 2, 3, 4, 5]
    sentiment = {1: "negative", 2: "negative", 3: "neutral", 4: "positive", 5: "positive"}
    assert all(r["label"] == sentiment[r["stars"]] for r in records)
    assert all(r["product"] in r["text"] for r in records)
    assert len({r["text"] for r in records}) == 400
    assert len(collections.Counter(r["product"] for r in records)) == 8
    # "the only downside" marks 4 stars and "the only good thing" 2 stars, never the other ratings
    for r in records:
        assert ("The only downside" in r["text"]) == (r["stars"] == 4), r
        assert ("The only good thing" in r["text"]) == (r["stars"] == 2), r


def test_python_code_runs_and_computes_the_described_value(data):
    for r in data["python"]:
        tree = ast.parse(r["code"])
        (statement,) = tree.body
        assert isinstance(statement, ast.Assign)
        out = statement.targets[0].id
        names = {node.id for node in ast.walk(statement.value) if isinstance(node, ast.Name)}
        assert names == set(r["inputs"]), r
        assert all(re.search(rf"\b{n}\b", r["description"]) for n in names), r
        if out != "result":
            assert re.search(rf"\b{out}\.$", r["description"]), r
        scope = dict(r["inputs"])
        exec(compile(tree, "<demo>", "exec"), {"__builtins__": {}}, scope)  # noqa: S102 (our own generated code)
        assert scope[out] == r["expected"], r
        # every constant of the code is in the description, in digits or as double/triple/halve/square
        words = {"2": ("double", "halve", "half", "square"), "3": ("triple",)}
        for number in re.findall(r"(?<![\w.])\d+", r["code"]):
            assert re.search(rf"\b{number}\b", r["description"]) or any(w in r["description"].lower() for w in words.get(number, ())), r
    assert any("(" in r["code"] for r in data["python"]) and any("**" in r["code"] for r in data["python"])
    # the docstring's example, "Add 3 to x, then double it." -> result = (x + 3) * 2, in the data's own words
    assert data["python"][80] == {"id": "python_80", "description": "Add 13 to y and then double it. Call the result out.",
                                  "code": "out = (y + 13) * 2", "inputs": {"y": 27}, "expected": 80}


def test_qa_answers_are_spans_and_the_question_picks_the_person(data):
    records = data["qa"]
    for r in records:
        assert r["answer"] in r["context"], r
        asked = [name for name in re.findall(r"\b[A-Z][a-z]+\b", r["question"]) if name in r["context"]]
        assert asked, r
    questions = collections.Counter(r["question"].split(" ")[0] for r in records)
    assert set(questions) >= {"What", "Where", "Who", "How", "In"}
    assert len({(r["context"], r["question"]) for r in records}) == 400
