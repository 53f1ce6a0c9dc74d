"""``peftlab harness``: evaluate a model (with or without an adapter) on benchmark tasks.

    >>> from peftlab.eval.harness import run_harness, write_results
    >>> result = run_harness("smollm2-135m-instruct", ["mmlu_anatomy"], data_root="../shared/data", split="val")
    >>> config = HarnessConfig(model="smollm2-135m-instruct", tasks="mmlu_anatomy", data_root="../shared/data",
    ...                        split="val")
    >>> result = run_harness_config(config)  # the same, from the typed config (``peftlab harness``)
    >>> result.tasks["mmlu_anatomy"].metrics["acc"], result.groups["mmlu"]["acc"]
    >>> write_results(result, "runs/harness.json")

Each task becomes prompts (:mod:`.tasks`), the prompts are scored (:mod:`.scoring`) and the
scores aggregated (:mod:`.metrics`). Multiple-choice tasks report ``acc`` and ``acc_norm``
(plus their metric_list's); generation tasks their metric_list's (``exact_match`` by default).
Families aggregate size-weighted: ``mmlu`` (and ``mmlu_<category>``) as the harness does,
``bbh`` likewise; ``*_macro`` is the plain mean over tasks.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

from peftlab.config import HarnessConfig
from peftlab.errors import UserError
from peftlab.eval.harness import metrics as M
from peftlab.eval.harness.families import resolve_tasks
from peftlab.eval.harness.scoring import generate_until, loglikelihoods
from peftlab.eval.harness.tasks import DEFAULT_FEWSHOT_SEED, FewshotSampler, Task
from peftlab.models import LoadedModel, load_for_inference
from peftlab.outputs import write_atomic
from peftlab.progress import ProgressFactory, silent
from peftlab.training.distributed import Distributed

Perturb = Callable[[dict, int], dict]
"""``(document, index) -> perturbed copy``: changes what the question of a prompt says."""


@dataclass
class Prompt:
    index: int
    context: str
    choices: list[str] | None = None
    gold: list[int] | None = None
    references: list[str] | None = None
    scores: list[float] | None = None
    """BIG-bench ``target_scores`` of the choices, when the task has them."""
    delimiter: str = " "
    """Put before each choice of a multiple-choice continuation."""


@dataclass
class TaskResult:
    task: str
    output_type: str
    split: str
    num_fewshot: int
    num_items: int
    main_metric: str | None
    """The metric each item's ``score`` holds: ``acc`` for multiple choice, else the first per-item metric."""
    metrics: dict[str, float]
    stderr: dict[str, float]
    items: list[dict]
    seconds: float
    group: str | None = None
    category: str | None = None
    generated_tokens: int = 0
    """Generation tasks: tokens generated, all items together."""
    generation_seconds: float = 0.0


@dataclass
class HarnessResult:
    model: str
    adapter: str | None
    tasks: dict[str, TaskResult]
    groups: dict[str, dict[str, float]]
    settings: dict
    seconds: float
    items_per_second: float = field(default=0.0)

    def to_dict(self, include_items: bool = True) -> dict:
        data = asdict(self)
        if not include_items:
            for task in data["tasks"].values():
                task.pop("items")
        return data

    def rows(self) -> list[dict]:
        """One row per (task or group, metric): a table for the CLI or a report."""
        rows = []
        for name, result in self.tasks.items():
            for metric, value in result.metrics.items():
                rows.append({"task": name, "metric": metric, "value": value, "stderr": result.stderr.get(metric),
                             "n": result.num_items, "shots": result.num_fewshot})
        for name, group in self.groups.items():
            for metric, value in group.items():
                if metric not in ("num_tasks", "num_items"):
                    rows.append({"task": name, "metric": metric, "value": value, "stderr": None,
                                 "n": group["num_items"], "shots": None})
        return rows


# ------------------------------------------------------------------------------------------ prompts


ChatFormat = Callable[[list[dict]], str]
"""Renders chat messages as one prompt string ending with the assistant's turn."""


def chat_format(loaded: LoadedModel, apply_chat_template: bool) -> ChatFormat | None:
    """The tokenizer's chat template as a :data:`ChatFormat` (None when not asked for)."""
    if not apply_chat_template:
        return None
    tokenizer = loaded.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{loaded.name}'s tokenizer has no chat template; drop --apply-chat-template")

    def render(messages: list[dict]) -> str:
        import jinja2

        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except jinja2.exceptions.TemplateError:  # a template without a system role: the harness drops it
            kept = [m for m in messages if m["role"] != "system"]
            return tokenizer.apply_chat_template(kept, tokenize=False, add_generation_prompt=True)

    return render


