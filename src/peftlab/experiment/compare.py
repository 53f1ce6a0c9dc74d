"""``peftlab compare`` and ``peftlab sweep``: many fine-tuning runs on identical footing, measured.

    peftlab compare --model smollm2-135m-instruct --data demo:dialogsum --out runs/cmp --methods base,fewshot:3,full,lora
    peftlab sweep --model smollm2-135m-instruct --data demo:dialogsum --out runs/rank --method lora --rank 1,2,4,8,16,32,64

Every variant uses the same split (fractions and seed), the same training examples, the same
token budget (steps x batch size), the same seed and the same test examples. Each variant runs
in its own process (``python -m peftlab train`` / ``eval`` with a YAML recipe written into its
folder), so peak memory (process RSS on CPU, CUDA max allocated on GPU) is that variant's alone.

A variant's numbers are saved in ``variants/<label>/result.json`` as soon as it finishes;
running the same command again skips finished variants, so an interrupted comparison does not
start over. An interrupted training run restarts from its newest checkpoint; training saves one
only at the end unless asked (``--train-options save_every=N``), so by default a variant killed
mid-training is retrained from step 0. Several compare processes with disjoint ``--methods``
lists may share one ``--out`` folder (e.g. one per core); a final run of the whole list, all
skipped, writes the complete tables and report.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from peftlab import method_table
from peftlab.config import CompareConfig, SweepConfig, TrainConfig, to_dict
from peftlab.errors import UserError
from peftlab.experiment.report import read_saved
from peftlab.outputs import check_output_path, write_atomic
from peftlab.tracking import Trackers, parse_report_to

EVAL_ONLY = ("base", "fewshot")
# Settings that must agree for finished variants to be reused by a rerun.
_SHARED = ("model", "data", "template", "split_fractions", "split_seed", "train_limit", "test_limit", "max_steps",
           "epochs", "batch_size", "grad_accum", "lr", "seed", "max_new_tokens", "max_length", "train_options", "dtype")


@dataclass
class Variant:
    label: str  # folder name and table row: "lora", "fewshot:3", "rank=16"
    method: str  # "base", "fewshot", or a training method
    train: dict = field(default_factory=dict)  # TrainConfig options of this variant (on top of the shared ones)
    fewshot: int = 0


def parse_methods(text: str) -> list[Variant]:
    """``base,fewshot:3,full,lora,lora:init=pissa`` -> variants; unknown names fail with the list of known ones.

    A training method may carry its own options after colons, ``METHOD:KEY=VALUE[:KEY=VALUE...]``
    (``lora:init=olora``, ``lora:lr=2e-3:targets=all-linear``), on top of ``--train-options``; a value
    holds no comma (several targets: ``targets=re:.*(q|v)_proj``). The label is the item as written."""
    variants = []
    for item in [x.strip() for x in text.split(",") if x.strip()]:
        name, _, arg = item.partition(":")
        if name == "base" and not arg:
            variants.append(Variant("base", "base"))
        elif name == "fewshot":
            if not arg.isdigit() or int(arg) <= 0:
                raise UserError(f"'{item}': write fewshot:K with K > 0 training examples in the prompt, e.g. fewshot:3")
            variants.append(Variant(item, "fewshot", fewshot=int(arg)))
        elif name in method_table.METHODS:
            variants.append(Variant(item, name, {**_variant_options(item, arg), "method": name}))
        else:
            known = ", ".join(("base", "fewshot:K", *method_table.NAMES))
            raise UserError(f"unknown method '{item}' in --methods; choose from {known}")
    if not variants:
        raise UserError("--methods is empty; e.g. --methods base,full,lora")
    if len({v.label for v in variants}) != len(variants):
        raise UserError(f"--methods lists a method twice: {text}")
    return variants


def _variant_options(item: str, text: str) -> dict:
    """The ``KEY=VALUE`` options of ``METHOD:KEY=VALUE:...`` (none for a bare method)."""
    if not text:
        return {}
    parts = re.split(r":(?=[A-Za-z_-]+=)", text)
    if not all("=" in part for part in parts):
        raise UserError(f"'{item}': options of a method are written METHOD:KEY=VALUE[:KEY=VALUE], e.g. lora:init=pissa")
    options = {}
    for part in parts:
        key, _, value = part.partition("=")
        name = _train_option(key, f"--methods ({item})")
        if name in _FOOTING:
            raise UserError(f"'{item}': {name} is the same for every variant of a compare (set it with --{name.replace('_', '-')} "
                            "or --train-options); a method's own options are its hyperparameters, e.g. lr, rank, init")
        options[name] = _train_value(name, value, item)
    return options


def _train_option(key: str, where: str) -> str:
    """``--rank`` / ``rank`` -> the TrainConfig field name, which must exist."""
    from peftlab.config import check_keys

    name = key.strip().lstrip("-").replace("-", "_")
    check_keys(TrainConfig, {name: None}, where)
    return name


def _train_value(name: str, text: str, item: str):
    """A value as written on the command line, read as YAML and coerced to the TrainConfig field's type."""
    from peftlab.config import coerce

    try:
        return coerce(TrainConfig, name, yaml.safe_load(text))
    except yaml.YAMLError:
        raise UserError(f"'{item}': cannot read the value of {name} ({text!r}); write it plainly, e.g. {name}=VALUE") from None


