"""Forgetting reports: choice loglikelihoods against a brute-force reference, suites, before/after/delta and flags."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from peftlab.config import EvalConfig, ForgettingConfig
from peftlab.data.pipeline import prepare
from peftlab.errors import UserError
from peftlab.eval.evaluate import evaluate
from peftlab.eval.harness.metrics import token_f1
from peftlab.experiment.forgetting import (
    DEMO_SUITE,
    SuiteItem,
    TaskScore,
    bleu_delta_stderr,
    choice_loglikelihoods,
    compare_scores,
    evaluate_suite,
    forgetting_report,
    load_suite,
    paired_stderr,
    prepare_suite,
    score_item,
    squad_normalize,
)
from peftlab.models import LoadedModel
from peftlab.peft import LoraConfig, apply_lora, save_adapter

PROMPTS = ["Rate this review: great kettle, very quiet. Love it.", "Hi",
           "Question: what is the capital of France?\nAnswer in one word."]  # fmt: skip
CHOICES = ["positive", "negative", "5", "not sure at all"]


def one_line(info) -> str:
    message = str(info.value)
    assert message and "\n" not in message
    return message


def loaded_from(folder) -> LoadedModel:
    tok = AutoTokenizer.from_pretrained(folder)
    seq2seq = "t5" in json.loads((folder / "config.json").read_text())["model_type"]
    model = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_pretrained(folder).eval()
    return LoadedModel(model, tok, seq2seq, str(folder), str(folder), None)


def brute_force_loglik(loaded: LoadedModel, prompt: str, choice: str, max_length: int = 512) -> float:
    """One unbatched forward pass with full logits: sum of log p(choice token | everything before it),
    the model reading ``max_length`` tokens at most (lm-eval's cut: ``(ctx + cont)[-(max_length + 1):][:-1]``)."""
    tok, model = loaded.tokenizer, loaded.model
    cont = tok(choice, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        if loaded.is_seq2seq:
            source = tok(prompt)["input_ids"][-max_length:]
            logits = model(input_ids=torch.tensor([source]), labels=torch.tensor([cont])).logits[0]
            logp = torch.log_softmax(logits.double(), -1)
            return sum(logp[t, c].item() for t, c in enumerate(cont))
        ctx = tok(prompt + "\n")["input_ids"]  # the non-chat training format: prompt, newline, completion
        ctx = ctx[max(0, len(ctx) + len(cont) - 1 - max_length) :]
        logp = torch.log_softmax(model(input_ids=torch.tensor([ctx + cont[:-1]])).logits[0].double(), -1)
        return sum(logp[len(ctx) + k - 1, c].item() for k, c in enumerate(cont))


def test_choice_loglikelihoods_match_brute_force(tiny_model_dir):
    loaded = loaded_from(tiny_model_dir)
    got = choice_loglikelihoods(loaded.model, loaded.tokenizer, PROMPTS, CHOICES, loaded.is_seq2seq, batch_size=5)
    expected = [[brute_force_loglik(loaded, p, c) for c in CHOICES] for p in PROMPTS]
    assert torch.allclose(torch.tensor(got, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64), atol=2e-4), (got, expected)
    # the batch size changes nothing (padding is masked)
    again = choice_loglikelihoods(loaded.model, loaded.tokenizer, PROMPTS, CHOICES, loaded.is_seq2seq, batch_size=1)
    assert torch.allclose(torch.tensor(got), torch.tensor(again), atol=1e-4)
    # a prompt longer than max_length loses its beginning: the model reads max_length tokens at most
    cut = choice_loglikelihoods(loaded.model, loaded.tokenizer, PROMPTS, CHOICES, loaded.is_seq2seq, max_length=12)
    expected = [[brute_force_loglik(loaded, p, c, max_length=12) for c in CHOICES] for p in PROMPTS]
    assert torch.allclose(torch.tensor(cut, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64), atol=2e-4)
    assert cut[0] != got[0]


def test_squad_normalize():
    assert squad_normalize("The  Paris!") == squad_normalize("paris") == "paris"
    assert squad_normalize("by bus.") == "by bus" and squad_normalize("An apple, a pear") == "apple pear"


def test_squad_f1_gives_credit_for_an_answer_inside_a_sentence(tiny_llama_dir):
    # "Leila has a hamster named Ziggy." vs "hamster": 1 common token of 5 predicted ("a" dropped), 1 of 1 reference
    assert token_f1("Leila has a hamster named Ziggy.", "hamster") == pytest.approx(2 * 0.2 * 1.0 / 1.2)
    assert token_f1("The hamster!", "hamster") == 1.0 and token_f1("a dog", "hamster") == 0.0
    (qa,) = prepare_suite([SuiteItem("qa", "demo:qa", "qa", metric="squad_f1", limit=2, max_new_tokens=4)])
    score = score_item(loaded_from(tiny_llama_dir), qa, chat=False)
    expected = sum(token_f1(p, ex.completion) for p, ex in zip(score.predictions, qa.examples)) / 2
    assert score.metric == "squad_f1" and score.value == pytest.approx(expected)
    assert score.references == [ex.completion for ex in qa.examples]


def write_suite(tmp_path, items, **extra) -> str:
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump({**extra, "suite": items}))
    return str(path)


SMALL_SUITE = [
    {"name": "summaries", "data": "demo:dialogsum", "template": "dialogsum", "metric": "rougeL", "limit": 3,
     "max_new_tokens": 8},
    {"name": "stars", "data": "demo:reviews", "template": "review_rating", "limit": 10},
    {"name": "code", "data": "demo:python", "limit": 3, "max_new_tokens": 8, "split": "validation"},
]  # fmt: skip


def test_model_against_itself_gives_zero_deltas_and_matches_peftlab_eval(tiny_llama_dir, tmp_path):
    suite = write_suite(tmp_path, SMALL_SUITE, threshold=0.01)
    report = forgetting_report(ForgettingConfig(model=str(tiny_llama_dir), tuned=str(tiny_llama_dir), suite=suite,
                                                out=str(tmp_path / "out"), device="cpu"))  # fmt: skip
    assert [(r.task, r.metric, r.num_examples) for r in report.rows] == [
        ("summaries", "rougeL", 3), ("stars", "accuracy", 10), ("code", "exact_match", 3)]  # fmt: skip
    assert all(r.delta == 0.0 and r.before == r.after and not r.flagged for r in report.rows)
    assert report.threshold == 0.01 and report.flagged == []  # the file's threshold
    # the generation metric is exactly what `peftlab eval` reports for the same examples
    metrics = evaluate(EvalConfig(model=str(tiny_llama_dir), data="demo:dialogsum", template="dialogsum", limit=3,
                                  max_new_tokens=8, out=str(tmp_path / "eval"), device="cpu")).metrics  # fmt: skip
    assert report.rows[0].before == metrics["rougeL"]
    # the accuracy is the arg max of brute-force loglikelihoods over the answer choices
    loaded = loaded_from(tiny_llama_dir)
    (stars,) = prepare_suite([SuiteItem(**SMALL_SUITE[1])])
    choices = stars.task.answer_choices
    right = 0
    for ex in stars.examples:
        scores = [brute_force_loglik(loaded, ex.prompt, c) for c in choices]
        right += choices[scores.index(max(scores))] == ex.completion
    assert report.rows[1].before == right / len(stars.examples)
    table = report.table()
    assert "| stars | accuracy | 10 |" in table and "+0.0000" in table
    # the first examples side by side: the reference, the base's answer and the tuned model's
    first = report.rows[1].examples[0]
    assert len(report.rows[1].examples) == 3 and first["reference"] == stars.examples[0].completion
    assert first["before"] == first["after"] and f"| stars | {first['reference']} |" in report.examples_table()
    assert json.loads(json.dumps(report.to_dict()))["rows"][0]["task"] == "summaries"


def test_fresh_lora_adapter_changes_nothing(tiny_t5_dir, tmp_path):
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir)
    config = LoraConfig(rank=4, alpha=8)
    save_adapter(apply_lora(model, config), tmp_path / "adapter", config, base_model_name_or_path=str(tiny_t5_dir))
    suite = write_suite(tmp_path, SMALL_SUITE[:2])
    report = forgetting_report(ForgettingConfig(model=str(tiny_t5_dir), adapter=str(tmp_path / "adapter"), suite=suite,
                                                out=str(tmp_path / "out"), device="cpu"))  # fmt: skip
    assert [r.delta for r in report.rows] == [0.0, 0.0] and report.tuned.endswith("adapter")


