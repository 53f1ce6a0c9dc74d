"""``run_holistic_config`` (``peftlab holistic``): every HELM category for one model, and its plot.

Tasks are scored as the harness scores them (:func:`peftlab.eval.harness.evaluate_task`), then again
under each perturbation (:mod:`.perturbations`, only the prompts a perturbation changed); the
generations and probe continuations feed bias and toxicity; :mod:`.measures` turns it all into numbers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from peftlab.config import HolisticConfig
from peftlab.errors import UserError
from peftlab.eval.harness.families import resolve_tasks
from peftlab.eval.harness.runner import (
    ChatFormat,
    TaskResult,
    build_prompts,
    chat_format,
    evaluate_task,
    keyword_config,
    load_inference_model,
    score_prompts,
    task_list,
)
from peftlab.eval.harness.scoring import generate_until
from peftlab.eval.harness.tasks import DEFAULT_FEWSHOT_SEED, Task
from peftlab.eval.holistic.measures import (
    ece_equal_mass,
    efficiency_numbers,
    representation_bias,
    selective_accuracy,
    stereotype_bias,
    toxic_fraction,
    worst_case,
)
from peftlab.eval.holistic.perturbations import FAIRNESS, PERTURBATIONS, ROBUSTNESS, document_perturber
from peftlab.eval.holistic.words import lexicon
from peftlab.models import LoadedModel
from peftlab.progress import ProgressFactory, silent


@dataclass
class HolisticResult:
    model: str
    adapter: str | None
    summary: dict[str, float | None]
    """Headline numbers: accuracy, ece, selective_acc@10, robustness, fairness, bias_*, toxicity, efficiency."""
    tasks: dict[str, dict]
    """Per task: accuracy under each perturbation, worst cases, calibration, item count."""
    bias: dict[str, dict]
    toxicity: dict
    efficiency: dict
    generations: list[dict]
    """What bias and toxicity were measured on: source, prompt, text."""
    lexicons: dict[str, str]
    settings: dict
    seconds: float

    def to_dict(self, include_items: bool = True) -> dict:
        data = asdict(self)
        if not include_items:
            data.pop("generations")
        return data

    def rows(self) -> list[dict]:
        """``{category, metric, value}`` rows: the report as a table."""
        category = {"accuracy": "accuracy", "ece": "calibration", "selective_acc@10": "calibration",
                    "robustness": "robustness", "fairness": "fairness", "toxicity": "toxicity"}
        rows = []
        for metric, value in self.summary.items():
            name = category.get(metric) or ("bias" if metric.startswith("bias_") else "efficiency")
            rows.append({"category": name, "metric": metric, "value": value})
        return rows


def _mean(values: Sequence[float | None]) -> float | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else None


def _perturbed_scores(loaded: LoadedModel, task: Task, original: TaskResult, name: str, *, seed: int,
                      num_fewshot: int | None, limit: int | None, fewshot_seed: int, batch_size: int,
                      max_gen_toks: int | None, chat: ChatFormat | None,
                      progress: ProgressFactory) -> tuple[list[float], int]:
    """Scores under one perturbation; prompts the perturbation left unchanged keep their original score."""
    prompts = build_prompts(task, num_fewshot=num_fewshot, limit=limit, seed=fewshot_seed,
                            perturb=document_perturber(task, name, seed), chat=chat)
    scores = [item["score"] for item in original.items]
    changed = [p for p, item in zip(prompts, original.items) if p.context != item["prompt"]]
    if changed:
        items = score_prompts(loaded, task, changed, batch_size=batch_size, max_gen_toks=max_gen_toks, progress=progress)
        for prompt, item in zip(changed, items):
            scores[prompt.index] = item["score"]
    return scores, len(changed)


def run_holistic_config(config: HolisticConfig, *, probes: Sequence[str] | None = None,
                        loaded: LoadedModel | None = None, fewshot_seed: int = DEFAULT_FEWSHOT_SEED,
                        progress: ProgressFactory = silent) -> HolisticResult:
    """Measure the HELM categories for ``config.model`` (+ ``config.adapter``; or ``loaded``, a model in
    memory) on ``config.tasks`` (see :mod:`peftlab.eval.holistic`).

    ``probes`` are the open-ended prompts whose continuations (``config.probe_tokens`` greedy tokens
    each) feed bias and toxicity; None uses the built-in ones, ``[]`` none. ``config.seed`` fixes the
    perturbations; the other fields are :func:`peftlab.eval.harness.run_harness_config`'s.
    """
    if config.probe_tokens < 1:
        raise UserError(f"--probe-tokens must be >= 1, got {config.probe_tokens}")
    tasks = task_list(config.tasks)
    resolved = resolve_tasks(tasks, data_root=config.data_root, split=config.split)
    bias_words = lexicon("bias")
    probes = list(bias_words["probes"]) if probes is None else list(probes)
    start = time.perf_counter()
    loaded = load_inference_model(config, loaded, progress)
    options = dict(num_fewshot=config.num_fewshot, limit=config.limit, fewshot_seed=fewshot_seed,
                   batch_size=config.batch_size, max_gen_toks=config.max_gen_toks,
                   chat=chat_format(loaded, config.apply_chat_template), progress=progress)

    per_task: dict[str, dict] = {}
    generations: list[dict] = []
    gen_tokens, gen_seconds, mc_items, mc_seconds = 0, 0.0, 0, 0.0
    for task in resolved:
        original = evaluate_task(loaded, task, **options)
        base = [item["score"] for item in original.items]
        perturbed, changed = {}, {}
        for name in PERTURBATIONS:
            perturbed[name], changed[name] = _perturbed_scores(loaded, task, original, name, seed=config.seed, **options)
        entry = {
            "metric": original.main_metric,
            "num_items": original.num_items,
            "accuracy": _mean(base),
            **{f"accuracy_{name}": _mean(perturbed[name]) for name in PERTURBATIONS},
            "robustness": _mean(worst_case(base, *(perturbed[n] for n in ROBUSTNESS))),
            "fairness": _mean(worst_case(base, *(perturbed[n] for n in FAIRNESS))),
            "perturbed_items": changed,
        }
        if task.is_multiple_choice:
            confidences = [item["confidence"] for item in original.items]
            entry["ece"] = ece_equal_mass(confidences, base, bins=10)
            entry["selective_acc@10"] = selective_accuracy(confidences, base, coverage=0.1)
            mc_items += original.num_items
            mc_seconds += original.seconds
        else:
            generations += [{"source": task.name, "prompt": item["prompt"], "text": item["generation"]} for item in original.items]
            gen_tokens += original.generated_tokens
            gen_seconds += original.generation_seconds
        per_task[task.name] = entry

    if probes:
        out = generate_until(loaded.model, loaded.tokenizer, probes, is_seq2seq=loaded.is_seq2seq, until=["\n\n"],
                             max_gen_toks=config.probe_tokens, batch_size=config.batch_size, progress=progress)
        generations += [{"source": "probe", "prompt": p, "text": t} for p, t in zip(probes, out.texts)]
        gen_tokens += sum(out.new_tokens)
        gen_seconds += out.seconds

    texts = [g["text"] for g in generations]
    bias = {}
    for category, groups in bias_words["groups"].items():
        bias[category] = {
            "representation": representation_bias(texts, groups),
            **{f"stereotype_{kind}": stereotype_bias(texts, groups, words) for kind, words in bias_words["targets"].items()},
            "groups": list(groups),
        }
    toxic_terms = lexicon("toxicity")
    toxicity = {"fraction": toxic_fraction(texts, toxic_terms["terms"]), "num_generations": len(texts),
                "lexicon": f"{toxic_terms['name']} v{toxic_terms['version']} ({len(toxic_terms['terms'])} terms; "
                           "a local word list, not HELM's Perspective API)"}
    efficiency = {
        **efficiency_numbers(gen_tokens, gen_seconds, mc_items, mc_seconds),
        "device": str(next(loaded.model.parameters()).device),
        "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
    }
    summary = {
        "accuracy": _mean([t["accuracy"] for t in per_task.values()]),
        "ece": _mean([t.get("ece") for t in per_task.values()]),
        "selective_acc@10": _mean([t.get("selective_acc@10") for t in per_task.values()]),
        "robustness": _mean([t["robustness"] for t in per_task.values()]),
        "fairness": _mean([t["fairness"] for t in per_task.values()]),
        **{f"bias_{c}_{k}": v for c, d in bias.items() for k, v in d.items() if k != "groups"},
        "toxicity": toxicity["fraction"],
        "tokens_per_second": efficiency["tokens_per_second"],
        "seconds_per_output_token": efficiency["seconds_per_output_token"],
        "mc_items_per_second": efficiency["mc_items_per_second"],
    }
    lexicons = {name: f"{lexicon(name)['name']} v{lexicon(name)['version']}" for name in ("perturbations", "bias", "toxicity")}
    settings = {"tasks": tasks, "data_root": str(config.data_root) if config.data_root is not None else None,
                "split": config.split, "num_fewshot": config.num_fewshot, "limit": config.limit,
                "batch_size": config.batch_size, "max_gen_toks": config.max_gen_toks,
                "probe_tokens": config.probe_tokens, "num_probes": len(probes), "seed": config.seed,
                "fewshot_seed": fewshot_seed, "apply_chat_template": config.apply_chat_template,
                "dtype": config.dtype, "device": config.device}
    return HolisticResult(loaded.name, config.adapter, summary, per_task, bias, toxicity, efficiency, generations,
                          lexicons, settings, time.perf_counter() - start)


def run_holistic(model: str | LoadedModel, tasks: Sequence[str], *, probes: Sequence[str] | None = None,
                 fewshot_seed: int = DEFAULT_FEWSHOT_SEED, progress: ProgressFactory = silent,
                 **options) -> HolisticResult:
    """The keyword form of :func:`run_holistic_config`: ``options`` are
    :class:`~peftlab.config.HolisticConfig`'s fields (``data_root``, ``limit``, ``probe_tokens``, ``seed`` ...),
    ``device`` cpu unless given."""
    config = keyword_config(HolisticConfig, model, tasks, options)
    return run_holistic_config(config, probes=probes, loaded=model if isinstance(model, LoadedModel) else None,
                               fewshot_seed=fewshot_seed, progress=progress)


# ---------------------------------------------------------------------------------------------- plot

_HIGHER_IS_BETTER = {"accuracy": True, "selective_acc@10": True, "robustness": True, "fairness": True}


def plot_holistic(result: HolisticResult | dict, path: str | Path) -> Path:
    """A bar chart of the report's [0, 1] measures (efficiency in the title), saved as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = result.to_dict(include_items=False) if isinstance(result, HolisticResult) else result
    summary = data["summary"]
    names = [k for k, v in summary.items() if v is not None and k not in
             ("tokens_per_second", "seconds_per_output_token", "mc_items_per_second") and not math.isnan(v)]
    values = [summary[k] for k in names]
    colours = ["tab:green" if _HIGHER_IS_BETTER.get(k, False) else "tab:red" for k in names]
    figure = Figure(figsize=(8, 0.45 * len(names) + 1.6))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.barh(range(len(names)), values, color=colours)
    axes.set_yticks(range(len(names)), labels=names)
    axes.invert_yaxis()
    axes.set_xlim(0, 1)
    for i, v in enumerate(values):
        axes.text(min(v + 0.01, 0.9), i, f"{v:.3f}", va="center")
    tps, spt = summary.get("tokens_per_second"), summary.get("seconds_per_output_token")
    speed = f"{tps:.1f} tokens/s, {1000 * spt:.1f} ms/token" if tps and spt else "no generations timed"
    axes.set_title(f"{data['model']}{' + ' + str(data['adapter']) if data.get('adapter') else ''}\n"
                   f"green: higher is better, red: lower is better; {speed}", fontsize=9)
    figure.tight_layout()
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path
