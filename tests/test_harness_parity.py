"""Parity with lm-evaluation-harness (the reference implementation, a test-only dependency).

The same documents go through lm-eval's ``simple_evaluate`` (``HFLM`` around the very same model
object) and through peftlab's harness; per item we compare the prompt, the loglikelihood of each
choice (within 1e-4), acc / acc_norm, and for generation the text and exact match.

lm-eval side: a local multiple-choice task is one YAML file that both read; MMLU is lm-eval's own
``mmlu_<subject>`` config with its data source pointed at ``shared/data/mmlu`` CSV files; BBH is
lm-eval's ``bbh_zeroshot_boolean_expressions`` pointed at ``shared/data/bbh``.
Run with ``-s`` to see the side-by-side numbers.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness (test-only reference) is not installed")

from peftlab.errors import UserError  # noqa: E402
from peftlab.eval.harness import evaluate_task, resolve_tasks  # noqa: E402
from peftlab.eval.harness.runner import chat_format  # noqa: E402
from peftlab.models import load_model  # noqa: E402

LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"
MMLU_SUBJECT = "anatomy"
TOL = 1e-4


# --------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory) -> dict[str, Path]:
    """Two local multiple-choice tasks, one YAML file each, read by both harnesses."""
    folder = tmp_path_factory.mktemp("local-mc")
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    train, test = [], []
    for i in range(18):
        options = [colours[(i + j) % len(colours)] for j in range(3 + i % 2)]  # 3 or 4 choices
        row = {"question": f"Which colour is item {i} painted in, if it matches the {options[i % len(options)]} paint?",
               "options": options, "label": i % len(options)}
        (train if i < 8 else test).append(row)
    for name, rows in (("train", train), ("test", test)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    files = {"train": str(folder / "train.jsonl"), "test": str(folder / "test.jsonl")}
    # Few-shot from the training split (seeded random sample), label as an index into a field's list.
    (folder / "local_mc.yaml").write_text(f"""
task: local_mc
dataset_path: json
dataset_kwargs:
  data_files: {json.dumps(files)}
training_split: train
test_split: test
output_type: multiple_choice
description: "Answer each question about paint.\\n\\n"
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{options}}}}"
doc_to_target: label
num_fewshot: 3
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    # Few-shot from the evaluated split itself (the document is left out), target given as text,
    # choices from a field name, custom delimiters.
    (folder / "local_mc_text.yaml").write_text(f"""
task: local_mc_text
dataset_path: json
dataset_kwargs:
  data_files: {json.dumps({"test": files["test"]})}
test_split: test
fewshot_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: options
doc_to_target: "{{{{options[label]}}}}"
target_delimiter: " => "
fewshot_delimiter: "\\n###\\n"
num_fewshot: 2
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    return {"local_mc": folder / "local_mc.yaml", "local_mc_text": folder / "local_mc_text.yaml"}


def _mmlu_reference_config(shared_data: Path) -> dict:
    """lm-eval's own ``mmlu_<subject>`` config, reading the val/dev CSV files instead of the hub."""
    import datasets
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(LM_EVAL_TASKS / "mmlu" / "default" / f"mmlu_{MMLU_SUBJECT}.yaml")
    columns = ["question", "A", "B", "C", "D", "answer"]

    def to_cais_format(dataset):  # the hub's cais/mmlu schema
        return dataset.map(lambda d: {"question": d["question"], "subject": MMLU_SUBJECT,
                                      "choices": [d["A"], d["B"], d["C"], d["D"]], "answer": "ABCD".index(d["answer"])},
                           remove_columns=columns)

    files = {"test": str(shared_data / "mmlu" / "val" / f"{MMLU_SUBJECT}_val.csv"),
             "dev": str(shared_data / "mmlu" / "dev" / f"{MMLU_SUBJECT}_dev.csv")}
    config.update(
        dataset_path="csv", dataset_name=None, process_docs=to_cais_format,
        dataset_kwargs={"data_files": files, "column_names": columns, "keep_default_na": False,
                        "features": datasets.Features({c: datasets.Value("string") for c in columns})},
        metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}],
    )
    return config


def _bbh_reference_config(shared_data: Path, max_gen_toks: int) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(LM_EVAL_TASKS / "bbh" / "zeroshot" / "boolean_expressions.yaml", resolve_func=False)
    config.pop("filter_list", None)  # strict-match only: the harness's default 'take_first'
    config.update(dataset_path="json", dataset_name=None,
                  dataset_kwargs={"data_files": {"test": str(shared_data / "bbh" / "boolean_expressions.json")},
                                  "field": "examples"})
    config["generation_kwargs"] = {**config["generation_kwargs"], "max_gen_toks": max_gen_toks}
    return config


