"""Tables, plots and the report of a compare or sweep folder, rebuilt from its saved results.

    peftlab report runs/cmp

Reads ``results.json`` (one row per variant), each variant's ``run/metrics.jsonl`` (loss curves)
and ``eval/predictions.jsonl`` (examples), and writes ``report.md`` and a self-contained
``report.html`` (plots embedded as PNG): the ROUGE table of the course notes, the trade-off
table on PEFT's five axes (memory, parameters, training speed, inference cost, performance),
each method's quality relative to full fine-tuning, loss curves, ROUGE bars, quality against
memory / parameters / speed, sweep curves, and example predictions side by side.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from pathlib import Path

from peftlab.errors import UserError
from peftlab.outputs import write_atomic, write_bytes_atomic

ROUGE = ("rouge1", "rouge2", "rougeL", "rougeLsum")
TRADEOFF_LEGEND = ("Peak train memory: process RSS on CPU, CUDA max allocated on GPU. Latency s/example and gen "
                   "tokens/s: the whole test set at the evaluation batch size. Unmerged / merged: the first "
                   "--latency-examples test prompts with the adapter applied, then merged into the weights. "
                   "Timings are only comparable between variants run on the same, equally loaded machine.")


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _one_line(text: str) -> str:
    """A prediction on one markdown list line: its line breaks shown as ' ⏎ '."""
    return " ⏎ ".join(line.strip() for line in text.strip().splitlines())


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.3f}"


def read_saved(path: Path, *keys: str) -> dict:
    """A JSON file that compare or sweep wrote, holding ``keys``; a damaged or foreign one ends in one line naming it."""
    rerun = "delete it and run the same peftlab compare or sweep command again (finished variants are reused)"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is damaged (not valid JSON: {e}); {rerun}") from None
    missing = [k for k in keys if not isinstance(data, dict) or k not in data]
    if missing:
        raise UserError(f"{path} is damaged (it lacks {', '.join(missing)}); {rerun}")
    return data


def load_results(run_dir: str | Path) -> tuple[str, list[dict]]:
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise UserError(f"{run_dir} holds no results.json: give the folder of a compare or sweep run")
    data = read_saved(path, "kind", "rows")
    return data["kind"], data["rows"]


def split_failed(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(variants with results, variants that could not run: their ``error`` says why)."""
    return [r for r in rows if "error" not in r], [r for r in rows if "error" in r]


def rouge_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    return ["model", *ROUGE, "bleu"], [[r["label"], *(_fmt(r[k]) for k in ROUGE), _fmt(r["bleu"])] for r in rows]


def tradeoff_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """PEFT's five trade-off axes, one row per variant."""
    full = next((r for r in rows if r["method"] == "full"), None)
    headers = ["method", "trainable params", "trainable %", "adapter/checkpoint MB", "peak train memory MB",
               "train s", "train tokens/s", "latency s/example", "gen tokens/s", "unmerged / merged s/example", "rouge1",
               "rouge1 vs full"]
    table = []
    for r in rows:
        latency = r.get("merged", {})  # the same few prompts with the adapter unmerged and merged
        pair = (f"{latency['unmerged']['latency_s']:.3f} / {latency['merged']['latency_s']:.3f}"
                if {"unmerged", "merged"} <= set(latency) else "-")
        rel = f"{100 * r['rouge1'] / full['rouge1']:.1f}%" if full and full["rouge1"] else "-"
        table.append([
            r["label"], f"{r['trainable']:,}", _fmt(r.get("percent"), 3), _mb(r.get("adapter_bytes")),
            _mb((r.get("train_peak_memory") or {}).get("bytes")), _fmt(r.get("train_seconds"), 1),
            _fmt(r.get("train_tokens_per_second"), 0), _fmt(r.get("eval_latency_s"), 3),
            _fmt(r.get("eval_tokens_per_second"), 1), pair, _fmt(r["rouge1"]), rel,
        ])
    return headers, table


def sweep_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Validation loss and quality against the swept value: where does it plateau?"""
    headers = [_swept_option(rows), "trainable params", "validation loss", "train loss", "rouge1", "rougeL", "bleu"]
    return headers, [[_sweep_value(r["label"]), f"{r['trainable']:,}", _fmt(r.get("eval_loss")),
                      _fmt(r.get("train_loss")), _fmt(r["rouge1"]), _fmt(r["rougeL"]), _fmt(r["bleu"])] for r in rows]


PAIRED_REFERENCES = ("full", "lora")  # the rows every other variant is compared with, example by example
PAIRED_LEGEND = ("Paired over the same test examples: delta = mean of (variant - reference) per-example ROUGE-1, "
                 "+- its standard error (sample standard deviation of the differences / sqrt(n)); ratio = the "
                 "variant's corpus ROUGE-1 / the reference's.")


def _per_example(row: dict, metric: str) -> dict[int, float] | None:
    """Test example index -> the variant's score on it (F-measure), from its predictions.jsonl."""
    path = Path(row.get("folder", "")) / "eval" / "predictions.jsonl"
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["index"]: r["scores"][metric]["fmeasure"] for r in records}