def build_prompts(task: Task, *, num_fewshot: int | None = None, limit: int | None = None,
                  seed: int = DEFAULT_FEWSHOT_SEED, perturb: Perturb | None = None,
                  chat: ChatFormat | None = None) -> list[Prompt]:
    """The prompts of the first ``limit`` documents, few-shot examples drawn as the harness draws them.

    ``perturb`` rewrites each document's question (not the few-shot examples, the choices or the
    target); the few-shot draw is the same with or without it. ``chat`` renders each prompt as
    chat messages (see :meth:`Task.chat_messages`); multiple-choice continuations then have no
    delimiter, as in the harness.
    """
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")
    shots = (task.config.num_fewshot or 0) if num_fewshot is None else num_fewshot
    if shots < 0:
        raise UserError(f"--num-fewshot must be >= 0, got {shots}")
    docs = task.docs[:limit]
    sampler = None
    if shots > 0:
        if not task.fewshot_docs:
            raise UserError(f"{task.where()}: {shots}-shot asked for, but the task has no few-shot documents")
        sampler = FewshotSampler(task.fewshot_docs, task.config.fewshot_config.sampler, seed, task.where())
    # The harness leaves the evaluated document out of its own shots only when the splits coincide.
    exclude = task.config.fewshot_split_name == task.config.test_split
    prompts = []
    for i, doc in enumerate(docs):
        examples = sampler.sample(shots, doc if exclude else None) if sampler else []
        query = perturb(doc, i) if perturb is not None else None
        if chat is None:
            prompt = Prompt(i, task.context(doc, examples, i, query), delimiter=task.config.target_delimiter)
        else:
            prompt = Prompt(i, chat(task.chat_messages(doc, examples, i, query)), delimiter="")
        if task.is_multiple_choice:
            prompt.choices = task.choices(doc, i)
            prompt.gold = task.gold(doc, prompt.choices, i)
            if isinstance(doc.get("scores"), list) and len(doc["scores"]) == len(prompt.choices):
                prompt.scores = [float(s) for s in doc["scores"]]
        else:
            prompt.references = task.references(doc, i)
        prompts.append(prompt)
    return prompts


# ------------------------------------------------------------------------------------------ scoring


def _metric_specs(task: Task) -> list[tuple[str, str, dict]]:
    default = [{"metric": "acc"}, {"metric": "acc_norm"}] if task.is_multiple_choice else [{"metric": "exact_match"}]
    entries = task.config.metric_list or default
    specs = [M.check_metric(e, task.config.output_type, task.where()) for e in entries]
    if task.is_multiple_choice:  # acc and acc_norm always
        names = {s[0] for s in specs}
        specs = [(n, n, {}) for n in ("acc", "acc_norm") if n not in names] + specs
    return specs


def evaluate_task(loaded: LoadedModel, task: Task, *, num_fewshot: int | None = None, limit: int | None = None,
                  batch_size: int = 8, fewshot_seed: int = DEFAULT_FEWSHOT_SEED, max_gen_toks: int | None = None,
                  perturb: Perturb | None = None, chat: ChatFormat | None = None,
                  progress: ProgressFactory = silent) -> TaskResult:
    """Score one task; ``items`` hold each document's prompt, prediction and scores (``chat``: see
    :func:`build_prompts`)."""
    start = time.perf_counter()
    specs = _metric_specs(task)
    prompts = build_prompts(task, num_fewshot=num_fewshot, limit=limit, seed=fewshot_seed, perturb=perturb, chat=chat)
    # under torchrun (peftlab harness) each rank scores every world_size-th prompt; all ranks get all items back
    dist = Distributed.current()
    items, main, generated, gen_seconds = _score(loaded, task, dist.shard(prompts), specs, batch_size, max_gen_toks, progress)
    items = dist.unshard(items)
    counts = dist.gather((generated, gen_seconds))
    generated, gen_seconds = sum(c[0] for c in counts), max(c[1] for c in counts)
    corpus = _choice_pairs if task.is_multiple_choice else _generation_pairs
    values: dict[str, float] = {}
    stderr: dict[str, float] = {}
    for name, metric, _ in specs:
        if metric in M.CORPUS_METRICS:
            golds, preds = corpus(items)
            values[name] = M.corpus_metric(metric, golds, preds)
        else:
            values[name], stderr[name] = M.mean_and_stderr([item[name] for item in items])
    shots = (task.config.num_fewshot or 0) if num_fewshot is None else num_fewshot
    return TaskResult(task.name, task.config.output_type, task.split, shots, len(items), main, values, stderr, items,
                      time.perf_counter() - start, task.group, task.category, generated, gen_seconds)


def score_prompts(loaded: LoadedModel, task: Task, prompts: list[Prompt], *, batch_size: int = 8,
                  max_gen_toks: int | None = None, progress: ProgressFactory = silent) -> list[dict]:
    """Items for already-built prompts (each with ``score``: the task's main metric), no aggregation."""
    return _score(loaded, task, prompts, _metric_specs(task), batch_size, max_gen_toks, progress)[0]