# What every variant of a compare shares (data, budget, seed, where it runs): not a method's option.
_FOOTING = ("model", "data", "task", "out", "template", "split_fractions", "split_seed", "limit", "epochs", "max_steps",
            "batch_size", "grad_accum", "seed", "max_length", "eval_limit", "dtype", "device", "method", "resume",
            "resume_from", "overwrite", "report_to", "tracking_dir", "experiment", "run_name")


def parse_options(text: str | None) -> dict:
    """``rank=16,alpha=32`` -> {"rank": 16, "alpha": 32}, checked against TrainConfig's options."""
    from peftlab.config import check_keys, parse_overrides

    if not text:
        return {}
    options = parse_overrides([part for part in re.split(r",(?=[A-Za-z_-]+=)", text) if part])
    check_keys(TrainConfig, options, "--train-options")
    return options


def sweep_variants(config: SweepConfig) -> list[Variant]:
    key, sep, values = config.sweep.partition("=")
    if not sep or not values:
        raise UserError(f"--sweep '{config.sweep}' must look like OPTION=V1,V2,..., e.g. rank=1,2,4,8")
    name = _train_option(key, "--sweep")
    written = [v.strip() for v in values.split(",") if v.strip()]
    parsed = [_train_value(name, v, config.sweep) for v in written]
    return [Variant(f"{name}={text}", config.method, {"method": config.method, name: v}) for text, v in zip(written, parsed)]


# ----------------------------------------------------------------------------------------------


class VariantFailed(UserError):
    """A variant's command failed with a user error (e.g. BitFit on a model without biases)."""


