"""Prompt templates: built-ins, auto-detection, YAML validation, seeded phrasing choice, strict rendering."""

from __future__ import annotations

import collections
import random

import pytest

from peftlab.data.templates import (
    Template,
    builtin_templates,
    choose,
    load_templates,
    render,
    render_with,
    resolve_templates,
)
from peftlab.errors import UserError

DIALOGUE = "#Person1#: Hi Anna, lunch on Friday?\n#Person2#: Sure, at 1 pm."
RECORD = {"dialogue": DIALOGUE, "summary": "#Person1# and Anna meet for lunch on Friday at 1 pm."}


def one_line(info) -> str:
    message = str(info.value)
    assert message and "\n" not in message
    return message


def test_builtin_files():
    tasks = builtin_templates()
    assert {"dialogsum", "prompt_completion", "instruction"} <= set(tasks)
    dialogsum = tasks["dialogsum"]
    assert dialogsum.fields == ["dialogue", "summary"] and dialogsum.metric == "rouge"
    assert dialogsum.task_type == "generation"
    assert len(dialogsum.templates) >= 6
    inputs = [t.input for t in dialogsum.templates]
    for phrase in ("Summarize the following conversation.", "Briefly summarize this dialogue.",
                   "What was going on in this conversation?"):  # fmt: skip
        assert any(phrase in text for text in inputs), phrase
    assert len({t.name for t in dialogsum.templates}) == len(dialogsum.templates)


def test_every_dialogsum_phrasing_shows_the_whole_dialogue_and_targets_the_summary():
    for template in builtin_templates()["dialogsum"].templates:
        prompt, target = render_with(template, RECORD)
        assert DIALOGUE in prompt and prompt != DIALOGUE
        assert target == RECORD["summary"]
    first = builtin_templates()["dialogsum"].templates[0]
    assert render_with(first, RECORD)[0] == "Summarize the following conversation.\n\n" + DIALOGUE


def test_prompt_completion_is_verbatim():
    task = builtin_templates()["prompt_completion"]
    record = {"prompt": "  Q: 2+2?\n", "completion": " 4\n"}  # whitespace and trailing newlines are kept
    assert render(task, record, index=3, seed=0) == ("  Q: 2+2?\n", " 4\n")


ALPACA_HEAD = "Below is an instruction that describes a task"


