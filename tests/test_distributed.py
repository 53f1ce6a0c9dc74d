"""torchrun on CPU (gloo), 2 processes: DDP and FSDP2 training equal one process with the same global batch.

One process trains with ``--grad-accum 2``; two processes with ``--grad-accum 1`` each take one of a
step's two micro-batches, so every step sees the same examples. The loss curves and the saved model
or adapter must agree within 1e-5 relative (float sums in another order, nothing more). LoRA runs
use ``--dropout 0``: with dropout each rank draws its own masks (see ``training.distributed``).
Also: a killed distributed run resumes to the same result (under torchrun, and in one process: a
different world size), and ``peftlab harness`` on 2 processes gives one process's per-item results.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftlab.cli import main
from peftlab.training import checkpoint as ckpt
from helpers import expect_error, losses, write_dialogues

STEPS = 20
LORA = ["--rank", "4", "--dropout", "0", "--lr", "5e-3", "--targets", "q_proj,v_proj"]  # bf16 compute: few layers, tight tolerance
METHODS = {"full": ["--lr", "1e-3"], "lora": ["--method", "lora", *LORA],
           "lora-bf16": ["--method", "lora", "--dtype", "bfloat16", *LORA],  # frozen bfloat16 base, float32 adapters
           "qlora": ["--method", "qlora", *LORA]}  # a 4-bit NF4 base (bfloat16 compute) under float32 adapters
FINAL_FILE = {method: "adapter_model.safetensors" for method in METHODS} | {"full": "model.safetensors"}
RTOL, ATOL = 1e-5, 1e-7


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dialogues(tmp_path_factory.mktemp("data") / "d.jsonl", n=40)


def _args(model_dir, data, out, method, *extra) -> list[str]:
    return ["train", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--max-steps", str(STEPS),
            "--batch-size", "2", "--device", "cpu", "--eval-limit", "4", "--warmup-ratio", "0.1", *METHODS[method], *extra]


def _torchrun(args: list[str], **popen) -> subprocess.Popen:
    """``torchrun --standalone --nproc_per_node=2 -m peftlab ARGS`` (its own session: the test kills it whole)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "peftlab", *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **popen)


def _run(args: list[str]) -> str:
    proc = _torchrun(args)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    return out


def _close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and torch.allclose(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                                               rtol=RTOL, atol=0)


def _same_final(a: Path, b: Path, method: str) -> None:
    x, y = load_file(a / "final" / FINAL_FILE[method]), load_file(b / "final" / FINAL_FILE[method])
    assert x.keys() == y.keys()
    for k in x:
        assert torch.allclose(x[k], y[k], rtol=RTOL, atol=ATOL), (k, (x[k] - y[k]).abs().max())


@pytest.fixture(scope="module")
def single(tiny_llama_dir, data, tmp_path_factory) -> dict[str, Path]:
    """One process, --grad-accum 2: the reference of each method."""
    runs = {}
    for method in METHODS:
        out = tmp_path_factory.mktemp("single") / method
        assert main(_args(tiny_llama_dir, data, out, method, "--grad-accum", "2")) == 0
        runs[method] = out
    return runs


@pytest.mark.parametrize("parallel,method", [("ddp", "full"), ("ddp", "lora"), ("fsdp", "full"), ("fsdp", "lora"),
                                             ("fsdp", "lora-bf16"), ("fsdp", "qlora")])
