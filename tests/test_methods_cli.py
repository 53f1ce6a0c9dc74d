"""Every --method through the CLI (train -> final/ -> eval --adapter), inspect-prompt, templates, forgetting."""

from __future__ import annotations

import json

import pytest

from peftlab.cli import main
from helpers import expect_error, losses, write_dialogues

METHODS = [("adapter", ["--adapter-placement", "pfeiffer"]), ("prompt", ["--num-virtual-tokens", "4"]),
           ("prefix", ["--num-virtual-tokens", "4"]), ("ia3", []), ("layernorm", []),
           ("selective", ["--train-modules", "o_proj", "--train-layers", "1"])]


@pytest.mark.parametrize("method,extra", METHODS, ids=[m for m, _ in METHODS])
def test_method_trains_and_evaluates_through_the_cli(method, extra, tiny_llama_dir, tmp_path, capsys):
    data = write_dialogues(tmp_path / "d.jsonl", n=16)
    run = tmp_path / "run"
    assert main(["train", "--model", str(tiny_llama_dir), "--data", str(data), "--out", str(run), "--method", method,
                 "--max-steps", "4", "--batch-size", "4", "--lr", "1e-2", "--device", "cpu", *extra]) == 0
    report = json.loads((run / "run.json").read_text())["parameters"]
    assert 0 < report["trainable"] < report["total"]
    assert f"trainable params: {report['trainable']:,}" in capsys.readouterr().out
    assert len(losses(run)) == 4
    assert (run / "final" / "adapter_config.json").is_file()
    assert main(["eval", "--model", str(tiny_llama_dir), "--adapter", str(run / "final"), "--data", str(data),
                 "--out", str(tmp_path / "ev"), "--max-new-tokens", "4", "--device", "cpu"]) == 0


def test_method_errors(tiny_llama_dir, tmp_path, capsys):
    data = write_dialogues(tmp_path / "d.jsonl", n=8)
    base = ["train", "--model", str(tiny_llama_dir), "--data", str(data), "--out", str(tmp_path / "o"), "--device", "cpu"]
    assert "no bias" in expect_error(base + ["--method", "bitfit"], capsys)
    assert "virtual" in expect_error(base + ["--method", "prompt", "--num-virtual-tokens", "0"], capsys)
    assert "hidden" in expect_error(base + ["--method", "adapter", "--reduction-factor", "1000"], capsys)
    assert "more" in expect_error(base + ["--method", "prompt", "--num-virtual-tokens", "600"], capsys)  # past the context


def test_inspect_prompt_lists_the_init_text(tiny_llama_dir, tmp_path, capsys):
    data = write_dialogues(tmp_path / "d.jsonl", n=8)
    run = tmp_path / "run"
    assert main(["train", "--model", str(tiny_llama_dir), "--data", str(data), "--out", str(run), "--method", "prompt",
                 "--num-virtual-tokens", "3", "--prompt-init-text", "Summarize the following", "--lr", "1e-9",
                 "--max-steps", "1", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["inspect-prompt", str(run / "final"), "--k", "2"]) == 0
    out = capsys.readouterr().out
    assert "'Summarize' 1.000" in out


def test_templates_and_forgetting_commands(tiny_llama_dir, tmp_path, capsys):
    assert main(["templates", "list"]) == 0 and "review_rating" in capsys.readouterr().out
    assert main(["templates", "render", "dialogsum", "--record", '{"dialogue": "#Person1#: Hi", "summary": "A greeting."}',
                 "--template", "summarize"]) == 0
    out = capsys.readouterr().out
    assert "Summarize the following conversation." in out and "A greeting." in out
    assert "summary" in expect_error(["templates", "render", "dialogsum", "--record", '{"dialogue": "hi"}'], capsys)
    suite = tmp_path / "suite.yaml"
    suite.write_text("suite:\n  - {name: rating, data: 'demo:reviews', template: review_rating, limit: 6}\n")
    assert main(["forgetting", "--model", str(tiny_llama_dir), "--tuned", str(tiny_llama_dir), "--suite", str(suite),
                 "--out", str(tmp_path / "fg"), "--device", "cpu"]) == 0
    result = json.loads((tmp_path / "fg" / "forgetting.json").read_text())
    assert result["rows"][0]["delta"] == 0 and result["flagged"] == []
    capsys.readouterr()