def _score(loaded, task, prompts, specs, batch_size, max_gen_toks, progress) -> tuple[list[dict], str | None, int, float]:
    named = _named(progress, task.name)
    if task.is_multiple_choice:
        items, main, generated, seconds = _score_choices(loaded, task, prompts, batch_size, named), "acc", 0, 0.0
    else:
        items, generated, seconds = _score_generations(loaded, task, prompts, specs, batch_size, max_gen_toks, named)
        main = next((name for name, metric, _ in specs if metric not in M.CORPUS_METRICS), None)
    for item in items:
        item["score"] = item.get(main) if main is not None else None
    return items, main, generated, seconds


def _named(progress: ProgressFactory, name: str) -> ProgressFactory:
    def factory(description: str, total: int | None, unit: str = "it"):
        return progress(f"{name} ({description})", total, unit)

    return factory


def _score_choices(loaded: LoadedModel, task: Task, prompts: list[Prompt], batch_size: int,
                   progress: ProgressFactory) -> list[dict]:
    requests = [(p.context, p.delimiter + choice) for p in prompts for choice in p.choices]
    results = loglikelihoods(loaded.model, loaded.tokenizer, requests, is_seq2seq=loaded.is_seq2seq,
                             batch_size=batch_size, progress=progress)
    items, at = [], 0
    for p in prompts:
        scored = results[at : at + len(p.choices)]
        at += len(p.choices)
        lls = [r.logprob for r in scored]
        item = {"index": p.index, "prompt": p.context, "choices": p.choices, "gold": p.gold,
                "loglikelihoods": lls, "is_greedy": [r.is_greedy for r in scored]}
        item.update(M.multiple_choice_item(lls, p.choices, p.gold))
        item["multiple_choice_grade"] = p.scores[item["pred"]] if p.scores else item["acc"]
        items.append(item)
    return items


def _score_generations(loaded: LoadedModel, task: Task, prompts: list[Prompt], specs, batch_size: int,
                       max_gen_toks: int | None, progress: ProgressFactory) -> tuple[list[dict], int, float]:
    limit = max_gen_toks if max_gen_toks is not None else task.config.max_gen_toks
    out = generate_until(loaded.model, loaded.tokenizer, [p.context for p in prompts], is_seq2seq=loaded.is_seq2seq,
                         until=task.config.until, max_gen_toks=limit, batch_size=batch_size, progress=progress)
    items = []
    for p, text, tokens in zip(prompts, out.texts, out.new_tokens):
        item = {"index": p.index, "prompt": p.context, "generation": text, "references": p.references, "new_tokens": tokens}
        for name, metric, options in specs:
            score = M.generation_item(text, p.references, metric, options)
            if score is not None:
                item[name] = score
        items.append(item)
    return items, sum(out.new_tokens), out.seconds


def _choice_pairs(items: list[dict]) -> tuple[list[int], list[int]]:
    return [item["gold"][0] for item in items], [item["pred"] for item in items]


def _generation_pairs(items: list[dict]) -> tuple[list[float], list[float]]:
    return [M.to_number(item["references"][0]) for item in items], [M.to_number(item["generation"]) for item in items]


# ------------------------------------------------------------------------------------------ groups


def group_scores(results: Sequence[TaskResult]) -> dict[str, dict[str, float]]:
    """Size-weighted means per family (and MMLU category) over the metrics all its tasks share."""
    members: dict[str, list[TaskResult]] = {}
    for r in results:
        if r.group:
            members.setdefault(r.group, []).append(r)
            if r.category:
                members.setdefault(f"{r.group}_{r.category}", []).append(r)
    groups = {}
    for name, rs in members.items():
        shared = [m for m in rs[0].metrics if all(m in r.metrics for r in rs)]
        total = sum(r.num_items for r in rs)
        scores: dict[str, float] = {}
        for metric in shared:
            scores[metric] = sum(r.metrics[metric] * r.num_items for r in rs) / total
            scores[f"{metric}_macro"] = sum(r.metrics[metric] for r in rs) / len(rs)
        groups[name] = {**scores, "num_tasks": len(rs), "num_items": total}
    return groups


# ------------------------------------------------------------------------------------------ the API


def task_list(tasks: str) -> list[str]:
    """``"mmlu_anatomy, bbh"`` -> ``["mmlu_anatomy", "bbh"]`` (a config's comma-separated ``tasks``)."""
    return [t.strip() for t in tasks.split(",") if t.strip()]


C = TypeVar("C", bound=HarnessConfig)