def paired_table(rows: list[dict], metric: str = "rouge1") -> tuple[list[str], list[list[str]]] | None:
    """Each variant against full fine-tuning and plain LoRA (when they ran): ratio, paired delta +- standard error."""
    from peftlab.eval.harness.metrics import mean_and_stderr

    references = [r for name in PAIRED_REFERENCES for r in rows if r["label"] == name]
    scores = {r["label"]: _per_example(r, metric) for r in rows}
    references = [r for r in references if scores[r["label"]]]
    if not references:
        return None
    headers = ["model", metric] + [f"vs {r['label']}: {h}" for r in references for h in ("ratio", "delta +- s.e.")]
    table = []
    for row in rows:
        cells = [row["label"], _fmt(row[metric])]
        for ref in references:
            mine, theirs = scores[row["label"]], scores[ref["label"]]
            if row is ref or not mine or mine.keys() != theirs.keys():  # paired only over the same test examples
                cells += ["-", "-"]
                continue
            delta, stderr = mean_and_stderr([mine[i] - theirs[i] for i in sorted(mine)])
            ratio = f"{100 * row[metric] / ref[metric]:.1f}%" if ref[metric] else "-"
            cells += [ratio, f"{delta:+.4f} +- {stderr:.4f}"]
        table.append(cells)
    return headers, table


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:  # a | inside a cell (a label like targets=re:.*(q|v)_proj) must not split it
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(headers), "|" + "|".join("---" for _ in headers) + "|"] + [line(row) for row in rows])


def _loss_curve(row: dict) -> tuple[list[int], list[float], list[tuple[int, float]]]:
    path = Path(row.get("folder", "")) / "run" / "metrics.jsonl"
    steps, losses, evals = [], [], []
    if path.is_file():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if "loss" in rec:
                steps.append(rec["step"])
                losses.append(rec["loss"])
            elif "eval_loss" in rec and rec["eval_loss"] is not None:
                evals.append((rec["step"], rec["eval_loss"]))
    return steps, losses, evals


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def _sweep_value(label: str) -> str:
    """``rank=16`` -> ``16``: the swept value as the user wrote it."""
    return label.partition("=")[2]


def _swept_option(rows: list[dict]) -> str:
    """``rank`` for rows labelled ``rank=...``."""
    return rows[0]["label"].partition("=")[0] if rows else "value"


def plots(kind: str, rows: list[dict]) -> dict[str, str]:
    """Figure title -> base64 PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {}
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        steps, losses, _ = _loss_curve(r)
        if steps:
            ax.plot(steps, losses, label=r["label"])
    ax.set(xlabel="step", ylabel="training loss", title="Loss curves")
    if ax.lines:
        ax.legend(fontsize=8)
        figures["Loss curves"] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.2
    for i, key in enumerate(ROUGE):
        ax.bar([j + i * width for j in range(len(rows))], [r[key] for r in rows], width, label=key)
    ax.set_xticks([j + 1.5 * width for j in range(len(rows))], [r["label"] for r in rows], rotation=30, fontsize=8)
    ax.set(ylabel="score", title="ROUGE by method")
    ax.set_ylim(0, 1.3 * max(max(r[key] for key in ROUGE) for r in rows) or 1.0)  # room for the legend
    ax.legend(fontsize=8, ncol=4, loc="upper left")
    figures["ROUGE by method"] = _png(fig)
    plt.close(fig)

    trained = [r for r in rows if r.get("train_peak_memory")]
    if trained:
        fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=True, layout="constrained")
        axes_data = [
            ("peak training memory (MB)", [r["train_peak_memory"]["bytes"] / 1e6 for r in trained]),
            ("trainable parameters", [max(r["trainable"], 1) for r in trained]),
            ("training tokens/s", [r["train_tokens_per_second"] for r in trained]),
        ]
        for ax, (label, xs) in zip(axes, axes_data):
            ax.scatter(xs, [r["rouge1"] for r in trained])
            for x, r in zip(xs, trained):
                ax.annotate(r["label"], (x, r["rouge1"]), xytext=(4, 3), textcoords="offset points", fontsize=8)
            ax.set(xlabel=label)
            ax.margins(x=0.15, y=0.1)  # room for the labels
        axes[0].set_ylabel("ROUGE-1")
        axes[1].set_xscale("log")
        fig.suptitle("Quality against memory, parameters and speed")
        figures["Quality against memory, parameters and speed"] = _png(fig)
        plt.close(fig)

    if kind == "SweepConfig":
        values = [_sweep_value(r["label"]) for r in rows]
        fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
        ax.plot(range(len(rows)), [r["rouge1"] for r in rows], "o-", label="ROUGE-1 (test)")
        ax.set_xticks(range(len(rows)), values)
        ax.set(xlabel=_swept_option(rows), ylabel="ROUGE-1", title="Sweep")
        ax2 = ax.twinx()
        ax2.plot(range(len(rows)), [r.get("eval_loss") for r in rows], "s--", color="tab:red", label="validation loss")
        ax2.set_ylabel("validation loss")
        fig.legend(loc="outside lower center", ncol=2, fontsize=8)
        figures["Sweep: validation loss and ROUGE-1"] = _png(fig)
        plt.close(fig)
    return figures


def examples(rows: list[dict], n: int = 3) -> list[dict]:
    """The first ``n`` test examples with every variant's prediction."""
    out: list[dict] = []
    for r in rows:
        path = Path(r.get("folder", "")) / "eval" / "predictions.jsonl"
        if not path.is_file():
            continue
        for i, line in enumerate(path.read_text().splitlines()[:n]):
            rec = json.loads(line)
            if len(out) <= i:
                out.append({"reference": rec["reference"], "predictions": {}})
            out[i]["predictions"][r["label"]] = rec["prediction"]
    return out


