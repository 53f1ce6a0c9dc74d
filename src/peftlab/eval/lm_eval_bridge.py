"""lm-evaluation-harness bridge: any peftlab model + adapter as the lm-eval model ``peftlab``.

    pip install 'peftlab[lm-eval]'
    python -m peftlab.eval.lm_eval_bridge run --model peftlab \\
        --model_args model=smollm2-135m-instruct,adapter=runs/adapter/final --tasks arc_easy --device cpu

    >>> import lm_eval
    >>> import peftlab.eval.lm_eval_bridge  # registers "peftlab" in lm-eval's model registry
    >>> lm_eval.simple_evaluate(model="peftlab", model_args="model=M,adapter=DIR", tasks=["arc_easy"])

    peftlab harness --backend lm-eval --model M --adapter DIR --tasks arc_easy   # the same, as harness rows

The model is loaded by :func:`peftlab.models.load_for_inference`, so every adapter format peftlab
reads works, including those peft cannot (bottleneck adapters, selective); the loaded
``PreTrainedModel`` and tokenizer are then handed to lm-eval's own ``HFLM``, so lm-eval's
log-likelihood, rolling and generation code does the scoring.

How lm-eval finds ``peftlab``: lm-eval 0.4.13 reads no plugin entry-point group; its registry holds
only what ``lm_eval.models`` lists plus what has been imported. Importing this module registers
``peftlab`` (as a lazy ``"module:Class"`` placeholder, lm-eval's own form for its built-in models);
``python -m peftlab.eval.lm_eval_bridge`` is lm-eval's CLI (``lm_eval ...``, every option the same)
with that import done first. The bare ``lm_eval`` script cannot see the name.

``model_args`` (``key=value,...``): ``model`` (required: folder, hub id, .gguf or alias), ``adapter``,
``dtype`` (float32), ``device`` (auto; lm-eval's ``--device`` also sets it), ``trust_pickle``,
``quantize`` (nf4), plus any HFLM option that applies to a loaded model (``max_length``,
``add_bos_token``, ``prefix_token_id``, ...).
"""

from __future__ import annotations

import time
from typing import Any

import lm_eval.models  # noqa: F401  lm-eval's own names first: its registry imports them only while empty
from lm_eval.api.registry import model_registry
from lm_eval.models.huggingface import HFLM

from peftlab.errors import UserError
from peftlab.models import LoadedModel, load_for_inference

NAME = "peftlab"


class PeftlabLM(HFLM):
    """lm-eval's ``HFLM`` around a model loaded (with its adapter) by peftlab."""

    def __init__(self, model: str | None = None, adapter: str | None = None, dtype: str = "float32",
                 device: str | None = "auto", trust_pickle: bool = False, quantize: str | None = None,
                 loaded: LoadedModel | None = None, batch_size: int | str = 1, **hflm_options: Any) -> None:
        if loaded is None:
            if not model:
                raise UserError("lm-eval model 'peftlab' needs model=...: --model_args model=M[,adapter=DIR]")
            loaded = load_for_inference(str(model), str(adapter) if adapter else None, dtype, device or "auto",
                                        bool(trust_pickle), quantize=quantize)
        for ignored in ("pretrained", "tokenizer", "backend", "peft"):  # peftlab decides these
            if ignored in hflm_options:
                raise UserError(f"model_args {ignored}=... is not for the 'peftlab' model: use model=... and adapter=...")
        self.loaded = loaded
        self.adapter = str(adapter) if adapter else None
        super().__init__(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size,
                         backend="seq2seq" if loaded.is_seq2seq else "causal", **hflm_options)

    def get_model_info(self) -> dict:
        return {**super().get_model_info(), "peftlab_model": self.loaded.name, "peftlab_adapter": self.adapter}


def register() -> None:
    """Make ``peftlab`` an lm-eval model name; importing this module does it (repeating it is harmless)."""
    if NAME not in model_registry:
        model_registry.register(NAME, target=f"{__spec__.name if __spec__ else __name__}:PeftlabLM")


register()


# ------------------------------------------------------------------------------ peftlab harness --backend lm-eval


