"""--report-to tensorboard,mlflow: the trackers' own readers give back what metrics.jsonl holds."""

from __future__ import annotations

import importlib.util
import json

import pytest

from helpers import expect_error, write_dialogues
from peftlab.cli import main

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _tensorboard_series(folder, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def _mlflow_client(store):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{store / 'mlflow' / 'mlflow.db'}")


def test_train_reports_to_tensorboard_and_mlflow(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = write_dialogues(tmp_path / "d.jsonl", n=24)
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_llama_dir), "--data", str(data), "--out", str(out), "--method", "lora",
                 "--max-steps", "4", "--batch-size", "4", "--eval-every", "2", "--device", "cpu",
                 "--report-to", "tensorboard,mlflow"]) == 0
    records = _metrics(out)
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    assert len(losses) == 4 and len(evals) == 2

    # TensorBoard's own event reader (float32 in the event file)
    assert [s for s, _ in _tensorboard_series(out / "tensorboard", "loss")] == [s for s, _ in losses]
    assert [v for _, v in _tensorboard_series(out / "tensorboard", "loss")] == pytest.approx([v for _, v in losses], rel=1e-6)
    assert [v for _, v in _tensorboard_series(out / "tensorboard", "eval_loss")] == pytest.approx([v for _, v in evals], rel=1e-6)

    # MLflow's client: the run named in run.json, its loss history, its hyperparameters, its final results
    info = json.loads((out / "run.json").read_text())
    client = _mlflow_client(out)
    run_id = info["tracking"]["mlflow_run_id"]
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
    assert history == losses  # float64 in MLflow: exactly equal
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "eval_loss")) == evals
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["method"] == "lora" and run.data.params["rank"] == "8" and run.data.params["max_steps"] == "4"
    assert run.data.metrics["final/train_loss"] == pytest.approx(info["result"]["train_loss"])
    for key in ("lr", "grad_norm", "tokens_per_sec"):
        assert len(client.get_metric_history(run_id, key)) == 4


def test_no_tracker_unless_asked(tiny_llama_dir, tmp_path):
    data = write_dialogues(tmp_path / "d.jsonl", n=12)
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_llama_dir), "--data", str(data), "--out", str(out), "--max-steps", "1",
                 "--batch-size", "4", "--device", "cpu"]) == 0
    assert not (out / "tensorboard").exists() and not (out / "mlflow").exists()


def test_missing_tracker_package_is_one_line(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    data = write_dialogues(tmp_path / "d.jsonl", n=12)
    args = ["train", "--model", str(tiny_llama_dir), "--data", str(data), "--out", str(tmp_path / "run"), "--max-steps", "1"]
    assert "needs the mlflow package" in expect_error(args + ["--report-to", "mlflow"], capsys)
    assert "not a tracker" in expect_error(args + ["--report-to", "wandb"], capsys)
    assert not (tmp_path / "run").exists()


def test_compare_variants_are_runs_of_one_experiment(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = write_dialogues(tmp_path / "d.jsonl", n=20)
    out = tmp_path / "cmp"
    assert main(["compare", "--model", str(tiny_llama_dir), "--data", str(data), "--out", str(out),
                 "--methods", "base,lora,ia3", "--max-steps", "2", "--batch-size", "4", "--test-limit", "2",
                 "--max-new-tokens", "4", "--latency-examples", "0", "--device", "cpu",
                 "--report-to", "tensorboard,mlflow"]) == 0
    client = _mlflow_client(out)
    experiment = client.get_experiment_by_name("cmp")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert {"base", "lora", "ia3", "report"} <= set(runs)
    results = {row["label"]: row for row in json.loads((out / "results.json").read_text())["rows"]}
    for label in ("base", "lora", "ia3"):
        assert runs[label].data.metrics["rouge1"] == pytest.approx(results[label]["rouge1"])
    lora_run = out / "variants" / "lora" / "run"
    losses = [(r["step"], r["loss"]) for r in _metrics(lora_run) if "loss" in r]
    history = sorted((m.step, m.value) for m in client.get_metric_history(runs["lora"].info.run_id, "loss"))
    assert history == losses
    artifacts = [a.path for a in client.list_artifacts(runs["report"].info.run_id)]
    assert "report.html" in artifacts and any(a.endswith(".png") for a in artifacts)
    assert _tensorboard_series(lora_run / "tensorboard", "loss")