def first_token(tokenizer, word: str) -> int:
    return tokenizer(word, add_special_tokens=False)["input_ids"][0]


def answering(loaded: LoadedModel, word: str) -> LoadedModel:
    """A copy whose output layer adds +30 to the logit of ``word``'s first token: it answers ``word``."""
    model = copy.deepcopy(loaded.model)
    old = model.get_output_embeddings()
    head = nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[first_token(loaded.tokenizer, word)] = 30.0
    model.set_output_embeddings(head)
    return LoadedModel(model, loaded.tokenizer, loaded.is_seq2seq, word, word, None)


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_a_damaged_model_is_flagged(kind, tiny_llama_dir, tiny_t5_dir, tmp_path):
    loaded = loaded_from({"llama": tiny_llama_dir, "t5": tiny_t5_dir}[kind])
    firsts = [first_token(loaded.tokenizer, stars) for stars in "12345"]
    assert len(set(firsts)) == 5
    data = tmp_path / "happy.jsonl"
    data.write_text("".join(json.dumps({"text": f"Lovely kettle number {i}, works great.", "stars": 5}) + "\n"
                            for i in range(20)))  # fmt: skip
    items = [SuiteItem("happy", str(data), "review_rating", split="all"), SuiteItem(**SMALL_SUITE[0])]
    prepared = prepare_suite(items)
    good, damaged = answering(loaded, "5"), answering(loaded, "1")
    before = evaluate_suite(good, prepared, batch_size=4)
    after = evaluate_suite(damaged, prepared, batch_size=4)
    assert before["happy"].value == 1.0 and after["happy"].value == 0.0
    assert set(after["happy"].predictions) == {"1"}
    report = compare_scores(before, after, threshold=0.05)
    happy, summaries = report.rows
    assert (happy.before, happy.after, happy.delta, happy.flagged) == (1.0, 0.0, -1.0, True)
    assert happy.delta_stderr == 0.0  # every example went from right to wrong: no doubt about it
    assert summaries.delta == summaries.after - summaries.before
    assert summaries.flagged == (summaries.delta < -0.05)
    assert report.flagged[0] is happy and "| 1.0000 | 0.0000 | -1.0000 | 0.0000 | -100.0% | drop > 0.05 |" in report.table()


