"""The benchmark harness: scoring against direct model computations, metrics against scipy /
scikit-learn, task loading, aggregation and the one-line errors. Parity with lm-evaluation-harness
itself is in test_harness_parity.py."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from peftlab.errors import UserError
from peftlab.eval.harness import (
    build_prompts,
    evaluate_task,
    generate_until,
    loglikelihoods,
    resolve_tasks,
    run_harness,
    write_results,
)
from peftlab.eval.harness import metrics as M
from peftlab.eval.harness.scoring import encode_pair
from peftlab.models import load_model


def write_task(folder, rows, yaml_text, name="task"):
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = folder / f"{name}.yaml"
    path.write_text(yaml_text.replace("DATA", str(folder / f"{name}.jsonl")))
    return path


MC_YAML = """
task: paint
dataset_path: json
dataset_kwargs: {data_files: {test: DATA}}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: "{{options}}"
doc_to_target: label
"""
MC_ROWS = [{"question": f"What colour is thing {i}?", "options": ["red", "green", "dark blue"], "label": i % 3} for i in range(5)]


# ------------------------------------------------------------------------------------------ scoring


def _direct_logprob(loaded, context: str, continuation: str) -> float:
    """log p(continuation | context) from one unbatched forward of the model (the textbook way)."""
    ctx, cont = encode_pair(loaded.tokenizer, context, continuation, loaded.is_seq2seq)
    with torch.no_grad():
        if loaded.is_seq2seq:
            start = loaded.model.config.decoder_start_token_id
            logits = loaded.model(input_ids=torch.tensor([ctx]), decoder_input_ids=torch.tensor([[start] + cont[:-1]])).logits[0]
        else:
            logits = loaded.model(input_ids=torch.tensor([ctx + cont[:-1]])).logits[0, len(ctx) - 1 :]
    logprobs = torch.log_softmax(logits.float(), -1)
    return float(sum(logprobs[j, t] for j, t in enumerate(cont)))


def test_loglikelihoods_equal_direct_forwards_in_any_batch(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir))
    requests = [("Question: what is the capital of France?\nAnswer:", " Paris"),
                ("Question: what is the capital of France?\nAnswer:", " London"),  # shares the context
                ("It is cold outside. ", "It is very cold."),  # a trailing space moves to the continuation
                ("Hi", " Tom, are we still on for lunch tomorrow at noon?"),
                ("", "The weather is nice today.")]  # empty context: the prefix token stands in
    expected = [_direct_logprob(loaded, c, x) for c, x in requests] if not loaded.is_seq2seq else None
    one = loglikelihoods(loaded.model, loaded.tokenizer, requests, is_seq2seq=loaded.is_seq2seq, batch_size=1)
    many = loglikelihoods(loaded.model, loaded.tokenizer, requests, is_seq2seq=loaded.is_seq2seq, batch_size=8)
    for i, (a, b) in enumerate(zip(one, many)):
        assert a.logprob == pytest.approx(b.logprob, rel=1e-6, abs=1e-4)
        assert a.num_tokens == b.num_tokens > 0
        if expected is not None:
            assert a.logprob == pytest.approx(expected[i], rel=1e-6, abs=1e-4)
        elif requests[i][0]:
            assert a.logprob == pytest.approx(_direct_logprob(loaded, *requests[i]), rel=1e-6, abs=1e-4)


def test_encode_pair_keeps_merges_across_the_boundary(tiny_llama_dir):
    tok = load_model(str(tiny_llama_dir)).tokenizer
    ctx, cont = encode_pair(tok, "It is very cold ", "outside.", is_seq2seq=False)
    assert ctx + cont == tok.encode("It is very cold outside.")
    assert tok.decode(cont).startswith(" ")  # the space went to the continuation


def test_generate_until_cuts_the_greedy_text_at_the_first_stop(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir))
    prompts = ["Question: what is the capital of France? Answer:", "#Person1#: Hi Tom"]
    # Reference: plain greedy decoding of 12 tokens, no stop strings, one prompt at a time.
    full = []
    for p in prompts:
        ids = torch.tensor([loaded.tokenizer.encode(p)])
        out = loaded.model.generate(input_ids=ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
        full.append(loaded.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    stops = [full[0][3:5], full[1][6:8]]  # strings that do occur in the continuations
    got = generate_until(loaded.model, loaded.tokenizer, prompts, is_seq2seq=False, until=stops, max_gen_toks=12, batch_size=2)
    for text, reference in zip(got.texts, full):
        cut = reference
        for s in stops:
            cut = cut.split(s)[0]
        assert text == cut
    assert all(0 < n <= 12 for n in got.new_tokens)


def test_generate_until_runs_on_t5(tiny_t5_dir):
    loaded = load_model(str(tiny_t5_dir))
    got = generate_until(loaded.model, loaded.tokenizer, ["Summarize: it is cold.", "Hi"], is_seq2seq=True,
                         until=["\n"], max_gen_toks=4, batch_size=2)
    assert len(got.texts) == 2 and all(0 < n <= 4 for n in got.new_tokens)


# ------------------------------------------------------------------------------------------ metrics


def test_corpus_metrics_match_scipy_and_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(0)
    golds = [rng.randint(0, 1) for _ in range(50)]
    preds = [g if rng.random() < 0.7 else 1 - g for g in golds]
    assert M.f1_score(golds, preds) == pytest.approx(sklearn_metrics.f1_score(golds, preds))
    assert M.matthews(golds, preds) == pytest.approx(sklearn_metrics.matthews_corrcoef(golds, preds))
    golds3 = [rng.randint(0, 2) for _ in range(60)]
    preds3 = [g if rng.random() < 0.6 else rng.randint(0, 2) for g in golds3]
    assert M.matthews(golds3, preds3) == pytest.approx(sklearn_metrics.matthews_corrcoef(golds3, preds3))
    assert M.f1_score(golds3, preds3) == pytest.approx(sklearn_metrics.f1_score(golds3, preds3, average="macro"))
    xs = [rng.choice([0.0, 1.0, 2.5, 3.0, 4.0, 5.0]) for _ in range(40)]  # ties, as STS-B scores have
    ys = [x + rng.gauss(0, 1) for x in xs]
    assert M.pearson(xs, ys) == pytest.approx(stats.pearsonr(xs, ys)[0])
    assert M.spearman(xs, ys) == pytest.approx(stats.spearmanr(xs, ys)[0])


def test_exact_match_follows_the_harness_rules():
    lm_metrics = pytest.importorskip("lm_eval.api.metrics")
    cases = [(" True", "True", {}), ("true.", "True", {"ignore_case": True, "regexes_to_ignore": ["\\.$"]}),
             ("4,000", "4000", {"regexes_to_ignore": [","]}), ("Hello!", "hello", {"ignore_case": True, "ignore_punctuation": True}),
             ("abc12", "abc", {"ignore_numbers": True})]
    for pred, ref, options in cases:
        expected = lm_metrics.exact_match_hf_evaluate(predictions=[pred], references=[ref], **options)["exact_match"]
        assert M.exact_match(pred, ref, **options) == expected
    assert M.exact_match(" False\n\nA: True", "False", first_line=True) == 1.0
    assert M.token_f1("the cat sat", "A cat sat down") == pytest.approx(2 * (2 / 2) * (2 / 3) / (1 + 2 / 3))


def test_multiple_choice_item_normalises_by_characters():
    # ll / len: "red" -3/3 = -1.0, "dark blue" -6/9 = -0.67 -> acc picks red, acc_norm picks dark blue
    item = M.multiple_choice_item([-3.0, -6.0], ["red", "dark blue"], gold=[1])
    assert (item["pred"], item["pred_norm"], item["acc"], item["acc_norm"]) == (0, 1, 0.0, 1.0)
    assert item["confidence"] == pytest.approx(1 / (1 + math.exp(-3.0)))


# --------------------------------------------------------------------------------- tasks and groups


def test_local_task_prompts_and_fewshot_draw_are_deterministic(tmp_path):
    path = write_task(tmp_path, MC_ROWS, MC_YAML + 'fewshot_split: test\ndescription: "Colours.\\n\\n"\nnum_fewshot: 2\n')
    task = resolve_tasks([str(path)])[0]
    first, again = build_prompts(task), build_prompts(task)
    assert [p.context for p in first] == [p.context for p in again]
    p = first[0]
    assert p.context.startswith("Colours.\n\n") and p.context.endswith("Question: What colour is thing 0?\nAnswer:")
    assert p.context.count("Question:") == 3 and "thing 0?\nAnswer: red" not in p.context  # not its own example
    assert p.choices == ["red", "green", "dark blue"] and p.gold == [0]
    assert build_prompts(task, seed=7)[0].context != p.context or build_prompts(task, seed=8)[0].context != p.context


def test_mmlu_group_is_size_weighted(tiny_llama_dir, shared_data, tmp_path):
    result = run_harness(str(tiny_llama_dir), ["mmlu_anatomy", "mmlu_astronomy", "mmlu_anatomy"], data_root=shared_data,
                         split="val", limit=3, batch_size=4)
    assert list(result.tasks) == ["mmlu_anatomy", "mmlu_astronomy"]  # duplicates once
    a, b = result.tasks["mmlu_anatomy"], result.tasks["mmlu_astronomy"]
    prompt = a.items[0]["prompt"]
    assert prompt.startswith("The following are multiple choice questions (with answers) about anatomy.\n\n")
    assert prompt.endswith("Answer:") and "\nD. " in prompt
    group = result.groups["mmlu"]
    assert group["num_items"] == 6 and group["num_tasks"] == 2
    assert group["acc"] == pytest.approx((a.metrics["acc"] * 3 + b.metrics["acc"] * 3) / 6)
    assert result.groups["mmlu_stem"]["num_tasks"] == 2
    written = json.loads(write_results(result, tmp_path / "harness.json").read_text())
    assert written["tasks"]["mmlu_anatomy"]["metrics"]["acc"] == a.metrics["acc"]


def test_bigbench_json_tasks(tmp_path, tiny_llama_dir):
    mc = {"name": "colours", "examples": [
        {"input": "The sky is", "target_scores": {"blue": 1, "green": 0, "red": 0}},
        {"input": "Grass is", "target_scores": {"blue": 0, "green": 1, "red": 0.5}}]}
    gen = {"examples": [{"input": "2 + 2 =", "target": "4"}, {"input": "3 + 3 =", "target": ["6", "six"]}]}
    (tmp_path / "mc.json").write_text(json.dumps(mc))
    (tmp_path / "gen.json").write_text(json.dumps(gen))
    tasks = resolve_tasks([str(tmp_path / "mc.json"), str(tmp_path / "gen.json")])
    prompts = build_prompts(tasks[0])
    assert prompts[0].context == "Q: The sky is\n  choice: blue\n  choice: green\n  choice: red\nA: "
    assert prompts[1].gold == [1]
    loaded = load_model(str(tiny_llama_dir))
    result = evaluate_task(loaded, tasks[0])
    grades = [it["multiple_choice_grade"] for it in result.items]
    expected = [list(ex["target_scores"].values())[it["pred"]] for ex, it in zip(mc["examples"], result.items)]
    assert grades == expected
    gen_result = evaluate_task(loaded, tasks[1], max_gen_toks=3)
    assert gen_result.items[1]["references"] == ["6", "six"] and "exact_str_match" in gen_result.metrics


def test_adapter_changes_the_scores(tmp_path, tiny_llama_dir):
    from peftlab.peft import LoraConfig, apply_lora, save_adapter

    model = load_model(str(tiny_llama_dir)).model
    config = LoraConfig(rank=4, alpha=8, targets=["q_proj", "v_proj"])
    apply_lora(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    save_adapter(model, tmp_path / "adapter", config)
    path = write_task(tmp_path, MC_ROWS, MC_YAML)
    base = run_harness(str(tiny_llama_dir), [str(path)])
    adapted = run_harness(str(tiny_llama_dir), [str(path)], adapter=str(tmp_path / "adapter"))
    direct = loglikelihoods(model, load_model(str(tiny_llama_dir)).tokenizer,
                            [(adapted.tasks["paint"].items[0]["prompt"], " red")], is_seq2seq=False)
    assert adapted.tasks["paint"].items[0]["loglikelihoods"][0] == pytest.approx(direct[0].logprob, abs=1e-4)
    assert adapted.tasks["paint"].items[0]["loglikelihoods"][0] != pytest.approx(base.tasks["paint"].items[0]["loglikelihoods"][0], abs=1e-3)


# ------------------------------------------------------------------------------------------- errors


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_unknown_task_name_lists_close_matches():
    with pytest.raises(UserError) as e:
        resolve_tasks(["mmlu_abstract_algebr"])
    assert "did you mean mmlu_abstract_algebra" in _one_line(e)
    with pytest.raises(UserError) as e:
        resolve_tasks(["bbh_boolean_expresions"])
    assert "bbh_boolean_expressions" in _one_line(e)


def test_template_naming_a_missing_field_fails_before_the_model(tmp_path):
    path = write_task(tmp_path, MC_ROWS, MC_YAML.replace("{{question}}", "{{questoin}}"))
    with pytest.raises(UserError) as e:
        resolve_tasks([str(path)])
    message = _one_line(e)
    assert "questoin" in message and "question, options, label" in message


def test_gold_label_outside_the_choices(tmp_path):
    rows = [*MC_ROWS[:2], {"question": "What colour?", "options": ["red", "green"], "label": "blue"}]
    path = write_task(tmp_path, rows, MC_YAML)
    task = resolve_tasks([str(path)])[0]
    with pytest.raises(UserError) as e:
        build_prompts(task)
    assert "document 2" in _one_line(e) and "'blue' is not among the choices" in _one_line(e)
    rows[2]["label"] = 5
    path = write_task(tmp_path, rows, MC_YAML, name="index")
    with pytest.raises(UserError) as e:
        build_prompts(resolve_tasks([str(path)])[0])
    assert "index 5 is out of range" in _one_line(e)


def test_task_files_cannot_run_python_or_use_unknown_keys(tmp_path):
    path = write_task(tmp_path, MC_ROWS, MC_YAML + "process_docs: !function utils.process\n")
    with pytest.raises(UserError) as e:
        resolve_tasks([str(path)])
    assert "!function" in _one_line(e)
    path = write_task(tmp_path, MC_ROWS, MC_YAML + "num_fewshots: 3\n", name="typo")
    with pytest.raises(UserError) as e:
        resolve_tasks([str(path)])
    assert "did you mean num_fewshot" in _one_line(e)


def test_builtins_read_the_hub_and_say_what_to_do_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(UserError) as e:
        resolve_tasks(["mmlu_anatomy"])
    message = _one_line(e)
    assert "cais/mmlu" in message and "--data-root" in message


# ------------------------------------------------------------------------------ GLUE-style metrics


def test_glue_style_classification_metrics(tmp_path, tiny_llama_dir):
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rows = [{"sentence": f"Review {i}: the film was {'great' if i % 3 else 'terrible'}.", "label": int(i % 3 > 0)}
            for i in range(12)]
    path = write_task(tmp_path, rows, """
