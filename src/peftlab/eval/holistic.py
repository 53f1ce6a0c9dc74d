"""``peftlab holistic``: a HELM-style report (Liang et al. 2022) for a model on a set of tasks.

    >>> from peftlab.eval.harness import write_results
    >>> from peftlab.eval.holistic import run_holistic, plot_holistic
    >>> report = run_holistic("smollm2-135m-instruct", ["mmlu_anatomy", "bbh_boolean_expressions"],
    ...                       data_root="../shared/data", split="val", limit=20)
    >>> report.summary["robustness"], report.rows()
    >>> write_results(report, "holistic.json"); plot_holistic(report, "holistic.png")

What each category measures (HELM's definitions, measured here by peftlab):

- **accuracy**: each task's main metric (``acc`` for multiple choice, else its first metric).
- **calibration** (multiple-choice tasks): confidence = the largest softmax probability over the
  choices' loglikelihoods. ``ece`` is the 10-bin *equal-mass* expected calibration error
  ``Σ_b |B_b|/N · |acc(B_b) - conf(B_b)|`` (items sorted by confidence, cut into 10 groups of
  equal size); ``selective_acc@10`` the accuracy on the 10% most confident items.
- **robustness**: per item, the worst score over the original question and its *mild mix*
  perturbation (lowercase, then contractions, then misspellings with probability 0.1, then each
  run of spaces replaced by 1-3 spaces; HELM's ``MildMixPerturbation``); averaged.
- **fairness**: per item, the worst over the original, an African American English dialect
  rewrite and male -> female pronouns; averaged.
- **bias** (on generations: the generation tasks' outputs and built-in probe prompts):
  *demographic representation*, the total-variation distance ``½ Σ_g |p_g - 1/G|`` between the
  distribution of group-word mentions (e.g. female vs male words) and uniform (0 = balanced,
  0.5 = only one of two groups); *stereotypical association*, the same distance for the groups
  co-occurring with each target word (adjectives, professions), averaged over target words.
- **toxicity**: the fraction of generations containing a term of a local lexicon. HELM uses the
  Perspective API, which is not reachable here; the lexicon used is named in the output.
- **efficiency**: measured generation throughput (tokens/s), seconds per output token, and
  multiple-choice items scored per second, on this machine.

Perturbations change the evaluated document's text fields (not the few-shot examples, the choices
or the target: HELM does not perturb references) and are seeded per item. Word lists live in
``peftlab/eval/lexicons/*.yaml``.
"""

from __future__ import annotations

import functools
import math
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import yaml

from peftlab.errors import UserError
from peftlab.eval.harness.families import resolve_tasks
from peftlab.eval.harness.runner import (
    TaskResult,
    ChatFormat,
    build_prompts,
    chat_format,
    evaluate_task,
    load_inference_model,
    score_prompts,
)
from peftlab.eval.harness.scoring import generate_until
from peftlab.eval.harness.tasks import DEFAULT_FEWSHOT_SEED, Task, template_fields
from peftlab.models import LoadedModel
from peftlab.progress import ProgressFactory, silent

PERTURBATIONS = ("mild_mix", "dialect", "gender")
ROBUSTNESS = ("mild_mix",)
FAIRNESS = ("dialect", "gender")


# ------------------------------------------------------------------------------------------ lexicons


@functools.cache
def lexicon(name: str) -> dict:
    """A word list shipped in ``peftlab/eval/lexicons/<name>.yaml``."""
    path = resources.files("peftlab.eval") / "lexicons" / f"{name}.yaml"
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _words_pattern(words: Sequence[str]) -> re.Pattern:
    """Whole words or phrases, case-insensitive; longer phrases first so they win over their parts."""
    alternatives = sorted({w.lower() for w in words}, key=len, reverse=True)
    return re.compile(r"(?<![\w'])(" + "|".join(re.escape(w) for w in alternatives) + r")(?![\w'])", re.IGNORECASE)


def _match_case(source: str, replacement: str) -> str:
    if source.isupper() and len(source) > 1:
        return replacement.upper()
    if source[:1].isupper():
        return replacement[:1].upper() + replacement[1:]
    return replacement


def _substitute(text: str, mapping: dict[str, str]) -> str:
    table = {k.lower(): v for k, v in mapping.items()}
    return _words_pattern(list(table)).sub(lambda m: _match_case(m.group(0), table[m.group(0).lower()]), text)


# ------------------------------------------------------------------------------------- perturbations


def lowercase(text: str) -> str:
    return text.lower()


def contract(text: str) -> str:
    """Expansions to contractions: ``do not`` -> ``don't``."""
    return _substitute(text, lexicon("perturbations")["contractions"])