def _run(args: list[str], log: Callable[[str], None]) -> None:
    """Run a peftlab command in a child process (so its peak memory is its own), showing its progress."""
    child = subprocess.Popen([sys.executable, "-m", "peftlab", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    tail = b""
    for chunk in iter(lambda: child.stderr.read1(4096), b""):  # progress bars pass through as they come
        sys.stderr.buffer.write(chunk)
        sys.stderr.flush()
        tail = (tail + chunk)[-4096:]
    for line in child.stdout.read().decode(errors="replace").splitlines():
        if line.startswith("trainable params"):
            log(f"  {line}")
    code = child.wait()
    if code != 0:
        lines = [x for x in tail.decode(errors="replace").replace("\r", "\n").splitlines() if "error:" in x]
        message = lines[-1].split("error:", 1)[1].strip() if lines else f"exit code {code}"
        error = VariantFailed if code == 2 else UserError
        raise error(f"'peftlab {args[0]}' failed: {message}")


def _write_recipe(path: Path, options: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({k: v for k, v in options.items() if v is not None}, sort_keys=False))
    return path


def _size(folder: Path) -> int:
    """Bytes of the weights and configs (the model card, README.md, is not part of the model)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name != "README.md")


def run_variant(variant: Variant, config, folder: Path, log: Callable[[str], None]) -> dict:
    """Train (unless eval-only) and evaluate one variant; returns its measurements."""
    common_eval = dict(data=config.data, template=config.template, split="test", split_fractions=config.split_fractions,
                       split_seed=config.split_seed, limit=config.test_limit, max_new_tokens=config.max_new_tokens,
                       max_length=config.max_length, batch_size=config.eval_batch_size, dtype=config.dtype,
                       device=config.device, overwrite=True)
    result: dict = {"label": variant.label, "method": variant.method}
    if variant.method in EVAL_ONLY:
        recipe = _write_recipe(folder / "eval.yaml", {**common_eval, "model": config.model, "fewshot": variant.fewshot,
                                                      "out": str(folder / "eval")})
        _run(["eval", "--config", str(recipe)], log)
        result.update(trainable=0, total=None, percent=0.0, adapter_bytes=0)
    else:
        train = {**dict(model=config.model, data=config.data, out=str(folder / "run"), template=config.template,
                        split_fractions=config.split_fractions, split_seed=config.split_seed, limit=config.train_limit,
                        epochs=config.epochs, max_steps=config.max_steps, batch_size=config.batch_size,
                        grad_accum=config.grad_accum, lr=config.lr, seed=config.seed, max_length=config.max_length,
                        eval_limit=config.test_limit, dtype=config.dtype, device=config.device),
                 **parse_options(config.train_options), **variant.train}
        if config.report_to:  # every variant a run of one experiment, stored in the compare folder
            out = Path(config.out)
            train.update(report_to=config.report_to, tracking_dir=str(out), experiment=out.resolve().name,
                         run_name=variant.label)
        run = folder / "run"
        resume = (run / "run.json").is_file() and json.loads((run / "run.json").read_text()).get("status") != "finished"
        finished = (run / "run.json").is_file() and not resume
        if not finished:
            recipe = _write_recipe(folder / "train.yaml", {**train, "resume": resume, "overwrite": not resume})
            _run(["train", "--config", str(recipe)], log)
        info = json.loads((run / "run.json").read_text())
        final = run / "final"
        adapter = (final / "adapter_config.json").is_file()
        model_eval = {"model": config.model, "adapter": str(final)} if adapter else {"model": str(final)}
        facts = method_table.get(variant.method)
        if facts.quantised_base == "always" or train.get("quantize"):
            model_eval["quantize"] = "nf4"  # evaluate on the 4-bit base it was trained on
        recipe = _write_recipe(folder / "eval.yaml", {**common_eval, **model_eval, "out": str(folder / "eval")})
        _run(["eval", "--config", str(recipe)], log)
        p = info["parameters"]
        result.update(
            trainable=p["trainable"], total=p["total"], percent=p["percent"], adapter_bytes=_size(final),
            train_seconds=info["result"]["seconds"], train_tokens_per_second=info["result"]["tokens_per_second"],
            train_peak_memory=info["result"]["peak_memory"], eval_loss=info["result"]["eval_loss"],
            train_loss=info["result"]["train_loss"], steps=info["result"]["steps"],
        )
        if facts.mergeable and config.latency_examples:
            result["merged"] = _merged_latency(config, folder, final, {**common_eval, **model_eval}, log)
    metrics = json.loads((folder / "eval" / "metrics.json").read_text())
    gen = metrics["generation"]
    result.update({k: metrics[k] for k in ("rouge1", "rouge2", "rougeL", "rougeLsum", "bleu")})
    scores = {k: metrics[k] for k in ("rouge1", "rouge2", "rougeL", "rougeLsum", "bleu")}
    if variant.method not in EVAL_ONLY:  # the trained model's card gains its evaluation
        from peftlab.model_card import update_model_card_results

        update_model_card_results(folder / "run" / "final", scores)
    _track_evaluation(config, variant, folder, scores)
    result.update(eval_latency_s=gen["latency_per_example_s"], eval_tokens_per_second=gen["tokens_per_second"],
                  eval_peak_memory=metrics["peak_memory"], prompt_tokens=gen["mean_prompt_tokens"],
                  fewshot_dropped=metrics["fewshot"]["dropped_examples"], num_examples=metrics["num_examples"])
    return result


def _track_evaluation(config, variant: Variant, folder: Path, scores: dict) -> None:
    """The test scores into the variant's tracked run (an evaluation-only variant gets a run of its own)."""
    names = parse_report_to(config.report_to)
    if not names:
        return
    out, info = Path(config.out), {}
    if (folder / "run" / "run.json").is_file():
        info = json.loads((folder / "run" / "run.json").read_text())
    run_id = (info.get("tracking") or {}).get("mlflow_run_id")
    params = {} if run_id else {"method": variant.method, "label": variant.label, "model": config.model}
    with Trackers.open(names, folder / "run" if info else folder, params, run_name=variant.label, store_dir=out,
                       experiment=out.resolve().name, mlflow_run_id=run_id) as trackers:
        trackers.log_metrics(scores, (info.get("result") or {}).get("steps", 0))


def _track_report(config, out: Path) -> None:
    """report.md, report.html and the report's plots as artifacts of a ``report`` run of the experiment (MLflow)."""
    names = tuple(n for n in parse_report_to(config.report_to) if n == "mlflow")
    if not names:
        return
    with Trackers.open(names, out, to_dict(config), run_name="report", store_dir=out, experiment=out.resolve().name) as trackers:
        for path in [out / "report.md", out / "report.html", *sorted((out / "plots").glob("*.png"))]:
            trackers.log_artifact(path)


def _merged_latency(config, folder: Path, adapter: Path, common_eval: dict, log) -> dict:
    """Latency of the same few prompts with the adapter unmerged and merged into the weights."""
    merged = folder / "merged"
    quantize = ["--quantize", "nf4"] if common_eval.get("quantize") else []
    _run(["merge", "--model", config.model, "--adapter", str(adapter), "--out", str(merged), "--dtype", config.dtype,
          "--overwrite", *quantize], log)
    out = {}
    for name, model in (("unmerged", {"model": config.model, "adapter": str(adapter)}),
                        ("merged", {"model": str(merged), "adapter": None, "quantize": None})):
        recipe = _write_recipe(folder / f"latency-{name}.yaml", {**common_eval, **model, "limit": config.latency_examples,
                                                                "out": str(folder / f"latency-{name}")})
        _run(["eval", "--config", str(recipe)], log)
        gen = json.loads((folder / f"latency-{name}" / "metrics.json").read_text())["generation"]
        out[name] = {"latency_s": gen["latency_per_example_s"], "tokens_per_second": gen["tokens_per_second"]}
    shutil.rmtree(merged, ignore_errors=True)  # a full model copy: keep only the numbers
    return out


@dataclass
class ExperimentResult:
    out: Path
    rows: list[dict]
    skipped: list[str]
    report: Path | None = None


def _check_settings(out: Path, config) -> None:
    stored_path = out / "experiment.json"
    current = {k: getattr(config, k) for k in _SHARED if hasattr(config, k)}
    if stored_path.is_file():
        stored = read_saved(stored_path, "shared")["shared"]
        changed = [k for k in current if stored.get(k) != current[k]]
        if changed:
            raise UserError(f"{out} holds an experiment with other settings ({', '.join(changed)} differ); "
                            "use another --out, or the original settings to continue it")
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(stored_path, json.dumps({"kind": type(config).__name__, "shared": current, "config": to_dict(config)}, indent=2))


def variant_folder(label: str) -> str:
    """A variant's folder name: its label with ':' (and anything not safe in a path) as '-'."""
    return re.sub(r"[^A-Za-z0-9._=+,-]", "-", label)


def run_experiment(config: CompareConfig | SweepConfig, variants: list[Variant], log: Callable[[str], None] = lambda _: None) -> ExperimentResult:
    inputs = [("--model", config.model), ("--data", config.data), ("--template", config.template)]
    out = check_output_path(config.out, "--out", inputs, writes=("experiment.json", "results.json", "report.md", "report.html"))
    _check_settings(out, config)
    rows, skipped = [], []
    for i, variant in enumerate(variants, 1):
        folder = out / "variants" / variant_folder(variant.label)
        done = folder / "result.json"
        if done.is_file():
            log(f"[{i}/{len(variants)}] {variant.label}: finished earlier, skipped")
            skipped.append(variant.label)
            rows.append({**read_saved(done, "label"), "folder": str(folder)})  # where it is now (a moved --out too)
            continue
        log(f"[{i}/{len(variants)}] {variant.label}")
        try:
            row = run_variant(variant, config, folder, log)
        except VariantFailed as e:  # not applicable to this model or data: record why, go on with the others
            log(f"  {variant.label} not run: {e}")
            row = {"label": variant.label, "method": variant.method, "error": str(e)}
        row["folder"] = str(folder)
        write_atomic(done, json.dumps(row, indent=2))
        rows.append(row)
    write_atomic(out / "results.json", json.dumps({"kind": type(config).__name__, "rows": rows}, indent=2))
    from peftlab.experiment.report import write_report

    report = write_report(out)
    _track_report(config, out)
    return ExperimentResult(out, rows, skipped, report)


def compare(config: CompareConfig, log: Callable[[str], None] = lambda _: None) -> ExperimentResult:
    return run_experiment(config, parse_methods(config.methods), log)


def sweep(config: SweepConfig, log: Callable[[str], None] = lambda _: None) -> ExperimentResult:
    return run_experiment(config, sweep_variants(config), log)