def test_two_processes_train_as_one_with_the_same_global_batch(parallel, method, tiny_llama_dir, data, single, tmp_path):
    out = tmp_path / "run"
    printed = _run(_args(tiny_llama_dir, data, out, method, "--parallel", parallel))
    assert printed.count("trained 20 steps") == 1  # rank 0 alone speaks
    assert _close(losses(out), losses(single[method])), (losses(out), losses(single[method]))
    _same_final(out, single[method], method)
    info = json.loads((out / "run.json").read_text())
    assert info["distributed"] == {"parallel": parallel, "world_size": 2} and info["status"] == "finished"
    evals = [r["eval_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]
    ref = [r["eval_loss"] for r in map(json.loads, (single[method] / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]
    assert _close(evals, ref)


def _descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        for child in (task / "children").read_text().split():
            found += [int(child), *_descendants(int(child))]
    return found


def _kill_after_checkpoint(proc: subprocess.Popen, run: Path, step: int) -> None:
    """SIGKILL torchrun and its workers (by pid) once checkpoint ``step`` is complete."""
    deadline = time.monotonic() + 240
    while not (run / "checkpoints").is_dir() or ckpt.latest_checkpoint(run / "checkpoints") is None \
            or ckpt._step(ckpt.latest_checkpoint(run / "checkpoints")) < step:
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for pid in [*_descendants(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.communicate()


@pytest.mark.parametrize("parallel,resume_with,method", [("fsdp", "torchrun", "lora"), ("ddp", "one process", "lora"),
                                                          ("fsdp-sharded", "torchrun", "lora"), ("fsdp-sharded", "torchrun", "full")])
def test_a_killed_distributed_run_resumes_to_the_same_result(parallel, resume_with, method, tiny_llama_dir, data, single,
                                                             tmp_path):
    run = tmp_path / "run"
    sharded = parallel == "fsdp-sharded"  # each process writes its own shards (torch.distributed.checkpoint)
    parallel = "fsdp" if sharded else parallel
    args = _args(tiny_llama_dir, data, run, method, "--save-every", "1", "--parallel", parallel,
                 *(["--sharded-checkpoints"] if sharded else []))
    _kill_after_checkpoint(_torchrun(args), run, 8)
    assert not (run / "final").exists() and json.loads((run / "run.json").read_text())["status"] == "running"
    newest = ckpt.latest_checkpoint(run / "checkpoints")
    assert ckpt.is_sharded(newest) == sharded and (newest / "weights.safetensors").exists() != sharded
    if sharded:
        assert sorted(p.name for p in (newest / ckpt.SHARDED).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    resume = [a for a in args if a not in ("--parallel", parallel)] + ["--resume"]
    if resume_with == "torchrun":
        _run(resume + ["--parallel", parallel])
    else:  # the same global batch in one process: 2 micro-batches a step
        assert main(resume + ["--grad-accum", "2"]) == 0
    assert [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r] == list(range(1, STEPS + 1))
    assert _close(losses(run), losses(single[method]))
    _same_final(run, single[method], method)


def test_sharded_checkpoints_need_fsdp(tiny_llama_dir, data, tmp_path, capsys):
    message = expect_error(_args(tiny_llama_dir, data, tmp_path / "r", "lora", "--sharded-checkpoints"), capsys)
    assert "--sharded-checkpoints writes FSDP's shards" in message and not (tmp_path / "r").exists()


def test_resuming_with_another_global_batch_is_refused(tiny_llama_dir, data, tmp_path, capsys):
    run = tmp_path / "run"
    args = _args(tiny_llama_dir, data, run, "lora", "--max-steps", "2")
    info = {"status": "running", "config": {}, "distributed": {"parallel": "ddp", "world_size": 2}}
    assert main(args) == 0  # a finished one-process run, then made to look like an unfinished 2-process one
    stored = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**stored, **info, "config": stored["config"]}))
    assert main(args + ["--resume"]) == 2
    assert "--grad-accum x processes 2 -> 1" in capsys.readouterr().err


def test_parallel_without_torchrun_is_one_clear_line(tiny_llama_dir, data, tmp_path, capsys):
    assert main(_args(tiny_llama_dir, data, tmp_path / "r", "lora", "--parallel", "fsdp")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torchrun --nproc_per_node=N" in err[0] and not (tmp_path / "r").exists()


def test_harness_on_two_processes_gives_the_items_of_one(tiny_llama_dir, shared_data, tmp_path):
    args = ["harness", "--model", str(tiny_llama_dir), "--tasks", "mmlu_anatomy,bbh_boolean_expressions", "--data-root",
            str(shared_data), "--split", "val", "--limit", "5", "--max-gen-toks", "8", "--device", "cpu"]
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    _run(args + ["--out", str(tmp_path / "two")])
    one, two = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("one", "two"))
    for task, result in one["tasks"].items():
        ours = two["tasks"][task]
        assert ours["num_items"] == result["num_items"] == 5
        for a, b in zip(result["items"], ours["items"]):
            assert a.keys() == b.keys() and a["index"] == b["index"]
            for key in a:  # numbers from other batch shapes: equal to float rounding; the rest exactly
                numbers = isinstance(a[key], float) or (isinstance(a[key], list) and all(isinstance(v, float) for v in a[key]))
                assert a[key] == (pytest.approx(b[key], rel=RTOL, abs=1e-6) if numbers else b[key]), (task, key, a[key], b[key])
        assert result["metrics"] == pytest.approx(ours["metrics"], rel=RTOL, abs=1e-6)


def test_eval_on_two_processes_gives_the_predictions_of_one(tiny_llama_dir, single, data, tmp_path):
    """``peftlab eval`` under torchrun: each rank generates for its share of the prompts, rank 0 gathers
    them in order and scores; the predictions and metrics equal one process's."""
    args = ["eval", "--model", str(tiny_llama_dir), "--adapter", str(single["lora"] / "final"), "--data", str(data), "--split-fractions", "0,0,1",
            "--max-new-tokens", "6", "--batch-size", "4", "--device", "cpu"]
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    _run(args + ["--out", str(tmp_path / "two")])
    one, two = (tmp_path / "one", tmp_path / "two")
    rows = [[json.loads(x) for x in (d / "predictions.jsonl").read_text().splitlines()] for d in (one, two)]
    assert len(rows[0]) == 40 and [r["prediction"] for r in rows[0]] == [r["prediction"] for r in rows[1]]
    metrics = [json.loads((d / "metrics.json").read_text()) for d in (one, two)]
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "num_examples"):
        assert metrics[0][key] == metrics[1][key], key