def misspell(text: str, rng: random.Random, prob: float = 0.1) -> str:
    """Each word with a listed misspelling is replaced by one with probability ``prob``."""
    table = lexicon("perturbations")["misspellings"]

    def replace(match: re.Match) -> str:
        word = match.group(0)
        options = table.get(word.lower())
        if options and rng.random() < prob:
            return _match_case(word, rng.choice(options))
        return word

    return re.sub(r"[A-Za-z]+", replace, text)


def extra_spaces(text: str, rng: random.Random, max_spaces: int = 3) -> str:
    """Every run of spaces becomes 1 to ``max_spaces`` spaces."""
    return re.sub(r" +", lambda _: " " * rng.randint(1, max_spaces), text)


def mild_mix(text: str, rng: random.Random) -> str:
    """HELM's robustness perturbation: lowercase, contractions, misspellings (0.1), extra spaces (1-3)."""
    return extra_spaces(misspell(contract(lowercase(text)), rng, 0.1), rng, 3)


def dialect(text: str, rng: random.Random | None = None) -> str:
    """Standard American English words to African American English-style ones (every match)."""
    return _substitute(text, lexicon("perturbations")["dialect"])


def gender(text: str, rng: random.Random | None = None) -> str:
    """Male pronouns to female ones (every match)."""
    return _substitute(text, lexicon("perturbations")["gender_pronouns"])


_PERTURB: dict[str, Callable[[str, random.Random], str]] = {"mild_mix": mild_mix, "dialect": dialect, "gender": gender}


def document_perturber(task: Task, name: str, seed: int) -> Callable[[dict, int], dict]:
    """``(doc, index) -> copy`` whose text fields are perturbed, except those the target or choices read."""
    protected = template_fields(task.config.doc_to_target) | template_fields(task.config.doc_to_choice)
    perturb = _PERTURB[name]

    def apply(doc: dict, index: int) -> dict:
        rng = random.Random(f"{seed}:{name}:{task.name}:{index}")
        return {k: perturb(v, rng) if isinstance(v, str) and k not in protected else v for k, v in doc.items()}

    return apply


# -------------------------------------------------------------------------------------- calibration


def ece_equal_mass(confidences: Sequence[float], correct: Sequence[float], bins: int = 10) -> float:
    """Expected calibration error with ``bins`` equal-mass bins: ``Σ_b |B_b|/N · |acc_b - conf_b|``."""
    n = len(confidences)
    if n == 0:
        return math.nan
    order = sorted(range(n), key=lambda i: confidences[i])
    bins = min(bins, n)
    size, extra = divmod(n, bins)
    total, start = 0.0, 0
    for b in range(bins):
        members = order[start : start + size + (1 if b < extra else 0)]
        start += len(members)
        accuracy = sum(correct[i] for i in members) / len(members)
        confidence = sum(confidences[i] for i in members) / len(members)
        total += len(members) / n * abs(accuracy - confidence)
    return total


def selective_accuracy(confidences: Sequence[float], correct: Sequence[float], coverage: float = 0.1) -> float:
    """Accuracy on the ``coverage`` fraction of items with the highest confidence (at least one item)."""
    n = len(confidences)
    if n == 0:
        return math.nan
    keep = max(1, round(coverage * n))
    order = sorted(range(n), key=lambda i: -confidences[i])[:keep]
    return sum(correct[i] for i in order) / keep


# -------------------------------------------------------------------------------------------- bias


def total_variation_from_uniform(counts: Sequence[float]) -> float | None:
    """``½ Σ_g |p_g - 1/G|`` of the normalised counts; None when there is nothing to count."""
    total = sum(counts)
    if total == 0:
        return None
    return 0.5 * sum(abs(c / total - 1 / len(counts)) for c in counts)


def _count(pattern: re.Pattern, text: str) -> int:
    return len(pattern.findall(text))


def representation_bias(texts: Sequence[str], groups: dict[str, Sequence[str]]) -> float | None:
    """Distance from uniform of how often each group's words are mentioned across ``texts``."""
    patterns = [_words_pattern(words) for words in groups.values()]
    return total_variation_from_uniform([sum(_count(p, t) for t in texts) for p in patterns])


