"""compare / sweep / report on a tiny model: identical footing, resumable after a kill, report = saved results."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from peftlab.cli import main
from peftlab.experiment.compare import parse_methods
from peftlab.experiment.report import tradeoff_table
from helpers import expect_error, write_dialogues


def _compare_args(model, data, out, methods):
    return ["compare", "--model", str(model), "--data", str(data), "--out", str(out), "--methods", methods,
            "--max-steps", "6", "--batch-size", "4", "--lr", "3e-3", "--test-limit", "3", "--max-new-tokens", "8",
            "--latency-examples", "2", "--device", "cpu"]


def test_compare_report_matches_saved_results(tiny_llama_dir, tmp_path, capsys):
    data = write_dialogues(tmp_path / "d.jsonl", n=30)
    out = tmp_path / "cmp"
    assert main(_compare_args(tiny_llama_dir, data, out, "base,fewshot:2,full,lora")) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["base", "fewshot:2", "full", "lora"]
    # identical footing: the same test examples and the same token budget
    assert {r["num_examples"] for r in rows} == {3}
    assert {r["steps"] for r in rows if "steps" in r} == {6}
    full, lora = rows[2], rows[3]
    assert full["trainable"] == full["total"] and 0 < lora["trainable"] < full["trainable"]
    assert lora["adapter_bytes"] < full["adapter_bytes"]
    assert set(lora["merged"]) == {"unmerged", "merged"}
    assert rows[1]["prompt_tokens"] > rows[0]["prompt_tokens"]  # in-context examples cost context
    # the report's tables are the saved numbers
    md = (out / "report.md").read_text()
    for r in rows:
        assert f"| {r['label']} | {r['rouge1']:.4f} | {r['rouge2']:.4f} | {r['rougeL']:.4f} | {r['rougeLsum']:.4f} |" in md
    headers, table = tradeoff_table(rows)
    assert table[3][headers.index("trainable params")] == f"{lora['trainable']:,}"
    pair = f"{lora['merged']['unmerged']['latency_s']:.3f} / {lora['merged']['merged']['latency_s']:.3f}"
    assert table[3][headers.index("unmerged / merged s/example")] == pair
    page = (out / "report.html").read_text()
    assert page.count("<table>") >= 2 and page.count("data:image/png;base64,") >= 3
    # report rebuilds from the saved results alone
    (out / "report.md").unlink()
    assert main(["report", "--run-dir", str(out)]) == 0 and (out / "report.md").read_text() == md
    capsys.readouterr()


def test_killed_compare_resumes_without_retraining(tiny_llama_dir, tmp_path):
    data = write_dialogues(tmp_path / "d.jsonl", n=30)
    out = tmp_path / "cmp"
    args = _compare_args(tiny_llama_dir, data, out, "full,lora") + ["--latency-examples", "0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    child = subprocess.Popen([sys.executable, "-m", "peftlab", *args], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    first = out / "variants" / "full" / "result.json"
    deadline = time.time() + 240
    while not first.exists() and time.time() < deadline and child.poll() is None:
        time.sleep(0.2)
    assert first.exists(), "the first method never finished"
    os.killpg(child.pid, signal.SIGKILL)  # kill the whole comparison midway
    child.wait()
    stamp = first.stat().st_mtime_ns
    full_run = json.loads((out / "variants" / "full" / "run" / "run.json").read_text())
    result = subprocess.run([sys.executable, "-m", "peftlab", *args], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "full: finished earlier, skipped" in result.stdout
    assert first.stat().st_mtime_ns == stamp  # not retrained
    assert json.loads((out / "variants" / "full" / "run" / "run.json").read_text()) == full_run
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["full", "lora"] and all("rouge1" in r for r in rows)


def test_sweep_shorthand_and_plot(tiny_llama_dir, tmp_path, capsys):
    data = write_dialogues(tmp_path / "d.jsonl", n=20)
    out = tmp_path / "sw"
    args = ["sweep", "--model", str(tiny_llama_dir), "--data", str(data), "--out", str(out), "--method", "lora",
            "--rank", "1,4", "--max-steps", "3", "--batch-size", "4", "--test-limit", "2", "--max-new-tokens", "4",
            "--latency-examples", "0", "--device", "cpu"]
    assert main(args) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["rank=1", "rank=4"]
    assert rows[0]["trainable"] * 4 == rows[1]["trainable"]
    assert "Sweep: validation loss and ROUGE-1" in (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    for r, value in zip(rows, (1, 4)):  # the sweep table holds each value's saved validation loss
        assert f"| {value} | {r['trainable']:,} | {r['eval_loss']:.4f} | {r['train_loss']:.4f} | {r['rouge1']:.4f} |" in md
    capsys.readouterr()


def test_compare_errors(tiny_llama_dir, tmp_path, capsys):
    data = write_dialogues(tmp_path / "d.jsonl", n=12)
    assert "fewshot:K" in expect_error(_compare_args(tiny_llama_dir, data, tmp_path / "c", "base,lorra"), capsys)
    assert "fewshot:3" in expect_error(_compare_args(tiny_llama_dir, data, tmp_path / "c", "fewshot:x"), capsys)
    with pytest.raises(Exception):
        parse_methods("lora,lora")
    # a method that cannot run on this model is reported with the reason, the others still run, and the exit code is 2
    out = tmp_path / "c2"
    assert main(_compare_args(tiny_llama_dir, data, out, "base,lora") + ["--train-options", "rank=500"]) == 2
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert "rouge1" in rows[0] and "--rank 32 or less" in rows[1]["error"]
    assert "## Not run" in (out / "report.md").read_text()
    printed = capsys.readouterr()
    assert "not run: lora" in printed.out and "| base" in printed.out
    assert printed.err.strip().splitlines()[-1].startswith("peftlab: error: 1 of 2 requested variants did not run: lora")


@pytest.mark.skipif(not shutil.which("chromium"), reason="chromium not installed (apt-get install chromium)")
def test_report_opens_in_headless_chromium(tiny_llama_dir, tmp_path, capsys):
    data = write_dialogues(tmp_path / "d.jsonl", n=20)
    out = tmp_path / "cmp"
    assert main(_compare_args(tiny_llama_dir, data, out, "base,lora") + ["--latency-examples", "0"]) == 0
    shot = tmp_path / "report.png"
    result = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
         f"--screenshot={shot}", "--window-size=1200,2000", (out / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert shot.stat().st_size > 10_000  # a rendered page, not a blank one
    assert "Uncaught" not in result.stderr  # no JavaScript / page errors
    capsys.readouterr()


def test_demo_is_a_compare_of_base_lora_and_full(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--model", str(tiny_llama_dir), "--out", str(out), "--train-examples", "8", "--test-examples", "2",
                 "--max-steps", "2", "--batch-size", "4", "--max-new-tokens", "4", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "| base |" in printed and "| lora |" in printed and "| full |" in printed and "report:" in printed
    assert [r["label"] for r in json.loads((out / "results.json").read_text())["rows"]] == ["base", "lora", "full"]


def test_multi_line_prediction_stays_on_its_report_line():
    from peftlab.experiment.report import _one_line

    assert _one_line("#Person1#: Hi.\n#Person2#: Hello.\n") == "#Person1#: Hi. ⏎ #Person2#: Hello."
    assert _one_line("one line") == "one line"


def test_sweep_labels_keep_the_values_as_written():
    from peftlab.config import SweepConfig
    from peftlab.experiment.compare import sweep_variants

    variants = sweep_variants(SweepConfig(model="m", data="d", out="o", method="lora", sweep="lr=5e-4, 2e-3"))
    assert [(v.label, v.train["lr"]) for v in variants] == [("lr=5e-4", 5e-4), ("lr=2e-3", 2e-3)]


def test_method_options_and_paired_report(tiny_llama_dir, tmp_path, capsys):
    """``METHOD:KEY=VALUE`` variants train with their options; the report pairs every variant with full and lora."""
    data = write_dialogues(tmp_path / "d.jsonl", n=30)
    out = tmp_path / "cmp"
    args = _compare_args(tiny_llama_dir, data, out, "full,lora,lora:init=olora:loraplus_ratio=4") + ["--latency-examples", "0"]
    assert main(args) == 0
    rows = {r["label"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    run = json.loads((out / "variants" / "lora-init=olora-loraplus_ratio=4" / "run" / "run.json").read_text())
    assert run["config"]["init"] == "olora" and run["config"]["loraplus_ratio"] == 4.0

    md = (out / "report.md").read_text()
    paired = md.split("## ROUGE-1 against full fine-tuning and plain LoRA", 1)[1].split("\n## ", 1)[0]
    line = next(x for x in paired.splitlines() if x.startswith("| lora |"))
    assert line.endswith("| - | - |") and "+-" in line  # against full: a delta; against itself: none
    assert expect_error(args[:8] + ["full,lora:init"] + args[9:], capsys).startswith("peftlab: error: 'lora:init'")
    capsys.readouterr()


def test_method_options_cannot_change_the_footing():
    with pytest.raises(Exception, match="same for every variant"):
        parse_methods("full,lora:max_steps=5")
    with pytest.raises(Exception, match="same for every variant"):
        parse_methods("lora:out=elsewhere")
    from peftlab.experiment.compare import variant_folder

    assert variant_folder("lora:targets=re:.*(q|v)_proj") == "lora-targets=re-.--q-v-_proj"
    assert "/" not in variant_folder("lora:init=../../x")


def test_paired_table_pairs_examples_by_index(tmp_path):
    """Each variant against full and lora: ratio of corpus ROUGE-1, mean per-example delta +- its standard error."""
    from peftlab.experiment.report import paired_table

    def row(label, scores):
        folder = tmp_path / label
        (folder / "eval").mkdir(parents=True)
        lines = [json.dumps({"index": i, "scores": {"rouge1": {"fmeasure": v}}}) for i, v in scores.items()]
        (folder / "eval" / "predictions.jsonl").write_text("\n".join(lines) + "\n")
        return {"label": label, "rouge1": sum(scores.values()) / len(scores), "folder": str(folder)}

    full = row("full", {0: 0.5, 1: 0.4, 2: 0.3})
    lora = row("lora", {2: 0.1, 0: 0.4, 1: 0.4})  # another order: paired by index
    other = row("other", {0: 0.5, 1: 0.4, 5: 0.3})  # other examples: not paired
    headers, table = paired_table([full, lora, other])
    assert headers == ["model", "rouge1", "vs full: ratio", "vs full: delta +- s.e.", "vs lora: ratio", "vs lora: delta +- s.e."]
    diffs = [-0.1, 0.0, -0.2]
    mean = sum(diffs) / 3
    stderr = (sum((d - mean) ** 2 for d in diffs) / 2 / 3) ** 0.5
    assert table[1] == ["lora", "0.3000", "75.0%", f"{mean:+.4f} +- {stderr:.4f}", "-", "-"]
    assert table[0][4:] == ["133.3%", f"{-mean:+.4f} +- {stderr:.4f}"]
    assert table[2][2:] == ["-", "-", "-", "-"]