def write_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    kind, rows = load_results(run_dir)
    rows, failed = split_failed(rows)
    if not rows:
        raise UserError(f"{run_dir}/results.json holds no finished variant yet")
    rouge_h, rouge_rows = rouge_table(rows)
    trade_h, trade_rows = tradeoff_table(rows)
    paired = paired_table(rows)
    samples = examples(rows)
    title = "peftlab sweep" if kind == "SweepConfig" else "peftlab compare"

    sweep = sweep_table(rows) if kind == "SweepConfig" else None
    md = [f"# {title}", ""]
    if sweep:
        md += ["## Sweep: validation loss and quality", "", markdown_table(*sweep), ""]
    md += ["## ROUGE", "", markdown_table(rouge_h, rouge_rows), ""]
    if paired:
        md += ["## ROUGE-1 against full fine-tuning and plain LoRA, example by example", "", markdown_table(*paired), "",
               PAIRED_LEGEND, ""]
    md += ["## Trade-offs (memory, parameters, training speed, inference cost, performance)", "",
          markdown_table(trade_h, trade_rows), "", TRADEOFF_LEGEND, ""]
    if failed:
        md += ["## Not run", ""] + [f"- {r['label']}: {r['error']}" for r in failed] + [""]
    if samples:
        md += ["## Example predictions", ""]
        for i, s in enumerate(samples, 1):
            md += [f"### Example {i}", "", f"- reference: {_one_line(s['reference'])}"]
            md += [f"- {label}: {_one_line(text)}" for label, text in s["predictions"].items()] + [""]
    write_atomic(run_dir / "report.md", "\n".join(md))

    figures = plots(kind, rows)
    (run_dir / "plots").mkdir(exist_ok=True)
    for name, data in figures.items():  # also as files: trackers take them as artifacts, people open them
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        write_bytes_atomic(run_dir / "plots" / f"{slug}.png", base64.b64decode(data))

    def html_table(headers, body) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
        rows_html = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{rows_html}</tbody></table>"

    parts = [f"<h1>{title}</h1>"]
    if sweep:
        parts += ["<h2>Sweep: validation loss and quality</h2>", html_table(*sweep)]
    parts += ["<h2>ROUGE</h2>", html_table(rouge_h, rouge_rows)]
    if paired:
        parts += ["<h2>ROUGE-1 against full fine-tuning and plain LoRA, example by example</h2>", html_table(*paired),
                  f"<p>{html.escape(PAIRED_LEGEND)}</p>"]
    parts += ["<h2>Trade-offs</h2>", html_table(trade_h, trade_rows), f"<p>{html.escape(TRADEOFF_LEGEND)}</p>"]
    if failed:
        parts += ["<h2>Not run</h2>", html_table(["method", "why"], [[r["label"], r["error"]] for r in failed])]
    for name, data in figures.items():
        parts += [f"<h2>{html.escape(name)}</h2>", f'<img alt="{html.escape(name)}" src="data:image/png;base64,{data}">']
    if samples:
        parts.append("<h2>Example predictions</h2>")
        for s in samples:
            body = [["reference", s["reference"]]] + [[k, v] for k, v in s["predictions"].items()]
            parts.append(html_table(["model", "text"], body))
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px;text-align:left;white-space:pre-wrap}img{max-width:100%}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{style}</style></head>"
            f"<body>{''.join(parts)}</body></html>")
    write_atomic(run_dir / "report.html", page)
    return run_dir / "report.md"
