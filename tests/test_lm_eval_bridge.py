"""The lm-evaluation-harness bridge: lm-eval's model ``peftlab`` (a tiny Llama with a peftlab
bottleneck adapter, a format peft cannot read) evaluated by lm-eval's Python entry point, by its
CLI, and by ``peftlab harness --backend lm-eval``, on a local task; the numbers equal
``peftlab harness``'s own. Nothing touches the hub: the task reads a local jsonl file."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness (the lm-eval extra) is not installed")

from peftlab.cli import main
from peftlab.config import HarnessConfig, HolisticConfig
from peftlab.errors import UserError
from peftlab.eval.harness import run_harness
from peftlab.models import load_model
from peftlab.peft import (
    BottleneckConfig,
    adapter_parameters,
    apply_bottleneck,
    save_adapter,
)

TASK = "bridge_mc"
TOL = 1e-4


@pytest.fixture(scope="module")
def adapter_dir(tiny_llama_dir, tmp_path_factory):
    """A bottleneck adapter with random (not identity) weights, so it changes the model's scores."""
    loaded = load_model(str(tiny_llama_dir))
    config = BottleneckConfig(reduction_factor=4)
    model = apply_bottleneck(loaded.model, config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    out = tmp_path_factory.mktemp("bottleneck")
    save_adapter(model, out, config, base_model_name_or_path=str(tiny_llama_dir))
    return out


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """One local multiple-choice task (10 items, 3 or 4 choices): a YAML file and its jsonl data."""
    folder = tmp_path_factory.mktemp("lm-eval-tasks")
    colours = ["red", "green", "blue", "yellow", "purple"]
    rows = []
    for i in range(10):
        options = [colours[(i + j) % len(colours)] for j in range(3 + i % 2)]
        rows.append({"question": f"Tom painted fence {i} {options[i % len(options)]}. What colour is fence {i}?",
                     "options": options, "label": i % len(options)})
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{TASK}.yaml").write_text(f"""
task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files: {{test: {json.dumps(str(folder / "data.jsonl"))}}}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{options}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    return folder


@pytest.fixture(scope="module")
def ours(tiny_llama_dir, adapter_dir, task_dir):
    """``peftlab harness`` (its own scorer) on the task YAML."""
    return run_harness(str(tiny_llama_dir), [str(task_dir / f"{TASK}.yaml")], adapter=str(adapter_dir), batch_size=4)


def assert_same(mine, acc: float, acc_norm: float, samples: list[dict] | None = None) -> None:
    assert mine.num_items == 10
    assert mine.metrics["acc"] == pytest.approx(acc, abs=1e-12), "acc differs from peftlab harness"
    assert mine.metrics["acc_norm"] == pytest.approx(acc_norm, abs=1e-12), "acc_norm differs from peftlab harness"
    for s in samples or []:
        item = mine.items[s["doc_id"]]
        args = s["arguments"]  # a list in memory; {"gen_args_0": {"arg_0": context, "arg_1": continuation}} on disk
        context = args[0][0] if isinstance(args, list) else next(iter(args.values()))["arg_0"]
        assert item["prompt"] == context
        assert item["loglikelihoods"] == pytest.approx([float(r[0]) for r in s["filtered_resps"]], abs=TOL)
        assert (item["acc"], item["acc_norm"]) == (s["acc"], s["acc_norm"]), f"document {s['doc_id']}"


def test_the_adapter_changes_the_scores(tiny_llama_dir, task_dir, ours):
    base = run_harness(str(tiny_llama_dir), [str(task_dir / f"{TASK}.yaml")], batch_size=4).tasks[TASK]
    deltas = [abs(a - b) for x, y in zip(base.items, ours.tasks[TASK].items)
              for a, b in zip(x["loglikelihoods"], y["loglikelihoods"])]
    assert max(deltas) > 0.1, "the perturbed bottleneck adapter should move the log-likelihoods"


def test_simple_evaluate_with_model_peftlab_equals_peftlab_harness(tiny_llama_dir, adapter_dir, task_dir, ours):
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    import peftlab.eval.lm_eval_bridge  # noqa: F401  registers "peftlab"

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    assert get_model("hf").__name__ == "HFLM", "lm-eval's own models must stay reachable"
    out = lm_eval.simple_evaluate(model="peftlab", model_args=f"model={tiny_llama_dir},adapter={adapter_dir},device=cpu",
                                  tasks=[TASK], task_manager=TaskManager(include_path=str(task_dir)), batch_size=4,
                                  log_samples=True)
    result = out["results"][TASK]
    print(f"\nlm_eval.simple_evaluate(model='peftlab'): acc {result['acc,none']:.4f} acc_norm {result['acc_norm,none']:.4f}"
          f"; peftlab harness: acc {ours.tasks[TASK].metrics['acc']:.4f} acc_norm {ours.tasks[TASK].metrics['acc_norm']:.4f}")
    assert out["config"]["peftlab_adapter"] == str(adapter_dir)
    assert_same(ours.tasks[TASK], result["acc,none"], result["acc_norm,none"], out["samples"][TASK])
    assert result["acc_stderr,none"] == pytest.approx(ours.tasks[TASK].stderr["acc"], rel=1e-9)


def test_lm_eval_cli_with_model_peftlab_equals_peftlab_harness(tiny_llama_dir, adapter_dir, task_dir, ours, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "peftlab.eval.lm_eval_bridge", "run", "--model", "peftlab",
               "--model_args", f"model={tiny_llama_dir},adapter={adapter_dir}", "--tasks", TASK,
               "--include_path", str(task_dir), "--device", "cpu", "--batch_size", "4",
               "--output_path", str(tmp_path / "out"), "--log_samples"]
    done = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    print("\n" + done.stdout.strip())
    [results_file] = (tmp_path / "out").rglob("results_*.json")
    result = json.loads(results_file.read_text())["results"][TASK]
    [samples_file] = (tmp_path / "out").rglob(f"samples_{TASK}_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert_same(ours.tasks[TASK], result["acc,none"], result["acc_norm,none"], samples)


def test_harness_backend_lm_eval_equals_backend_peftlab(tiny_llama_dir, adapter_dir, task_dir, ours, capsys):
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    theirs = run_harness(str(tiny_llama_dir), [str(task_dir / f"{TASK}.yaml")], adapter=str(adapter_dir),
                         batch_size=4, backend="lm-eval")
    assert theirs.settings["backend"] == "lm-eval"
    assert_same(ours.tasks[TASK], theirs.tasks[TASK].metrics["acc"], theirs.tasks[TASK].metrics["acc_norm"])
    for a, b in zip(ours.tasks[TASK].items, theirs.tasks[TASK].items):
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=TOL)
        assert (a["acc"], a["acc_norm"], a["score"]) == (b["acc"], b["acc_norm"], b["score"])
    assert [(r["task"], r["metric"], r["n"]) for r in ours.rows()] == [(r["task"], r["metric"], r["n"]) for r in theirs.rows()]
    for mine, other in zip(ours.rows(), theirs.rows()):
        assert mine["value"] == pytest.approx(other["value"], abs=1e-12)
        assert mine["stderr"] == pytest.approx(other["stderr"], rel=1e-9)

    code = main(["harness", "--backend", "lm-eval", "--model", str(tiny_llama_dir), "--adapter", str(adapter_dir),
                 "--tasks", str(task_dir / f"{TASK}.yaml"), "--batch-size", "4", "--device", "cpu"])
    printed = capsys.readouterr().out
    print(printed)
    assert code == 0 and TASK in printed and f"{ours.tasks[TASK].metrics['acc']:.4f}"[:4] in printed


def test_backend_lm_eval_refusals(tiny_llama_dir, task_dir, monkeypatch, capsys):
    import importlib.util

    with pytest.raises(UserError, match="--data-root is for peftlab's own tasks"):
        run_harness(str(tiny_llama_dir), ["mmlu_anatomy"], data_root="/nowhere", backend="lm-eval")
    with pytest.raises(UserError, match="lm-eval has no task, group or tag named 'no_such_task'"):
        run_harness(str(tiny_llama_dir), ["no_such_task"], backend="lm-eval")
    with pytest.raises(UserError, match="--backend lm-eval is for peftlab harness only"):
        HolisticConfig(model="m", tasks="t", backend="lm-eval")
    assert HarnessConfig(model="m", tasks="t").backend == "peftlab"

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    assert main(["harness", "--backend", "lm-eval", "--model", str(tiny_llama_dir),
                 "--tasks", str(task_dir / f"{TASK}.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'peftlab[lm-eval]'" in err[0], err
