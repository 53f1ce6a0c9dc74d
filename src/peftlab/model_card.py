"""Model cards: the ``README.md`` of a run's ``final/`` folder, in the Hugging Face model-card form.

    >>> from peftlab.model_card import model_card, write_model_card, update_model_card_results
    >>> info = json.loads(Path("runs/lora/run.json").read_text())
    >>> write_model_card("runs/lora/final", info, command="peftlab train --model M --data d.jsonl ...")
    >>> update_model_card_results("runs/lora/final", {"rouge1": 0.41, "bleu": 12.3})  # after an evaluation

A YAML header (``base_model``, ``library_name``, ``tags``, ``datasets``, ``pipeline_tag``: what the
Hub's ``huggingface_hub.ModelCard`` reads), then the method and its family (from
:mod:`peftlab.method_table`), the trainable parameters, the hyperparameters, the training data,
the training results, evaluation results once known, and the command that made it. The card is
rendered from ``run.json`` alone (:func:`model_card` is pure), so a finished run can be given
one later.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import fields
from pathlib import Path

import yaml

from peftlab import method_table
from peftlab.config import TrainConfig, flag
from peftlab.outputs import RUN_MARKER, write_atomic

CARD = "README.md"
EVALUATION = "## Evaluation results"
NOT_YET = "Not evaluated yet (`peftlab compare` fills this in, as does `peftlab.model_card.update_model_card_results`)."

COMMON = ("epochs", "max_steps", "batch_size", "grad_accum", "lr", "schedule", "warmup_ratio", "weight_decay",
          "max_grad_norm", "max_length", "max_target_length", "chat_template", "seed", "dtype")
"""Training fields every card shows; the method's own follow (:data:`METHOD_FIELDS`)."""
METHOD_FIELDS = {
    "lora": ("rank", "alpha", "dropout", "rslora", "init", "loraplus_ratio", "targets", "exclude", "layers", "quantize",
             "compute_dtype"),
    "additive": ("reduction_factor", "adapter_placement"),
    "prompt": ("num_virtual_tokens", "prompt_init", "prompt_init_text"),
    "prefix": ("num_virtual_tokens",),
    "ia3": ("targets", "exclude", "layers"),
    "selective": ("train_modules", "train_layers"),
    "full": ("regularize", "reg_lambda", "ewc_data", "ewc_examples"),
}
NOT_COMMAND = {"out", "resume", "resume_from", "overwrite"}
"""Config fields that say where a run goes, not what it is: left out of the equivalent command."""


def _method_fields(method: str, family: str) -> tuple[str, ...]:
    if family == "reparameterisation":
        return METHOD_FIELDS["lora"]
    if method in ("prompt", "prefix", "ia3"):
        return METHOD_FIELDS[method]
    if method == "adapter":
        return METHOD_FIELDS["additive"]
    return METHOD_FIELDS.get(family, ())


def _peft_format(facts: method_table.MethodFacts) -> bool:
    return facts.saved_as.startswith("peft ")


def _library(facts: method_table.MethodFacts) -> str:
    """peft reads peft-format adapters, transformers a full model folder; peftlab reads its own formats."""
    if _peft_format(facts):
        return "peft"
    return "transformers" if facts.saved_as == "HF model folder" else "peftlab"


def _dataset_names(config: dict) -> list[str]:
    """Hub ids of ``hf:NAME[:CONFIG][@SPLIT]`` sources, else the local file's name."""
    sources = [config["data"]] if config.get("data") else [t.split("=", 1)[-1] for t in config.get("task") or []]
    names = []
    for source in sources:
        if source.startswith("hf:"):
            names.append(source[3:].split("@")[0].split(":")[0])
        elif ":" in source and not Path(source).exists():  # demo:dialogsum and other named sets
            names.append(source)
        else:
            names.append(Path(source).name)
    return list(dict.fromkeys(names))


def _number(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3g}"
    return str(value)


def _table(rows: list[tuple[str, object]], head: tuple[str, str]) -> str:
    lines = [f"| {head[0]} | {head[1]} |", "|---|---|"]
    lines += [f"| {k} | {_number(v) if not isinstance(v, str) else v} |" for k, v in rows]
    return "\n".join(lines)


def train_command(config: dict) -> str:
    """The ``peftlab train`` command line that repeats a run: its config's values that differ from the defaults."""
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    words = ["peftlab", "train"]
    for name, value in config.items():
        if name in NOT_COMMAND or name not in defaults or value == defaults[name] or value is None:
            continue
        if value is True:
            words.append(f"--{flag(name)}")
        elif value is False:
            continue
        elif isinstance(value, list):
            for entry in value:
                words += [f"--{flag(name)}", str(entry)]
        else:
            words += [f"--{flag(name)}", str(value)]
    if config.get("out"):
        words += ["--out", str(config["out"])]
    return shlex.join(words)