task: sentiment
dataset_path: json
dataset_kwargs: {data_files: {validation: DATA}}
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{sentence}}\\nQuestion: Is this sentence positive or negative?\\nAnswer:"
doc_to_choice: ["negative", "positive"]
doc_to_target: label
metric_list: [{metric: acc}, {metric: f1}, {metric: mcc}]
""")
    result = run_harness(str(tiny_llama_dir), [str(path)])
    task = result.tasks["sentiment"]
    assert task.split == "validation"  # no test split: the validation split is evaluated, as in the harness
    golds, preds = [it["gold"][0] for it in task.items], [it["pred"] for it in task.items]
    assert task.metrics["f1"] == pytest.approx(sklearn_metrics.f1_score(golds, preds, zero_division=0))
    assert task.metrics["mcc"] == pytest.approx(sklearn_metrics.matthews_corrcoef(golds, preds))
    assert task.metrics["acc"] == pytest.approx(sklearn_metrics.accuracy_score(golds, preds))


def test_glue_style_generation_metrics(tmp_path, tiny_llama_dir, monkeypatch):
    stats = pytest.importorskip("scipy.stats")
    from peftlab.eval.harness import runner
    from peftlab.eval.harness.scoring import Generations

    rows = [{"a": f"sentence {i}", "b": f"other {i}", "score": s} for i, s in enumerate([0.0, 1.5, 2.0, 3.2, 4.0, 5.0])]
    path = write_task(tmp_path, rows, """