def test_paired_standard_error_by_hand():
    # differences -1, 0, 0, 1: mean 0, sample variance 2/3, standard error sqrt(2/3 / 4)
    assert paired_stderr([1, 0, 1, 0], [0, 0, 1, 1]) == pytest.approx((2 / 3 / 4) ** 0.5)
    assert paired_stderr([1, 1, 1], [0, 0, 0]) == 0.0 and paired_stderr([0.5], [0.2]) == 0.0
    before = {"a": TaskScore("a", "accuracy", 0.5, 4, per_example=[1, 0, 1, 0])}
    after = {"a": TaskScore("a", "accuracy", 0.5, 4, per_example=[0, 0, 1, 1])}
    (row,) = compare_scores(before, after).rows
    assert row.delta_stderr == pytest.approx(0.4082, abs=1e-4) and "| 0.4082 |" in compare_scores(before, after).table()
    corpus = {"b": TaskScore("b", "bleu", 0.3, 4)}  # no per-example scores and no texts: nothing to resample
    assert compare_scores(corpus, corpus).rows[0].delta_stderr is None


def test_bleu_delta_stderr_is_a_paired_bootstrap():
    refs = ["the cat sat on the mat", "a dog ran in the park", "it is raining today", "we like green tea"]
    assert bleu_delta_stderr(refs, refs, refs) == 0.0  # identical answers: every resample's delta is 0
    worse = ["the cat sat", "a dog", "it is raining today", "we like green tea"]
    spread = bleu_delta_stderr(refs, worse, refs, resamples=200)
    assert 0.0 < spread < 1.0 and spread == bleu_delta_stderr(refs, worse, refs, resamples=200)  # seeded
    before = {"b": TaskScore("b", "bleu", 1.0, 4, refs, refs)}
    after = {"b": TaskScore("b", "bleu", 0.5, 4, worse, refs)}
    assert compare_scores(before, after).rows[0].delta_stderr == pytest.approx(bleu_delta_stderr(refs, worse, refs))