def run_reference(loaded, configs: list, *, limit: int | None, num_fewshot: int | None = None,
                  batch_size: int = 4, apply_chat_template: bool = False) -> dict[str, dict[int, dict]]:
    """lm-eval's samples per task, by document id."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size,
              backend="seq2seq" if loaded.is_seq2seq else "causal")
    manager = TaskManager(include_defaults=False)
    out = lm_eval.simple_evaluate(model=lm, tasks=configs, task_manager=manager, limit=limit,
                                  num_fewshot=num_fewshot, log_samples=True, bootstrap_iters=0,
                                  apply_chat_template=apply_chat_template)
    return {name: {s["doc_id"]: s for s in samples} for name, samples in out["samples"].items()}


def ours(loaded, names: list[str], *, shared_data: Path, limit: int | None, split: str | None = None,
         max_gen_toks: int | None = None, num_fewshot: int | None = None, batch_size: int = 4,
         apply_chat_template: bool = False):
    tasks = resolve_tasks(names, data_root=shared_data, split=split)
    chat = chat_format(loaded, apply_chat_template)
    return {t.name: evaluate_task(loaded, t, limit=limit, max_gen_toks=max_gen_toks, num_fewshot=num_fewshot,
                                  batch_size=batch_size, chat=chat) for t in tasks}


# ------------------------------------------------------------------------------------- comparison


def assert_choices_match(label: str, mine, reference: dict[int, dict]) -> None:
    worst = 0.0
    print(f"\n[{label}] {mine.task}: {len(mine.items)} items")
    print(f"  {'doc':>3}  {'choice':>6}  {'lm-eval ll':>14}  {'peftlab ll':>14}  {'|diff|':>9}")
    for item in mine.items:
        ref = reference[item["index"]]
        assert item["prompt"] == ref["arguments"][0][0], f"prompt of document {item['index']} differs"
        ref_lls = [r[0] for r in ref["filtered_resps"]]
        assert len(ref_lls) == len(item["loglikelihoods"])
        for j, (a, b) in enumerate(zip(ref_lls, item["loglikelihoods"])):
            worst = max(worst, abs(a - b))
            if item["index"] < 3:
                print(f"  {item['index']:>3}  {j:>6}  {a:>14.6f}  {b:>14.6f}  {abs(a - b):>9.2e}")
        assert item["is_greedy"] == [bool(r[1]) for r in ref["filtered_resps"]]
        assert item["acc"] == ref["acc"], f"acc of document {item['index']}"
        assert item["acc_norm"] == ref["acc_norm"], f"acc_norm of document {item['index']}"
    acc = sum(r["acc"] for r in reference.values()) / len(reference)
    acc_norm = sum(r["acc_norm"] for r in reference.values()) / len(reference)
    print(f"  max |diff| = {worst:.2e};  acc lm-eval {acc:.4f} peftlab {mine.metrics['acc']:.4f};  "
          f"acc_norm lm-eval {acc_norm:.4f} peftlab {mine.metrics['acc_norm']:.4f}")
    assert worst < TOL
    assert math.isclose(acc, mine.metrics["acc"]) and math.isclose(acc_norm, mine.metrics["acc_norm"])


def assert_generations_match(label: str, mine, reference: dict[int, dict]) -> None:
    print(f"\n[{label}] {mine.task}: {len(mine.items)} items")
    for item in mine.items:
        ref = reference[item["index"]]
        assert item["prompt"] == ref["arguments"][0][0]
        print(f"  doc {item['index']}: lm-eval {ref['filtered_resps'][0]!r:<28} peftlab {item['generation']!r:<28} "
              f"target {item['references'][0]!r}  em {ref['exact_match']} / {item['exact_match']}")
        assert item["generation"] == ref["filtered_resps"][0]
        assert item["exact_match"] == ref["exact_match"]
    em = sum(r["exact_match"] for r in reference.values()) / len(reference)
    print(f"  exact_match lm-eval {em:.4f} peftlab {mine.metrics['exact_match']:.4f}")
    assert math.isclose(em, mine.metrics["exact_match"])


# ------------------------------------------------------------------------------------------ tests


def test_tiny_llama_matches_lm_eval(tiny_llama_dir, shared_data, local_tasks):
    loaded = load_model(str(tiny_llama_dir))
    configs = [str(local_tasks["local_mc"]), str(local_tasks["local_mc_text"]), _mmlu_reference_config(shared_data),
               _bbh_reference_config(shared_data, max_gen_toks=6)]
    reference = run_reference(loaded, configs, limit=6)
    mine = ours(loaded, [str(p) for p in local_tasks.values()], shared_data=shared_data, limit=6)
    mine |= ours(loaded, [f"mmlu_{MMLU_SUBJECT}"], shared_data=shared_data, limit=6, split="val")
    mine |= ours(loaded, ["bbh_boolean_expressions"], shared_data=shared_data, limit=6, max_gen_toks=6)
    for name in ("local_mc", "local_mc_text", f"mmlu_{MMLU_SUBJECT}"):
        assert_choices_match("tiny llama", mine[name], reference[name])
    assert_generations_match("tiny llama", mine["bbh_boolean_expressions"], reference["bbh_zeroshot_boolean_expressions"])


def test_tiny_llama_five_shot_mmlu_matches_lm_eval(tiny_llama_dir, shared_data):
    loaded = load_model(str(tiny_llama_dir))
    reference = run_reference(loaded, [_mmlu_reference_config(shared_data)], limit=4, num_fewshot=5)
    mine = ours(loaded, [f"mmlu_{MMLU_SUBJECT}"], shared_data=shared_data, limit=4, split="val", num_fewshot=5)
    assert_choices_match("tiny llama, 5-shot", mine[f"mmlu_{MMLU_SUBJECT}"], reference[f"mmlu_{MMLU_SUBJECT}"])


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_tiny_llama_with_chat_template_matches_lm_eval(tiny_llama_dir, shared_data):
    """--apply-chat-template: description as system message, shots + question as one user message,
    bare choices as continuations; prompts, log-likelihoods and generations equal lm-eval's."""
    loaded = load_model(str(tiny_llama_dir))
    loaded.tokenizer.chat_template = CHATML
    reference = run_reference(loaded, [_mmlu_reference_config(shared_data)], limit=4, num_fewshot=2,
                              apply_chat_template=True)
    reference |= run_reference(loaded, [_bbh_reference_config(shared_data, max_gen_toks=6)], limit=4,
                               apply_chat_template=True)
    mine = ours(loaded, [f"mmlu_{MMLU_SUBJECT}"], shared_data=shared_data, limit=4, split="val", num_fewshot=2,
                apply_chat_template=True)
    mine |= ours(loaded, ["bbh_boolean_expressions"], shared_data=shared_data, limit=4, max_gen_toks=6,
                 apply_chat_template=True)
    mmlu = mine[f"mmlu_{MMLU_SUBJECT}"]
    assert mmlu.items[0]["prompt"].startswith("<|im_start|>system\nThe following are multiple choice questions")
    assert mmlu.items[0]["prompt"].endswith("Answer:<|im_end|>\n<|im_start|>assistant\n")
    assert reference[f"mmlu_{MMLU_SUBJECT}"][0]["arguments"][0][1] == "A"  # no target delimiter
    assert_choices_match("tiny llama, chat", mmlu, reference[f"mmlu_{MMLU_SUBJECT}"])
    assert_generations_match("tiny llama, chat", mine["bbh_boolean_expressions"],
                             reference["bbh_zeroshot_boolean_expressions"])


