"""The template library: built-in task files, listing / showing / rendering helpers, real DialogSum through it."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from peftlab.config import TrainConfig
from peftlab.data.pipeline import prepare
from peftlab.data.templates import (
    builtin_templates,
    describe,
    example_record,
    find_template,
    list_templates,
    load_task,
    render_all,
    render_template,
    render_with,
    resolve_templates,
    template_source,
)
from peftlab.errors import UserError
from peftlab.training.loop import train

# task -> (fields, metric, task_type, answer_choices)
EXPECTED = {
    "samsum": (["dialogue", "summary"], "rouge", "generation", None),
    "review_rating": (["text", "stars"], "accuracy", "classification", ["1", "2", "3", "4", "5"]),
    "sentiment": (["text", "label"], "accuracy", "classification", ["negative", "neutral", "positive"]),
    "qa": (["question", "context", "answer"], "squad_exact_match", "generation", None),
    "python": (["description", "code"], "exact_match", "generation", None),
    "translation": (["source", "target"], "bleu", "generation", None),
}
SAMSUM = {"dialogue": "Amanda: I baked cookies. Do you want some?\nJerry: Sure!\nAmanda: I'll bring you tomorrow :-)",
          "summary": "Amanda baked cookies and will bring Jerry some tomorrow."}  # fmt: skip
REVIEW = {"text": "The kettle boils fast and is quiet. Love it.", "stars": 5, "label": "positive"}


def one_line(info) -> str:
    message = str(info.value)
    assert message and "\n" not in message
    return message


@pytest.mark.parametrize("name", EXPECTED)
def test_builtin_task_metadata(name):
    task = builtin_templates()[name]
    assert (task.fields, task.metric, task.task_type, task.answer_choices) == EXPECTED[name]
    assert task.description and len(task.templates) >= 3
    assert len({t.name for t in task.templates}) == len(task.templates)
    assert len({t.input for t in task.templates}) == len(task.templates)  # phrasings really differ


def test_samsum_phrasings_are_its_own_and_dialogsum_data_still_detects_dialogsum():
    tasks = builtin_templates()
    samsum, dialogsum = tasks["samsum"], tasks["dialogsum"]
    assert not {t.input for t in samsum.templates} & {t.input for t in dialogsum.templates}
    for template in samsum.templates:
        prompt, target = render_with(template, SAMSUM)
        assert SAMSUM["dialogue"] in prompt and prompt != SAMSUM["dialogue"] and target == SAMSUM["summary"]
    assert render_with(find_template(samsum, "tldr"), SAMSUM)[0] == SAMSUM["dialogue"] + "\n\nTL;DR:"
    assert resolve_templates(None, [SAMSUM]).task == "dialogsum"
    assert resolve_templates("samsum", [SAMSUM]).task == "samsum"


def test_answer_choices_reach_the_templates():
    task = load_task("review_rating")
    prompt, target = render_template(task, "options", REVIEW)
    assert prompt.endswith("Options: 1, 2, 3, 4, 5.") and target == "5"
    prompt, target = render_template(load_task("sentiment"), "options", REVIEW)
    assert "one of: negative, neutral, positive." in prompt and target == "positive"


def test_numeric_labels_map_as_the_sentiment_file_says(tmp_path):
    text = template_source("sentiment")[1]
    data = yaml.safe_load(text)
    data["answer_choices"] = ["negative", "positive"]
    for template in data["templates"]:
        template["target"] = "{{ ['negative', 'positive'][label] }}"
    path = tmp_path / "sst2.yaml"
    path.write_text(yaml.safe_dump(data))
    task = resolve_templates(str(path), [{"text": "bad", "label": 0}])
    assert [r.target for r in render_all(task, {"text": "good film", "label": 1})] == ["positive"] * len(task.templates)


def test_translation_languages_are_optional():
    task = load_task("translation")
    named = {"source": "Bonjour", "target": "Hello", "source_language": "French", "target_language": "English"}
    assert render_template(task, "translate", named) == ("Translate the following text from French into English.\n\nBonjour", "Hello")
    assert render_template(task, "translate", {"source": "Bonjour", "target": "Hello"})[0] == "Translate the following text.\n\nBonjour"
    assert render_template(task, "source_label", named)[0] == "French: Bonjour\nEnglish:"


def test_list_and_describe_builtins_then_user_files(tmp_path):
    names = [t.task for t in list_templates()]
    assert names[:3] == ["dialogsum", "instruction", "prompt_completion"] and set(EXPECTED) <= set(names)
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "b.yaml").write_text("task: b_task\nfields: [x]\ntemplates: [{name: t, input: '{{ x }}', target: y}]\n")
    (folder / "a.yml").write_text("task: a_task\nfields: [x]\ntemplates: [{name: t, input: '{{ x }}', target: y}]\n")
    (folder / "notes.txt").write_text("not a template")
    tasks = list_templates(folder, folder / "b.yaml")
    assert [t.task for t in tasks[len(names):]] == ["a_task", "b_task", "b_task"]
    row = describe(builtin_templates()["review_rating"])
    assert row == {"task": "review_rating", "fields": ["text", "stars"], "templates": 4, "metric": "accuracy",
                   "task_type": "classification", "answer_choices": ["1", "2", "3", "4", "5"],
                   "description": builtin_templates()["review_rating"].description}  # fmt: skip
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="holds no .yaml"):
        list_templates(empty)


def test_show_returns_the_yaml_file(tmp_path):
    for name in EXPECTED:
        where, text = template_source(name)
        assert where == f"built-in {name}.yaml" and yaml.safe_load(text)["task"] == name
    path = tmp_path / "own.yaml"
    path.write_text("task: own\ntemplates: [{name: t, input: x, target: y}]\n")
    assert template_source(str(path)) == (str(path), path.read_text())
    with pytest.raises(UserError) as info:
        template_source("samsun")
    assert "did you mean samsum" in one_line(info)


def test_render_every_template_or_one(tmp_path):
    task = load_task("qa")
    record = {"question": "Who?", "context": "Anna met Ben.", "answer": "Ben"}
    rendered = render_all(task, record)
    assert [r.template for r in rendered] == [t.name for t in task.templates]
    assert all("Anna met Ben." in r.input and "Who?" in r.input and r.target == "Ben" for r in rendered)
    (only,) = render_all(task, record, template="q_a")
    assert (only.input, only.target) == ("Anna met Ben.\n\nQ: Who?\nA:", "Ben")
    with pytest.raises(UserError) as info:
        render_all(task, record, template="q-a")
    message = one_line(info)
    assert "no template 'q-a'" in message and "did you mean q_a" in message and "read_and_answer" in message


def test_missing_field_names_the_field_and_the_template():
    task = load_task("python")
    with pytest.raises(UserError) as info:
        render_all(task, {"description": "Add 1 to x."})
    message = one_line(info)
    assert "field 'code'" in message and "template 'translate'" in message and "task 'python'" in message
    with pytest.raises(UserError) as info:
        render_all(load_task("qa"), {"question": "q", "answer": "a"}, template="question_first")
    assert "field 'context'" in one_line(info) and "template 'question_first'" in one_line(info)


def test_example_record_from_json_or_a_data_file(tmp_path):
    assert example_record('{"text": "hi", "stars": 4}') == {"text": "hi", "stars": 4}
    assert example_record({"a": 1}) == {"a": 1}
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"t{i}", "stars": i}) for i in range(1, 4)) + "\n")
    assert example_record(data=str(path)) == {"text": "t1", "stars": 1}
    assert example_record(data=str(path), index=2) == {"text": "t3", "stars": 3}
    assert example_record(data=str(path), index=-1) == {"text": "t3", "stars": 3}
    assert example_record(data="demo:reviews", index=3)["id"] == "reviews_3"
    for call, expected in [
        (lambda: example_record(data=str(path), index=3), "holds 3 records, so there is no record 3"),
        (lambda: example_record('{"text": '), "not valid JSON"),
        (lambda: example_record("[1, 2]"), "must be a JSON object"),
        (lambda: example_record(), "exactly one of"),
        (lambda: example_record("{}", data=str(path)), "exactly one of"),
    ]:
        with pytest.raises(UserError) as info:
            call()
        assert expected in one_line(info)


def test_shared_dialogsum_dev_through_the_templates_and_two_training_steps(shared_data, tiny_llama_dir, tmp_path):
    dev = shared_data / "dialogsum" / "dev.jsonl"
    records = [json.loads(line) for line in dev.read_text().splitlines() if line.strip()]
    for name in ("dialogsum", "samsum"):
        data = prepare(str(dev), name, "0.8,0.1,0.1", 0)
        assert data.task.task == name
        assert sum(len(v) for v in data.splits.values()) == len(records) == 500
        for example in data.splits["train"][:50]:
            source = records[example.index]
            assert source["dialogue"] in example.prompt and example.completion == source["summary"]
    result = train(TrainConfig(model=str(tiny_llama_dir), data=str(dev), template="dialogsum", out=str(tmp_path / "run"),
                               max_steps=2, limit=8, batch_size=4, max_length=384, lr=1e-3, device="cpu"))  # fmt: skip
    losses = [r["loss"] for r in map(json.loads, (result.run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert result.steps == 2 and len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["data"]["task"] == "dialogsum" and info["data"]["train_used"] == 8