def test_instruction_input_block_only_when_non_empty():
    (template,) = builtin_templates()["instruction"].templates
    with_input = render_with(template, {"instruction": "Translate.", "input": "Bonjour", "output": "Hello"})
    assert with_input == (
        ALPACA_HEAD + ", paired with an input that provides further context. Write a response that "
        "appropriately completes the request.\n\n### Instruction:\nTranslate.\n\n### Input:\nBonjour\n\n### Response:",
        "Hello",
    )
    no_input = (
        ALPACA_HEAD + ". Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd 2 and 3.\n\n### Response:"
    )
    for record in ({"instruction": "Add 2 and 3.", "output": "5"},
                   {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
                   {"instruction": "Add 2 and 3.", "input": None, "output": "5"}):  # fmt: skip
        assert render_with(template, record) == (no_input, "5")


@pytest.mark.parametrize(
    ("record", "task"),
    [
        (RECORD, "dialogsum"),
        ({"fname": "x", "topic": "t", **RECORD}, "dialogsum"),
        ({"prompt": "p", "completion": "c"}, "prompt_completion"),
        ({"instruction": "i", "input": "", "output": "o"}, "instruction"),
        ({"instruction": "i", "output": "o"}, "instruction"),
    ],
)
def test_auto_detect(record, task):
    assert resolve_templates(None, [record]).task == task


def test_auto_detect_failure_names_fields_builtins_and_option():
    with pytest.raises(UserError) as info:
        resolve_templates(None, [{"question": "q", "answer": "a"}])
    message = one_line(info)
    assert "question, answer" in message
    for name in ("dialogsum", "prompt_completion", "instruction"):
        assert name in message
    assert "--template FILE" in message
    with pytest.raises(UserError, match="no records"):
        resolve_templates(None, [])


def test_builtin_by_name_and_unknown_name():
    assert resolve_templates("instruction", [{"instruction": "i", "output": "o"}]).task == "instruction"
    with pytest.raises(UserError) as info:
        resolve_templates("dialogsun", [RECORD])
    message = one_line(info)
    assert "'dialogsun'" in message and "did you mean dialogsum" in message and "--template FILE" in message


def test_named_template_whose_fields_the_records_lack():
    with pytest.raises(UserError) as info:
        resolve_templates("dialogsum", [{"prompt": "p", "completion": "c"}])
    message = one_line(info)
    assert "dialogue, summary" in message and "prompt, completion" in message


CUSTOM = """\
task: qa
description: Question answering.
fields: [question, answer]
metric: exact_match
task_type: classification
answer_choices: ["yes", "no"]
templates:
  - name: plain
    input: "{{ question }}\\nOptions: {{ answer_choices | join(', ') }}"
    target: "{{ answer }}"
"""


def test_yaml_file(tmp_path):
    path = tmp_path / "qa.yaml"
    path.write_text(CUSTOM)
    task = resolve_templates(str(path), [{"question": "Is it?", "answer": "yes"}])
    assert (task.task, task.fields) == ("qa", ["question", "answer"])
    assert (task.metric, task.task_type) == ("exact_match", "classification")
    assert task.answer_choices == ["yes", "no"]
    assert render(task, {"question": "Is it?", "answer": "yes"}, 0, 0) == ("Is it?\nOptions: yes, no", "yes")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("task: [unclosed\n", "not valid YAML"),
        ("- just\n- a list\n", "expected a YAML mapping"),
        ("task: qa\n", "missing key(s) templates"),
        ("templates: []\n", "missing key(s) task"),
        ("task: qa\ntemplates: []\n", "non-empty list"),
        ("task: qa\ntemplatse: []\ntemplates: [{name: a, input: x, target: y}]\n", "unknown key(s) templatse"),
        ("task: qa\ntemplates: [{name: a, input: x}]\n", "templates[0] needs string keys"),
        ("task: qa\ntemplates: [{name: a, input: '{{ x', target: y}]\n", "template 'a' input: Jinja2 syntax error"),
        ("task: qa\ntemplates: [{name: a, input: x, target: y}, {name: a, input: x, target: y}]\n", "unique"),
        ("task: qa\nfields: dialogue\ntemplates: [{name: a, input: x, target: y}]\n", "'fields' must be a list"),
    ],
)
def test_bad_yaml_files_name_the_file(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        resolve_templates(str(path), [{"x": 1}])
    message = one_line(info)
    assert str(path) in message and expected in message


def test_missing_yaml_file(tmp_path):
    with pytest.raises(UserError, match="template file not found"):
        load_templates(tmp_path / "nope.yaml")


def test_choice_is_seeded_by_seed_and_index_only():
    task = builtin_templates()["dialogsum"]
    names = [t.name for t in task.templates]
    # The documented rule: random.Random(f"{seed}:{index}"), independent of call order and hash seed.
    for seed in (0, 7):
        for index in range(50):
            assert choose(task, index, seed).name == names[random.Random(f"{seed}:{index}").randrange(len(names))]
    assert [choose(task, i, 0).name for i in range(200)] != [choose(task, i, 1).name for i in range(200)]
    prompt_a, _ = render(task, RECORD, index=5, seed=3)
    render(task, RECORD, index=6, seed=3)  # rendering other examples in between changes nothing
    assert render(task, RECORD, index=5, seed=3)[0] == prompt_a


def test_all_phrasings_are_used_about_equally():
    task = builtin_templates()["dialogsum"]
    n = 1400
    counts = collections.Counter(render(task, RECORD, i, seed=0)[0] for i in range(n))
    assert len(counts) == len(task.templates)
    expected = n / len(task.templates)
    assert all(0.7 * expected < c < 1.3 * expected for c in counts.values()), counts


def test_missing_field_names_field_template_and_index():
    task = builtin_templates()["dialogsum"]
    for record in ({"dialogue": DIALOGUE}, {"dialogue": DIALOGUE, "summary": None}):
        with pytest.raises(UserError) as info:
            render(task, record, index=17, seed=0)
        message = one_line(info)
        template = choose(task, 17, 0).name
        assert "field 'summary'" in message and f"template '{template}'" in message and "example 17" in message
    with pytest.raises(UserError, match="field 'completion'"):
        render_with(Template("t", "{{ prompt }}", "{{ completion }}"), {"prompt": "p"})


def test_sandbox_blocks_python_internals():
    with pytest.raises(UserError) as info:
        render_with(Template("evil", "{{ prompt.__class__.__mro__ }}", "x"), {"prompt": "p"})
    assert "unsafe" in one_line(info)


def test_no_autoescape_and_newlines_kept():
    template = Template("t", "<b>{{ prompt }}</b> & more\n\n", "{{ completion }}\n")
    assert render_with(template, {"prompt": "a<b>'\"", "completion": "c"}) == ("<b>a<b>'\"</b> & more\n\n", "c\n")


@pytest.mark.parametrize("tag", ['{% include "/etc/passwd" %}', '{% import "macros.txt" as m %}',
                                 '{% from "macros.txt" import x %}', '{% extends "base.txt" %}'])
def test_templates_cannot_read_other_files(tmp_path, tag):
    path = tmp_path / "t.yaml"
    path.write_text(f"task: t\ntemplates:\n  - name: a\n    input: '{{{{ prompt }}}} {tag}'\n    target: x\n")
    with pytest.raises(UserError) as info:
        load_templates(path)
    assert "templates cannot include, import or extend other files" in one_line(info) and "template 'a' input" in one_line(info)


def test_null_field_is_named_null_with_its_record():
    task = builtin_templates()["dialogsum"]
    with pytest.raises(UserError) as info:
        render(task, {"dialogue": DIALOGUE, "summary": None}, index=4, seed=0)
    message = one_line(info)
    assert "field 'summary', which is null in this record" in message and "record 5 of the data" in message
    assert "lacks" not in message


@pytest.mark.parametrize("source", ["{{ prompt / 2 }}", "{{ prompt + 1 }}", "{{ prompt|int(1, 2, 3, 4) }}", "{{ 1 // 0 }}"])
def test_failing_template_code_is_one_line(source):
    with pytest.raises(UserError) as info:
        render_with(Template("t", source, "x"), {"prompt": "p"})
    assert "template 't'" in one_line(info) and "failed to render" in one_line(info)