def test_chat_template_missing_is_one_line(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir))
    loaded.tokenizer.chat_template = None
    with pytest.raises(UserError, match="no chat template; drop --apply-chat-template"):
        chat_format(loaded, True)


def test_tiny_t5_matches_lm_eval(tiny_t5_dir, shared_data, local_tasks):
    loaded = load_model(str(tiny_t5_dir))
    reference = run_reference(loaded, [str(local_tasks["local_mc"]), _mmlu_reference_config(shared_data)], limit=5)
    mine = ours(loaded, [str(local_tasks["local_mc"])], shared_data=shared_data, limit=5)
    mine |= ours(loaded, [f"mmlu_{MMLU_SUBJECT}"], shared_data=shared_data, limit=5, split="val")
    for name in ("local_mc", f"mmlu_{MMLU_SUBJECT}"):
        assert_choices_match("tiny t5", mine[name], reference[name])


@pytest.mark.slow
def test_embedded_model_matches_lm_eval(embedded_model_dir, shared_data, local_tasks):
    loaded = load_model(str(embedded_model_dir))
    configs = [str(local_tasks["local_mc"]), _mmlu_reference_config(shared_data)]
    reference = run_reference(loaded, configs, limit=10, batch_size=8)
    reference |= run_reference(loaded, [_bbh_reference_config(shared_data, 8)], limit=5, batch_size=8)
    mine = ours(loaded, [str(local_tasks["local_mc"])], shared_data=shared_data, limit=10, batch_size=8)
    mine |= ours(loaded, [f"mmlu_{MMLU_SUBJECT}"], shared_data=shared_data, limit=10, split="val", batch_size=8)
    mine |= ours(loaded, ["bbh_boolean_expressions"], shared_data=shared_data, limit=5, max_gen_toks=8, batch_size=8)
    for name in ("local_mc", f"mmlu_{MMLU_SUBJECT}"):
        assert_choices_match("SmolLM2-135M", mine[name], reference[name])
    assert_generations_match("SmolLM2-135M", mine["bbh_boolean_expressions"], reference["bbh_zeroshot_boolean_expressions"])
