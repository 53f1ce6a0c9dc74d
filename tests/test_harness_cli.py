"""peftlab harness / holistic through the CLI on the shared MMLU and BBH copies."""

from __future__ import annotations

import json

from peftlab.cli import main
from helpers import expect_error


def test_harness_command(tiny_llama_dir, shared_data, tmp_path, capsys):
    assert main(["harness", "--model", str(tiny_llama_dir), "--tasks", "mmlu_anatomy,bbh_boolean_expressions",
                 "--data-root", str(shared_data), "--split", "val", "--limit", "3", "--out", str(tmp_path), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "| mmlu_anatomy " in out and "acc_norm" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert "mmlu_anatomy" in json.dumps(results)
    assert "mmlu_anatomy" in expect_error(["harness", "--model", str(tiny_llama_dir), "--tasks", "mmlu_anatomyy",
                                     "--data-root", str(shared_data)], capsys)


def test_holistic_command(tiny_llama_dir, shared_data, tmp_path, capsys):
    assert main(["holistic", "--model", str(tiny_llama_dir), "--tasks", "mmlu_anatomy", "--data-root", str(shared_data),
                 "--split", "val", "--limit", "4", "--probe-tokens", "4", "--out", str(tmp_path), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for category in ("accuracy", "calibration", "robustness", "fairness", "bias", "toxicity", "efficiency"):
        assert category in out
    assert (tmp_path / "holistic.json").is_file() and (tmp_path / "holistic.png").stat().st_size > 1000
