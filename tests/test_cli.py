"""The command line end to end: train -> eval -> generate on tiny models, configs, and user errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from peftlab.cli import main
from helpers import expect_error, write_dialogues

ROUGE = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "peftlab", *args], capture_output=True, text=True, env=env, timeout=300)


def test_train_eval_generate_through_the_cli(tiny_model_dir, tmp_path, capsys):
    data = write_dialogues(tmp_path / "d.jsonl", n=40)
    run = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(run),
                 "--max-steps", "80", "--batch-size", "8", "lr=3e-3", "--device", "cpu"]) == 0
    first, *_, last = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert last < 0.5 * first
    assert main(["eval", "--model", str(run / "final"), "--data", str(data), "--out", str(tmp_path / "ev"),
                 "--max-new-tokens", "24", "--device", "cpu", "--bootstrap", "50"]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    rows = [json.loads(x) for x in (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == metrics["num_examples"] == 4  # the 10% test split of 40
    assert all(0 <= metrics[k] <= 1 for k in ROUGE) and "nrefs:1" in metrics["bleu_signature"]
    assert metrics["rouge1"] == pytest.approx(sum(r["scores"]["rouge1"]["fmeasure"] for r in rows) / len(rows))
    assert metrics["rouge1"] > 0.3, rows  # 80 overfitting steps learned the summary pattern
    out = capsys.readouterr().out
    assert "| rouge1" in out and "predictions.jsonl" in out
    assert main(["generate", "--model", str(run / "final"), "--prompt", "Summarize the following conversation.\n\nHi",
                 "--max-new-tokens", "5", "--device", "cpu"]) == 0


def test_recipe_file_and_overrides(tiny_llama_dir, tmp_path):
    data = write_dialogues(tmp_path / "d.jsonl", n=16)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tiny_llama_dir}\ndata: {data}\nmax-steps: 3\nbatch_size: 4\nlr: 1.0e-3\n")
    assert main(["train", "--config", str(recipe), "--out", str(tmp_path / "run"), "max_steps=2", "--device", "cpu"]) == 0
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["config"]["max_steps"] == 2 and info["config"]["batch_size"] == 4 and info["config"]["lr"] == 1e-3


def test_help_lists_every_option():
    result = run_cli("train", "--help")
    assert result.returncode == 0
    for option in ("--model", "--data", "--out", "--method", "--template", "--max-steps", "--epochs", "--batch-size",
                   "--lr", "--seed", "--save-every", "--resume", "--overwrite", "--config"):
        assert option in result.stdout


def test_user_errors_are_one_line_exit_2(tiny_llama_dir, tmp_path, capsys):
    model, out = str(tiny_llama_dir), str(tmp_path / "o")
    data = write_dialogues(tmp_path / "d.jsonl", n=12)
    train = ["train", "--model", model, "--out", out, "--device", "cpu", "--max-steps", "1"]
    assert "not found" in expect_error(train + ["--data", str(tmp_path / "missing.jsonl")], capsys)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"dialogue": "a", "summary": "b"}\n{"dialogue": oops}\n')
    assert "line 2" in expect_error(train + ["--data", str(bad)], capsys)
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"dialogue": "a", "summary": "b"}\n' * 5 + '{"dialogue": "a"}\n')
    assert "summary" in expect_error(train + ["--data", str(nofield), "--split-fractions", "1,0,0"], capsys)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "empty" in expect_error(train + ["--data", str(empty)], capsys)
    assert "sum" in expect_error(train + ["--data", str(data), "--split-fractions", "0.5,0.2,0.2"], capsys)
    assert "smollm2-135m-instruct" in expect_error(["train", "--model", "smolm2", "--data", str(data), "--out", out], capsys)
    assert "--lr" in expect_error(train + ["--data", str(data), "--lr", "fast"], capsys)
    assert "did you mean 'batch_size'" in expect_error(train + ["--data", str(data), "batchsize=2"], capsys)
    assert not os.path.exists(out)  # nothing was started by a failed command


def test_existing_run_is_refused_then_replaced_whole(tiny_llama_dir, tmp_path, capsys):
    data = write_dialogues(tmp_path / "d.jsonl", n=12)
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_llama_dir), "--data", str(data), "--out", str(out), "--device", "cpu", "--batch-size", "4"]
    assert main(args + ["--max-steps", "1"]) == 0
    capsys.readouterr()
    before = (out / "run.json").read_text()
    assert "--overwrite" in expect_error(args + ["--max-steps", "2"], capsys)
    assert (out / "run.json").read_text() == before  # untouched
    # an overwrite that fails midway leaves the old run as it was
    assert "--lr" in expect_error(args + ["--max-steps", "2", "--overwrite", "--lr", "-1"], capsys)
    assert (out / "run.json").read_text() == before
    assert main(args + ["--max-steps", "2", "--overwrite"]) == 0
    assert json.loads((out / "run.json").read_text())["config"]["max_steps"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.")]  # no staging left behind


def test_module_entry_point_errors_without_traceback(tmp_path):
    result = run_cli("eval", "--model", "./nowhere", "--data", "x.jsonl", "--out", str(tmp_path / "e"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_score_command(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("It is very cold outside\ncold cold cold cold\n")
    (tmp_path / "r.txt").write_text("It is cold outside.\nIt is cold outside.\n")
    per = tmp_path / "per.jsonl"
    assert main(["score", "--predictions", str(tmp_path / "p.txt"), "--references", str(tmp_path / "r.txt"),
                 "--per-example", str(per), "--json", str(tmp_path / "m.json")]) == 0
    rows = [json.loads(x) for x in per.read_text().splitlines()]
    assert rows[0]["rouge1"]["recall"] == 1.0 and rows[0]["rouge1"]["precision"] == pytest.approx(0.8)
    assert rows[1]["rouge1"]["precision"] == pytest.approx(0.25)
    assert set(rows[0]) == {*ROUGE, "bleu"}
    assert json.loads((tmp_path / "m.json").read_text())["num_examples"] == 2
    assert "| rouge1" in capsys.readouterr().out


def test_generate_input_takes_prompt_objects(tiny_llama_dir, tmp_path, capsys):
    prompts = tmp_path / "in.jsonl"
    prompts.write_text(json.dumps({"prompt": "Summarize: hi", "id": 1}) + "\n" + json.dumps({"text": "Hello"}) + "\n"
                       + json.dumps("a plain string") + "\n")
    assert main(["generate", "--model", str(tiny_llama_dir), "--input", str(prompts), "--max-new-tokens", "3", "--device", "cpu"]) == 0
    assert len([json.loads(line)["text"] for line in capsys.readouterr().out.splitlines()]) == 3


def test_eval_of_a_separate_test_file_needs_no_train_split(tiny_llama_dir, tmp_path, capsys):
    data = write_dialogues(tmp_path / "test.jsonl", n=6)
    assert main(["eval", "--model", str(tiny_llama_dir), "--data", str(data), "--split-fractions", "0,0,1", "--out", str(tmp_path / "ev"),
                 "--max-new-tokens", "2", "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["num_examples"] == 6
    message = expect_error(["eval", "--model", str(tiny_llama_dir), "--data", str(data), "--split-fractions", "0,0,1", "--fewshot", "2",
                            "--out", str(tmp_path / "ev2"), "--device", "cpu"], capsys)
    assert "--fewshot 2 takes its examples from the train split, which has 0" in message


def test_score_outputs_never_overwrite_inputs_and_create_their_folder(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("It is cold\n")
    (tmp_path / "r.txt").write_text("It is cold outside\n")
    args = ["score", "--predictions", str(tmp_path / "p.txt"), "--references", str(tmp_path / "r.txt")]
    assert "--predictions input" in expect_error(args + ["--json", str(tmp_path / "p.txt")], capsys)
    assert "--references input" in expect_error(args + ["--per-example", str(tmp_path / "." / "r.txt")], capsys)
    assert (tmp_path / "p.txt").read_text() == "It is cold\n" and (tmp_path / "r.txt").read_text() == "It is cold outside\n"
    assert main(args + ["--json", str(tmp_path / "new" / "deeper" / "m.json")]) == 0
    assert json.loads((tmp_path / "new" / "deeper" / "m.json").read_text())["num_examples"] == 1


def test_demo_and_compare_exit_2_when_a_method_did_not_run(tmp_path, monkeypatch, capsys):
    from peftlab import api
    from peftlab.experiment.compare import ExperimentResult

    rows = [{"label": "base", "method": "base", "rouge1": 0.5, "rouge2": 0.1, "rougeL": 0.4, "rougeLsum": 0.4, "bleu": 0.1,
             "trainable": 0, "total": None, "percent": 0.0, "adapter_bytes": 0, "eval_latency_s": 0.1, "eval_tokens_per_second": 9.0},
            {"label": "lora", "method": "lora", "error": "'peftlab train' failed: out of luck"}]
    result = ExperimentResult(tmp_path, rows, [])
    monkeypatch.setattr(api, "demo", lambda config, log: result)
    monkeypatch.setattr(api, "compare", lambda config, log: result)
    for args in (["demo", "--out", str(tmp_path)], ["compare", "--model", "m", "--data", "d", "--out", str(tmp_path)]):
        code = main(args)
        printed = capsys.readouterr()
        assert code == 2 and "| base" in printed.out and "not run: lora: 'peftlab train' failed: out of luck" in printed.out
        assert printed.err.strip() == "peftlab: error: 1 of 2 requested variants did not run: lora (why: the 'not run' lines above); " \
                                      "the tables hold the others"