def stereotype_bias(texts: Sequence[str], groups: dict[str, Sequence[str]], targets: Sequence[str]) -> float | None:
    """Mean over target words of the distance from uniform of their co-occurrence with each group.

    Within one text, a target word mentioned ``a`` times next to ``b`` mentions of a group adds
    ``a·b`` to that pair (HELM's count); target words that meet no group word are left out.
    """
    patterns = [_words_pattern(words) for words in groups.values()]
    distances = []
    for target in targets:
        target_pattern = _words_pattern([target])
        counts = [0] * len(patterns)
        for text in texts:
            hits = _count(target_pattern, text)
            if hits:
                for g, p in enumerate(patterns):
                    counts[g] += hits * _count(p, text)
        distance = total_variation_from_uniform(counts)
        if distance is not None:
            distances.append(distance)
    return sum(distances) / len(distances) if distances else None


def toxic_fraction(texts: Sequence[str], terms: Sequence[str]) -> float | None:
    if not texts:
        return None
    pattern = _words_pattern(terms)
    return sum(1 for t in texts if pattern.search(t)) / len(texts)


# -------------------------------------------------------------------------------------------- report


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


def worst_case(*scores: Sequence[float | None]) -> list[float | None]:
    """Per item, the lowest score over the variants (None when an item has no per-item score):
    ``worst_case([1, 1, 0], [1, 0, 0]) == [1, 0, 0]``, robustness 1/3 where accuracy was 2/3."""
    return [None if None in values else min(values) for values in zip(*scores)]


def efficiency_numbers(gen_tokens: int, gen_seconds: float, mc_items: int, mc_seconds: float) -> dict:
    """Generation throughput and per-token latency, and multiple-choice items scored per second (None where 0)."""
    return {
        "generated_tokens": gen_tokens,
        "generation_seconds": gen_seconds,
        "tokens_per_second": gen_tokens / gen_seconds if gen_seconds > 0 else None,
        "seconds_per_output_token": gen_seconds / gen_tokens if gen_tokens > 0 else None,
        "mc_items_per_second": mc_items / mc_seconds if mc_seconds > 0 else None,
    }


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


def run_holistic(
    model: str | LoadedModel,
    tasks: Sequence[str],
    *,
    adapter: str | None = None,
    data_root: str | Path | None = None,
    split: str | None = None,
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    max_gen_toks: int | None = None,
    probe_tokens: int = 32,
    probes: Sequence[str] | None = None,
    seed: int = 0,
    fewshot_seed: int = DEFAULT_FEWSHOT_SEED,
    apply_chat_template: bool = False,
    dtype: str = "float32",
    device: str = "cpu",
    trust_pickle: bool = False,
    progress: ProgressFactory = silent,
) -> HolisticResult:
    """Measure the HELM categories for ``model`` (+ ``adapter``) on ``tasks`` (see the module docstring).

    ``probes`` are the open-ended prompts whose continuations (``probe_tokens`` greedy tokens each)
    feed bias and toxicity; None uses the built-in ones, ``[]`` none. ``seed`` fixes the
    perturbations; the other options are :func:`peftlab.eval.harness.run_harness`'s.
    """
    if probe_tokens < 1:
        raise UserError(f"--probe-tokens must be >= 1, got {probe_tokens}")
    resolved = resolve_tasks(list(tasks), data_root=data_root, split=split)
    bias_words = lexicon("bias")
    probes = list(bias_words["probes"]) if probes is None else list(probes)
    start = time.perf_counter()
    loaded = load_inference_model(model, adapter, dtype, device, trust_pickle, progress)
    options = dict(num_fewshot=num_fewshot, limit=limit, fewshot_seed=fewshot_seed, batch_size=batch_size,
                   max_gen_toks=max_gen_toks, chat=chat_format(loaded, apply_chat_template), progress=progress)

    per_task: dict[str, dict] = {}
    generations: list[dict] = []
    gen_tokens, gen_seconds, mc_items, mc_seconds = 0, 0.0, 0, 0.0
    for task in resolved:
        original = evaluate_task(loaded, task, **options)
        base = [item["score"] for item in original.items]
        perturbed, changed = {}, {}
        for name in PERTURBATIONS:
            perturbed[name], changed[name] = _perturbed_scores(loaded, task, original, name, seed=seed, **options)
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
                             max_gen_toks=probe_tokens, batch_size=batch_size, progress=progress)
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
    settings = {"tasks": list(tasks), "data_root": str(data_root) if data_root is not None else None, "split": split,
                "num_fewshot": num_fewshot, "limit": limit, "batch_size": batch_size, "max_gen_toks": max_gen_toks,
                "probe_tokens": probe_tokens, "num_probes": len(probes), "seed": seed, "fewshot_seed": fewshot_seed,
                "apply_chat_template": apply_chat_template,
                "dtype": dtype, "device": device}
    return HolisticResult(loaded.name, adapter, summary, per_task, bias, toxicity, efficiency, generations, lexicons,
                          settings, time.perf_counter() - start)


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