task: similarity
dataset_path: json
dataset_kwargs: {data_files: {test: DATA}}
test_split: test
doc_to_text: "{{a}} / {{b}}. Similarity (0-5):"
doc_to_target: "{{score}}"
generation_kwargs: {until: ["\\n"], max_gen_toks: 4}
metric_list: [{metric: pearson}, {metric: spearman}, {metric: exact_match, strip: true}, {metric: token_f1}]
""")
    said = [" 0.5", " 1.5 points", " 2.5", "about 3", " 4.0", "five"]  # the last has no number: left out

    def fake_generate(model, tokenizer, contexts, **kwargs):
        return Generations([said[int(c.split()[1])] for c in contexts], [2] * len(contexts), 0.1)

    monkeypatch.setattr(runner, "generate_until", fake_generate)
    task = run_harness(str(tiny_llama_dir), [str(path)]).tasks["similarity"]
    xs, ys = [0.0, 1.5, 2.0, 3.2, 4.0], [0.5, 1.5, 2.5, 3.0, 4.0]
    assert task.metrics["pearson"] == pytest.approx(stats.pearsonr(xs, ys)[0])
    assert task.metrics["spearman"] == pytest.approx(stats.spearmanr(xs, ys)[0])
    assert task.metrics["exact_match"] == pytest.approx(1 / 6)  # only " 4.0"
    assert task.main_metric == "exact_match" and [it["score"] for it in task.items] == [0, 0, 0, 0, 1, 0]


def test_templates_are_sandboxed(tmp_path):
    path = write_task(tmp_path, MC_ROWS, MC_YAML.replace("{{question}}", "{{question.__class__.__mro__}}"))
    with pytest.raises(UserError) as e:
        resolve_tasks([str(path)])
    assert "doc_to_text" in _one_line(e)


def test_prompt_tuning_adapter_scores_like_direct_forwards(tiny_llama_dir):
    from peftlab.peft.prompt_tuning import PromptTuningConfig, apply_prompt_tuning

    loaded = load_model(str(tiny_llama_dir))
    apply_prompt_tuning(loaded.model, PromptTuningConfig(num_virtual_tokens=5))
    loaded.model.eval()
    requests = [("Question: what is the capital of France?\nAnswer:", " Paris"), ("Hi", " Tom, are we on?")]
    batched = loglikelihoods(loaded.model, loaded.tokenizer, requests, is_seq2seq=False, batch_size=2)
    for request, result in zip(requests, batched):
        assert result.logprob == pytest.approx(_direct_logprob(loaded, *request), rel=1e-6, abs=1e-4)