def model_card(run_info: dict, command: str | None = None) -> str:
    """The card of a run, from its ``run.json`` dict; ``command``: the argv that made it (default: the
    equivalent ``peftlab train`` command)."""
    config = run_info["config"]
    method = run_info.get("method") or config["method"]
    facts = method_table.get(method)
    model = run_info.get("model", {})
    base = model.get("name") or config["model"]
    seq2seq = bool(model.get("seq2seq"))
    pipeline = "text2text-generation" if seq2seq else "text-generation"
    tags = ["peftlab", method]
    if facts.family == "reparameterisation" and "lora" not in tags:
        tags.append("lora")
    if _peft_format(facts):
        tags.append("peft")
    tags.append(pipeline)
    header = {"base_model": base, "library_name": _library(facts), "tags": tags}
    datasets = _dataset_names(config)
    if datasets:
        header["datasets"] = datasets
    header["pipeline_tag"] = pipeline

    lr = config.get("lr")
    hyper = [(name, config.get(name)) for name in COMMON]
    hyper = [(n, f"{facts.default_lr:g} (the method's default)" if n == "lr" and lr is None else v)
             for n, v in hyper if not (n == "max_steps" and v is None)]
    hyper += [(n, config.get(n)) for n in _method_fields(method, facts.family) if config.get(n) not in (None, False)]
    if not (config.get("quantize") or facts.quantised_base == "always"):
        hyper = [(n, v) for n, v in hyper if n != "compute_dtype"]
    hyper = [(n, f"{v:g}" if isinstance(v, float) else str(v)) for n, v in hyper]

    parts = ["---", yaml.safe_dump(header, sort_keys=False).strip(), "---", "",
             f"# {Path(str(base)).name if Path(str(base)).is_absolute() else base} + {method} (peftlab)", "",
             f"Fine-tuned with peftlab from `{base}`.", "",
             "## Method", "",
             _table([("method", f"`{method}`"), ("family", facts.family), ("what trains", facts.trains),
                     ("saved as", facts.saved_as), ("mergeable into the base", "yes" if facts.mergeable else "no")],
                    ("", "")), "",
             "## Trainable parameters", ""]
    params = run_info.get("parameters") or {}
    parts += [f"`{params['line']}`" if params.get("line") else "-", "",
              "## Hyperparameters", "", _table(hyper, ("option", "value")), "",
              "## Training data", ""]
    parts += _data_section(config, run_info.get("data") or {})
    parts += ["", "## Training results", ""]
    result = run_info.get("result")
    if result:
        parts.append(_table([("optimizer steps", result.get("steps")), ("final train loss", result.get("train_loss")),
                             ("validation loss", result.get("eval_loss")), ("seconds", result.get("seconds")),
                             ("tokens per second", result.get("tokens_per_second"))], ("", "")))
    else:
        parts.append(f"The run has not finished (status: {run_info.get('status', 'unknown')}).")
    parts += ["", EVALUATION, "", _evaluation_text(run_info.get("evaluation")), "",
              "## How it was made", "", "```bash", command or train_command(config), "```", ""]
    return "\n".join(parts)


def _data_section(config: dict, data: dict) -> list[str]:
    lines = []
    if config.get("task"):
        lines.append("Multi-task mixture (`--mix " + str(config.get("mix")) + "`):")
        lines.append("")
        rows = [(f"`{name}`", ", ".join(f"{k} {v}" for k, v in sizes.items()))
                for name, sizes in (data.get("tasks") or {}).items()]
        lines.append(_table(rows, ("task", "examples")))
        lines += ["", "Sources: " + ", ".join(f"`{t}`" for t in config["task"])]
    else:
        lines.append(_table([("source", f"`{config.get('data')}`"),
                             ("template", f"`{config['template']}`" if config.get("template") else f"`{data.get('task')}` (detected)"),
                             ("split fractions (train, validation, test)", config.get("split_fractions")),
                             ("split seed", config.get("split_seed")),
                             ("train / validation / test examples",
                              f"{data.get('train', '-')} / {data.get('validation', '-')} / {data.get('test', '-')}"),
                             ("training examples used", data.get("train_used")),
                             ("chat template", str(data.get("chat_template", "-")))], ("", "")))
    return lines


def _evaluation_text(metrics: dict | None) -> str:
    if not metrics:
        return NOT_YET
    rows = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return _table(rows, ("metric", "value"))


def write_model_card(final_dir: str | Path, run_info: dict, command: str | None = None) -> Path:
    """Write ``final_dir/README.md`` (atomically) from the run's ``run.json`` dict."""
    path = Path(final_dir) / CARD
    write_atomic(path, model_card(run_info, command))
    return path


def update_model_card_results(final_dir: str | Path, metrics: dict) -> Path | None:
    """Put ``metrics`` (name -> number) in the card's evaluation section (written first from ``run.json``
    beside ``final_dir`` when there is no card yet); None when neither exists."""
    final_dir = Path(final_dir)
    path = final_dir / CARD
    if not path.is_file():
        run_json = final_dir.parent / RUN_MARKER
        if not run_json.is_file():
            return None
        write_model_card(final_dir, json.loads(run_json.read_text()))
    text = path.read_text()
    if EVALUATION not in text:
        return None
    head, rest = text.split(EVALUATION, 1)
    following = rest.find("\n## ")
    tail = rest[following:] if following >= 0 else "\n"
    write_atomic(path, f"{head}{EVALUATION}\n\n{_evaluation_text(metrics)}\n{tail}")
    return path