def run_lm_eval_config(config, *, loaded: LoadedModel | None = None, fewshot_seed: int = 1234):
    """``peftlab harness --backend lm-eval``: lm-eval's ``simple_evaluate`` through :class:`PeftlabLM`,
    returned as a :class:`~peftlab.eval.harness.runner.HarnessResult` (tasks, groups, per-item scores).

    ``tasks`` are lm-eval task, group or tag names, or task .yaml files; ``num_fewshot``, ``limit``,
    ``batch_size``, ``max_gen_toks`` and ``apply_chat_template`` map to lm-eval's options.
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from peftlab.eval.harness.runner import (
        HarnessResult,
        load_inference_model,
        task_list,
    )
    from peftlab.progress import silent

    if config.data_root is not None or config.split is not None:
        option = "--data-root" if config.data_root is not None else "--split"
        raise UserError(f"{option} is for peftlab's own tasks; lm-eval reads each task's data and split from its "
                        "YAML: drop it, or use --backend peftlab")
    tasks = task_list(config.tasks)
    manager = TaskManager()
    unknown = [t for t in tasks if not t.endswith((".yaml", ".yml")) and t not in manager.all_tasks]
    if unknown:
        raise UserError(f"lm-eval has no task, group or tag named {unknown[0]!r} (see 'lm_eval ls tasks'), "
                        "or pass a task .yaml file")
    start = time.perf_counter()
    lm = PeftlabLM(loaded=load_inference_model(config, loaded, silent), adapter=config.adapter,
                   batch_size=config.batch_size)
    out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, num_fewshot=config.num_fewshot,
                          limit=config.limit, apply_chat_template=config.apply_chat_template, log_samples=True,
                          gen_kwargs={"max_gen_toks": config.max_gen_toks} if config.max_gen_toks else None,
                          fewshot_random_seed=fewshot_seed)
    seconds = time.perf_counter() - start
    results = {name: _task_result(name, out) for name in out["results"] if name in out["samples"]}
    groups = {name: {**_metrics(values)[0], "num_tasks": len(out["group_subtasks"].get(name, [])),
                     "num_items": sum(results[t].num_items for t in out["group_subtasks"].get(name, []) if t in results)}
              for name, values in out.get("groups", {}).items()}
    settings = {"backend": "lm-eval", "lm_eval_version": out.get("lm_eval_version"), "tasks": tasks,
                "num_fewshot": config.num_fewshot, "limit": config.limit, "batch_size": config.batch_size,
                "max_gen_toks": config.max_gen_toks, "fewshot_seed": fewshot_seed,
                "apply_chat_template": config.apply_chat_template, "dtype": config.dtype, "device": config.device,
                "is_seq2seq": lm.loaded.is_seq2seq}
    items = sum(r.num_items for r in results.values())
    return HarnessResult(lm.loaded.name, config.adapter, results, groups, settings, seconds,
                         items / seconds if seconds > 0 else 0.0)


def _metrics(values: dict) -> tuple[dict[str, float], dict[str, float]]:
    """lm-eval's ``"acc,none"`` / ``"acc_stderr,none"`` keys as ``acc``; other filters keep ``metric,filter``."""
    metrics, stderr = {}, {}
    for key, value in values.items():
        if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        metric, filt = key.split(",", 1)
        is_stderr = metric.endswith("_stderr")
        name = metric.removesuffix("_stderr") if is_stderr else metric
        name = name if filt == "none" else f"{name},{filt}"
        (stderr if is_stderr else metrics)[name] = float(value)
    return metrics, stderr


def _task_result(name: str, out: dict):
    from peftlab.eval.harness.runner import TaskResult

    metrics, stderr = _metrics(out["results"][name])
    config = out["configs"][name]
    output_type = config["output_type"]
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    main = "acc" if output_type == "multiple_choice" and "acc" in metrics else next(iter(metrics), None)
    items = []
    for s in samples:
        item = {"index": s["doc_id"], "prompt": s["arguments"][0][0], "target": s["target"]}
        if output_type in ("multiple_choice", "loglikelihood"):
            item.update(choices=[a[1] for a in s["arguments"]], loglikelihoods=[float(r[0]) for r in s["filtered_resps"]],
                        is_greedy=[bool(r[1]) for r in s["filtered_resps"]])
        else:
            item["generation"] = s["filtered_resps"][0] if s["filtered_resps"] else None
        for metric in metrics:
            if isinstance(s.get(metric), (int, float)):
                item[metric] = float(s[metric])
        item["score"] = item.get(main) if main else None
        items.append(item)
    shots = out.get("n-shot", {}).get(name, config.get("num_fewshot") or 0)
    return TaskResult(name, output_type, config.get("test_split") or config.get("validation_split") or "", int(shots or 0),
                      len(items), main, metrics, stderr, items, 0.0)


def main() -> None:
    """lm-eval's own command line, with ``peftlab`` registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