def test_threshold_rule():
    def scores(**values):
        return {name: TaskScore(name, "accuracy", v, 10) for name, v in values.items()}

    report = compare_scores(scores(a=0.5, b=0.5, c=0.5), scores(a=0.47, b=0.44, c=0.9), threshold=0.05)
    assert [(r.task, r.flagged) for r in report.rows] == [("a", False), ("b", True), ("c", False)]
    assert [r.delta for r in report.rows] == pytest.approx([-0.03, -0.06, 0.4])
    with pytest.raises(UserError, match="threshold must be >= 0"):
        compare_scores(scores(a=1.0), scores(a=1.0), threshold=-0.1)


def test_builtin_demo_suite_prepares_every_task():
    items, threshold = load_suite("demo")
    assert threshold is None and [i.name for i in items] == [i.name for i in DEMO_SUITE]
    items[0].limit = 1  # a copy: the built-in list is not changed
    assert DEMO_SUITE[0].limit == 16
    prepared = prepare_suite(load_suite("demo")[0])
    assert [p.metric for p in prepared] == ["rougeL", "accuracy", "accuracy", "bleu", "squad_f1"]
    assert [len(p.examples) for p in prepared] == [16, 40, 40, 24, 24]
    for p in prepared:  # held out from a training run with the default split
        train = prepare(p.item.data, p.item.template, "0.8,0.1,0.1", 0).splits["train"]
        assert {ex.index for ex in p.examples}.isdisjoint({ex.index for ex in train})


def test_suite_defaults_come_from_the_template(tmp_path):
    (rating, qa) = prepare_suite([SuiteItem("r", "demo:reviews", "review_rating", limit=2), SuiteItem("q", "demo:qa", limit=2)])
    assert (rating.metric, qa.metric) == ("accuracy", "squad_exact_match")
    (summaries,) = prepare_suite([SuiteItem("s", "demo:dialogsum", limit=2)])
    assert summaries.metric == "rougeL"  # the template's "rouge"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ({"suite": []}, "holds no tasks"),
        ({"tasks": []}, "'suite:' list"),
        ({"suite": [{"name": "a"}]}, "needs at least 'name' and 'data'"),
        ({"suite": [{"name": "a", "data": "demo:qa", "metrc": "bleu"}]}, "unknown key(s) metrc"),
        ({"suite": [{"name": "a", "data": "demo:qa", "metric": "f1"}]}, "unknown metric 'f1'"),
        ({"suite": [{"name": "a", "data": "demo:qa", "split": "dev"}]}, "split must be one of"),
        ({"suite": [{"name": "a", "data": "demo:qa"}, {"name": "a", "data": "demo:python"}]}, "a appear more than once"),
        ({"suite": [{"name": "a", "data": "demo:qa"}], "treshold": 1}, "unknown key(s) treshold"),
        ({"suite": [{"name": "a", "data": "demo:qa", "limit": "ten"}]}, "limit must be an integer, got 'ten'"),
        ({"suite": [{"name": "a", "data": "demo:qa", "limit": 0}]}, "limit must be >= 1"),
        ({"suite": [{"name": "a", "data": "demo:qa", "template": 3}]}, "template must be a string"),
        ({"suite": [{"name": "a", "data": "demo:qa"}], "threshold": "high"}, "threshold must be a number"),
    ],
)
def test_bad_suite_files(tmp_path, content, expected):
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(UserError) as info:
        load_suite(str(path))
    assert expected in one_line(info)


def test_bad_suite_tasks_and_arguments(tmp_path):
    with pytest.raises(UserError) as info:
        prepare_suite([SuiteItem("code", "demo:python", metric="accuracy")])
    assert "needs a template with answer_choices" in one_line(info)
    data = tmp_path / "odd.jsonl"
    data.write_text(json.dumps({"text": "meh", "label": "mixed"}) + "\n")
    with pytest.raises(UserError) as info:
        prepare_suite([SuiteItem("odd", str(data), "sentiment", split="all")])
    assert "'mixed' is not one of the answer choices" in one_line(info)
    with pytest.raises(UserError, match="suite not found"):
        load_suite(str(tmp_path / "none.yaml"))
    with pytest.raises(UserError, match="one of them"):
        ForgettingConfig(model="base", out="out", suite="demo")
    with pytest.raises(UserError, match="one of them"):
        ForgettingConfig(model="base", out="out", tuned="a", adapter="b", suite="demo")