def keyword_config(config_type: type[C], model: str | LoadedModel, tasks: Sequence[str], options: dict) -> C:
    """A :class:`HarnessConfig` (or subclass) from the keyword form's arguments; ``device`` defaults to cpu there."""
    name = model.name if isinstance(model, LoadedModel) else model
    return config_type(model=name, tasks=",".join(tasks), **{"device": "cpu", **options})


def load_inference_model(config: HarnessConfig, loaded: LoadedModel | None, progress: ProgressFactory) -> LoadedModel:
    """``loaded`` when given (a model already in memory), else ``config.model`` + ``config.adapter`` loaded."""
    if loaded is None:
        return load_for_inference(config.model, config.adapter, config.dtype, config.device, config.trust_pickle, progress)
    if config.adapter:
        raise UserError("pass the adapter when loading the model, or the model's name with adapter=...")
    return loaded


def run_harness_config(config: HarnessConfig, *, loaded: LoadedModel | None = None,
                       fewshot_seed: int = DEFAULT_FEWSHOT_SEED, progress: ProgressFactory = silent) -> HarnessResult:
    """Evaluate ``config.model`` (+ ``config.adapter``; or ``loaded``, a model in memory) on ``config.tasks``
    (names, families or files; see :mod:`.families`).

    ``split`` picks the evaluated split (default: each task's test split), ``num_fewshot`` overrides
    the tasks' shot counts, ``limit`` keeps the first documents of each task, ``max_gen_toks`` caps
    generation tasks' new tokens, ``apply_chat_template`` wraps each prompt in the tokenizer's chat
    template (for instruction-tuned models; see :meth:`Task.chat_messages`). Tasks are resolved (and
    their data read) before the model loads. ``config.out`` is not written here.

    ``backend="lm-eval"`` hands the tasks to lm-evaluation-harness itself (its task names, or task
    YAML files) through :mod:`peftlab.eval.lm_eval_bridge`; the result has the same form.
    """
    if config.backend == "lm-eval":
        return _run_lm_eval(config, loaded, fewshot_seed)
    tasks = task_list(config.tasks)
    resolved = resolve_tasks(tasks, data_root=config.data_root, split=config.split)
    start = time.perf_counter()
    loaded = load_inference_model(config, loaded, progress)
    chat = chat_format(loaded, config.apply_chat_template)
    results = {}
    for task in resolved:
        results[task.name] = evaluate_task(loaded, task, num_fewshot=config.num_fewshot, limit=config.limit,
                                           batch_size=config.batch_size, fewshot_seed=fewshot_seed,
                                           max_gen_toks=config.max_gen_toks, chat=chat, progress=progress)
    seconds = time.perf_counter() - start
    settings = {"tasks": tasks, "data_root": str(config.data_root) if config.data_root is not None else None,
                "split": config.split, "num_fewshot": config.num_fewshot, "limit": config.limit,
                "batch_size": config.batch_size, "max_gen_toks": config.max_gen_toks, "fewshot_seed": fewshot_seed,
                "apply_chat_template": config.apply_chat_template, "dtype": config.dtype, "device": config.device,
                "is_seq2seq": loaded.is_seq2seq}
    task_seconds = sum(r.seconds for r in results.values())
    items = sum(r.num_items for r in results.values())
    return HarnessResult(loaded.name, config.adapter, results, group_scores(list(results.values())), settings, seconds,
                         items / task_seconds if task_seconds > 0 else 0.0)


def _run_lm_eval(config: HarnessConfig, loaded: LoadedModel | None, fewshot_seed: int) -> HarnessResult:
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise UserError("--backend lm-eval needs lm-evaluation-harness: pip install 'peftlab[lm-eval]' (or use --backend peftlab)")
    from peftlab.eval.lm_eval_bridge import run_lm_eval_config

    return run_lm_eval_config(config, loaded=loaded, fewshot_seed=fewshot_seed)


def run_harness(model: str | LoadedModel, tasks: Sequence[str], *, fewshot_seed: int = DEFAULT_FEWSHOT_SEED,
                progress: ProgressFactory = silent, **options) -> HarnessResult:
    """The keyword form of :func:`run_harness_config`: ``options`` are :class:`~peftlab.config.HarnessConfig`'s
    fields (``adapter``, ``data_root``, ``split``, ``limit`` ...), ``device`` cpu unless given."""
    config = keyword_config(HarnessConfig, model, tasks, options)
    return run_harness_config(config, loaded=model if isinstance(model, LoadedModel) else None,
                              fewshot_seed=fewshot_seed, progress=progress)


def write_results(result, path: str | Path, include_items: bool = True) -> Path:
    """Write a :class:`HarnessResult` (or a holistic result, anything with ``to_dict``) as JSON, atomically."""

    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    data = result.to_dict(include_items=include_items)
    write_atomic(path, json.dumps(_finite(data), indent=2) + "\n")
    return path


def _finite(value):
    """JSON has no NaN: undefined numbers (a correlation of a constant) are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
