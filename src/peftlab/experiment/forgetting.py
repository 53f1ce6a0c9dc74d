"""Catastrophic forgetting: what a fine-tuned model lost on held-out tasks, next to its base model.

    config = ForgettingConfig(model="smollm2-135m-instruct", adapter="runs/lora/final", suite="demo", out="runs/fg")
    report = forgetting_report(config)  # or tuned="runs/full/final": a fully fine-tuned model
    report.table(), report.flagged, report.to_dict()

``peftlab.forgetting(config)`` (the ``peftlab forgetting`` command) also writes it into ``config.out``.

Both models answer the same examples of every task of a *suite*; each row gives the task's metric
before (base model) and after (tuned model: a full fine-tuning folder, or the base model with a
PEFT adapter), the change ``delta = after - before``, and a flag when the drop is beyond the
threshold (``delta < -threshold``, in metric units: 0.05 is five ROUGE or accuracy points).
Each row also gives the paired standard error of the delta (both models answer the same examples)
so that a drop within noise is seen as such: at 40 examples one answer is 0.025 of accuracy.

A suite is ``demo`` (the built-in suite over the embedded demo tasks, :data:`DEMO_SUITE`) or a YAML
file (in code, a list of :class:`SuiteItem` goes to :func:`prepare_suite` and :func:`evaluate_suite`)::

    threshold: 0.05              # optional; the caller's threshold wins
    suite:
      - name: reviews            # the row's name
        data: demo:reviews       # any data source (a .jsonl file, hf:NAME@SPLIT ...)
        template: review_rating  # a built-in template or a YAML file (default: detected)
        split: test              # train, validation, test or all
        metric: accuracy         # default: the template's metric
        limit: 40                # examples scored (default: the whole split)
        # also: split_fractions ("0.8,0.1,0.1"), split_seed (0), max_new_tokens (64)

Metrics (all in [0, 1]):

- ``accuracy``: multiple choice. For every answer choice c of the template (``answer_choices``)
  the model's log-likelihood ``log p(c | prompt) = sum_t log p(c_t | prompt, c_<t)``, with the
  prompt formatted and tokenised exactly as in training and the choice's tokens appended (no
  EOS: the choice's own tokens decide); the prediction is the arg max, scored against the
  rendered target. No generation, so free-text habits of a model cannot hide what it knows.
- ``rouge1``, ``rouge2``, ``rougeL``, ``rougeLsum`` (``rouge`` means rougeL) and ``bleu``: greedy
  generation scored with :func:`peftlab.eval.score.score`, exactly as ``peftlab eval`` does.
- ``exact_match``: the generated text equals the target after collapsing whitespace.
- ``squad_exact_match``: equal after SQuAD's normalisation (lower case; punctuation, articles and
  extra spaces removed).
- ``squad_f1``: SQuAD's bag-of-words F1 of those normalised tokens, averaged over examples. Graded,
  so it sees a model that still gives the answer inside a longer sentence, and one that stops giving it.

A metric at its floor cannot drop: the built-in suite scores QA with ``squad_f1`` and the
arithmetic-to-Python task with ``bleu``, where the chat model's verbose answers score above zero.

Loglikelihoods come from the harness's scorer, :mod:`peftlab.eval.loglikelihood` (batched; the
choices of one prompt that are one token long share a forward pass), fed the training tokenisation by
:func:`choice_loglikelihoods`.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from peftlab.config import ForgettingConfig
from peftlab.data.encode import format_prompt, uses_chat_template
from peftlab.data.pipeline import Example, prepare
from peftlab.data.splits import SPLITS
from peftlab.data.templates import TaskTemplates
from peftlab.errors import UserError
from peftlab.eval.bleu import corpus_bleu
from peftlab.eval.generate import generate
from peftlab.eval.harness.metrics import mean_and_stderr, squad_tokens, token_f1
from peftlab.eval.loglikelihood import continuation_loglikelihoods
from peftlab.eval.score import score
from peftlab.models import load_for_inference
from peftlab.progress import ProgressFactory, silent

ROUGE_METRICS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
METRICS = ("accuracy", *ROUGE_METRICS, "rouge", "bleu", "exact_match", "squad_exact_match", "squad_f1")
EXAMPLES_SAVED = 3
"""Predictions per task kept in the report, before and after side by side."""
DEFAULT_THRESHOLD = 0.05


@dataclass
class SuiteItem:
    """One task of a forgetting suite."""

    name: str
    data: str
    template: str | None = None
    split: str = "test"
    metric: str | None = None
    """Default: the template's metric (``rouge`` -> rougeL)."""
    limit: int | None = None
    split_fractions: str = "0.8,0.1,0.1"
    split_seed: int = 0
    max_new_tokens: int = 64


#: The built-in suite ``demo``: every embedded demo task, small enough for a CPU.
DEMO_SUITE = [
    SuiteItem("dialogsum", "demo:dialogsum", "dialogsum", metric="rougeL", limit=16, max_new_tokens=64),
    SuiteItem("review_rating", "demo:reviews", "review_rating", metric="accuracy", limit=40),
    SuiteItem("sentiment", "demo:reviews", "sentiment", metric="accuracy", limit=40),
    SuiteItem("python", "demo:python", "python", metric="bleu", limit=24, max_new_tokens=32),
    SuiteItem("qa", "demo:qa", "qa", metric="squad_f1", limit=24, max_new_tokens=16),
]
BUILTIN_SUITES = {"demo": DEMO_SUITE}


@dataclass
class TaskScore:
    name: str
    metric: str
    value: float
    num_examples: int
    predictions: list[str] = field(default_factory=list)
    """Generated texts, or the chosen answer choice of each example."""
    references: list[str] = field(default_factory=list)
    per_example: list[float] | None = None
    """Each example's score (the metric's mean is ``value``); None for corpus BLEU, which is not a mean."""


@dataclass
class ForgettingRow:
    task: str
    metric: str
    before: float
    after: float
    delta: float
    """``after - before``."""
    flagged: bool
    """``delta < -threshold``: the tuned model lost more than the threshold on this task."""
    num_examples: int
    delta_stderr: float | None = None
    """Standard error of ``delta`` over the examples (the same examples before and after): for a mean metric
    ``sd(after_i - before_i) / sqrt(n)``; for corpus BLEU the spread of the delta over paired bootstrap
    resamples of the examples. A delta within about two of these is noise."""
    examples: list[dict] = field(default_factory=list)
    """The first few examples: ``{"reference", "before", "after"}`` (prediction or chosen answer)."""


@dataclass
class ForgettingReport:
    rows: list[ForgettingRow]
    threshold: float
    base: str = ""
    tuned: str = ""

    @property
    def flagged(self) -> list[ForgettingRow]:
        return [row for row in self.rows if row.flagged]

    def to_dict(self) -> dict:
        return {"base": self.base, "tuned": self.tuned, "threshold": self.threshold,
                "rows": [asdict(row) for row in self.rows], "flagged": [row.task for row in self.flagged]}  # fmt: skip

    def table(self) -> str:
        """A Markdown table, one row per task."""
        lines = ["| task | metric | n | before | after | delta | ± s.e. | delta % | |",
                 "|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in self.rows:
            flag = f"drop > {self.threshold:g}" if r.flagged else ""
            relative = f"{100 * r.delta / r.before:+.1f}%" if r.before else "-"  # a small base makes small deltas large
            stderr = f"{r.delta_stderr:.4f}" if r.delta_stderr is not None else "-"
            lines.append(f"| {r.task} | {r.metric} | {r.num_examples} | {r.before:.4f} | {r.after:.4f} | {r.delta:+.4f} "
                         f"| {stderr} | {relative} | {flag} |")  # fmt: skip
        return "\n".join(lines)

    def examples_table(self) -> str:
        """A Markdown table of the saved examples: the reference, then the base's and the tuned model's answer."""
        def cell(text: str) -> str:
            return " ".join(str(text).split()).replace("|", "\\|")[:160]

        lines = ["| task | reference | before | after |", "|---|---|---|---|"]
        for r in self.rows:
            lines += [f"| {r.task} | {cell(e['reference'])} | {cell(e['before'])} | {cell(e['after'])} |" for e in r.examples]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ suites


def load_suite(suite: str | Path) -> tuple[list[SuiteItem], float | None]:
    """``(items, threshold from the file or None)`` of a built-in suite name or a YAML file."""
    if str(suite) in BUILTIN_SUITES:
        items, threshold = [SuiteItem(**asdict(item)) for item in BUILTIN_SUITES[str(suite)]], None
    else:
        items, threshold = _read_suite_file(Path(suite).expanduser())
    if not items:
        raise UserError(f"the suite {suite} holds no tasks; list them under 'suite:'")
    names = [item.name for item in items]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"suite task name(s) {', '.join(repeated)} appear more than once; give each task its own name")
    for item in items:
        if item.split not in (*SPLITS, "all"):
            raise UserError(f"suite task '{item.name}': split must be one of {', '.join(SPLITS)}, all; got {item.split!r}")
        if item.metric is not None and item.metric not in METRICS:
            raise UserError(f"suite task '{item.name}': unknown metric {item.metric!r}; choose one of {', '.join(METRICS)}")
        if item.limit is not None and item.limit < 1:
            raise UserError(f"suite task '{item.name}': limit must be >= 1, got {item.limit}")
        if item.max_new_tokens < 1:
            raise UserError(f"suite task '{item.name}': max_new_tokens must be >= 1, got {item.max_new_tokens}")
    return items, threshold


def _read_suite_file(path: Path) -> tuple[list[SuiteItem], float | None]:
    if not path.is_file():
        raise UserError(f"suite not found: {path}; give a YAML file or a built-in suite ({', '.join(BUILTIN_SUITES)})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise UserError(f"{path}: not valid YAML{f' at line {mark.line + 1}' if mark else ''}") from None
    if isinstance(data, list):
        data = {"suite": data}
    if not isinstance(data, dict) or not isinstance(data.get("suite"), list):
        raise UserError(f"{path}: expected a mapping with a 'suite:' list of tasks (name, data, template, split, metric, limit)")
    unknown = [k for k in data if k not in ("suite", "threshold")]
    if unknown:
        raise UserError(f"{path}: unknown key(s) {', '.join(map(str, unknown))}; allowed: suite, threshold")
    allowed = [f.name for f in fields(SuiteItem)]
    items = []
    for i, raw in enumerate(data["suite"]):
        if not isinstance(raw, dict) or "name" not in raw or "data" not in raw:
            raise UserError(f"{path}: suite[{i}] needs at least 'name' and 'data'")
        bad = [k for k in raw if k not in allowed]
        if bad:
            raise UserError(f"{path}: suite[{i}] has unknown key(s) {', '.join(map(str, bad))}; allowed: {', '.join(allowed)}")
        for key, value in raw.items():
            wanted = int if key in ("limit", "split_seed", "max_new_tokens") else str
            if value is not None and key not in ("name", "data") and (not isinstance(value, wanted) or isinstance(value, bool)):
                raise UserError(f"{path}: suite[{i}] {key} must be {'an integer' if wanted is int else 'a string'}, got {value!r}")
        items.append(SuiteItem(**{k: (str(v) if k in ("name", "data") else v) for k, v in raw.items()}))
    threshold = data.get("threshold")
    if threshold is not None and not isinstance(threshold, (int, float)):
        raise UserError(f"{path}: threshold must be a number (metric points, e.g. 0.05), got {threshold!r}")
    return items, threshold


@dataclass
class PreparedItem:
    item: SuiteItem
    task: TaskTemplates
    metric: str
    examples: list[Example]


def prepare_suite(items: Sequence[SuiteItem]) -> list[PreparedItem]:
    """Load, template and split each task's data and pick its examples (the same for both models)."""
    prepared = []
    for item in items:
        data = prepare(item.data, item.template, item.split_fractions, item.split_seed, require_train=False)  # evaluation only
        examples = data.examples(item.split)[: item.limit]
        if not examples:
            raise UserError(f"suite task '{item.name}': the {item.split} split of {item.data} is empty; change split or split_fractions")
        metric = item.metric or ("accuracy" if data.task.task_type == "classification" and data.task.answer_choices
                                 else data.task.metric)  # fmt: skip
        metric = "rougeL" if metric == "rouge" else metric
        if metric not in METRICS:
            raise UserError(f"suite task '{item.name}': template metric {metric!r} is not one peftlab computes; "
                            f"set metric: to one of {', '.join(METRICS)}")  # fmt: skip
        if metric == "accuracy":
            choices = data.task.answer_choices
            if not choices:
                raise UserError(f"suite task '{item.name}': accuracy needs a template with answer_choices, "
                                f"and '{data.task.task}' has none; choose a generation metric")  # fmt: skip
            outside = sorted({ex.completion for ex in examples} - set(choices))
            if outside:
                raise UserError(f"suite task '{item.name}': target {outside[0]!r} is not one of the answer choices "
                                f"({', '.join(choices)}); fix the data or the template")  # fmt: skip
        prepared.append(PreparedItem(item, data.task, metric, examples))
    return prepared


# ------------------------------------------------------------------------------------------ scoring


def choice_loglikelihoods(
    model,
    tokenizer,
    prompts: Sequence[str],
    choices: Sequence[str],
    is_seq2seq: bool,
    *,
    chat: bool = False,
    batch_size: int = 16,
    max_length: int = 512,
    progress: ProgressFactory = silent,
) -> list[list[float]]:
    """``out[i][j] = log p(choices[j] | prompts[i])``, summed over the choice's tokens.

    The prompt is formatted and tokenised as in training (:func:`peftlab.data.encode.encode_example`)
    and the choice tokenised on its own: decoder-only models read ``prompt ids + choice ids``,
    encoder-decoder models get the prompt as encoder input and the choice as decoder target. The
    harness's scorer (:mod:`peftlab.eval.loglikelihood`) scores them, ``max_length`` input tokens
    at most (the prompt cut from the left), ``batch_size`` distinct inputs per forward.
    """
    choice_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices]
    if any(not ids for ids in choice_ids):
        raise UserError("an answer choice is empty (no tokens); give every choice some text")
    longest = max(choice_ids, key=len)
    if len(longest) > max_length:
        raise UserError(f"an answer choice of {len(longest)} tokens is longer than --max-length {max_length}; raise it")
    if is_seq2seq:
        contexts = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    else:
        # as encode_example: a chat-formatted prompt holds its special tokens, a plain one gets the tokenizer's
        contexts = [tokenizer(format_prompt(tokenizer, p, chat, False), add_special_tokens=not chat)["input_ids"]
                    for p in prompts]  # fmt: skip
    pairs = [(context, ids) for context in contexts for ids in choice_ids]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scored = continuation_loglikelihoods(model, pairs, is_seq2seq=is_seq2seq, max_length=max_length, pad_id=pad,
                                         batch_size=batch_size, progress=progress)  # fmt: skip
    n = len(choices)
    return [[r.logprob for r in scored[i * n : (i + 1) * n]] for i in range(len(prompts))]


def _collapse(text: str) -> str:
    return " ".join(text.split())


def squad_normalize(text: str) -> str:
    """SQuAD v1.1's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    return " ".join(squad_tokens(text))


def score_item(loaded, prepared: PreparedItem, *, chat: bool, batch_size: int = 8, max_length: int = 512,
               progress: ProgressFactory = silent) -> TaskScore:
    """One suite task's metric for one model (``loaded``: anything with ``model``, ``tokenizer``, ``is_seq2seq``)."""
    examples, metric = prepared.examples, prepared.metric
    prompts, references = [ex.prompt for ex in examples], [ex.completion for ex in examples]
    model, tokenizer, is_seq2seq = loaded.model, loaded.tokenizer, loaded.is_seq2seq
    if metric == "accuracy":
        choices = prepared.task.answer_choices
        logliks = choice_loglikelihoods(model, tokenizer, prompts, choices, is_seq2seq, chat=chat,
                                        batch_size=batch_size, max_length=max_length, progress=progress)  # fmt: skip
        predictions = [choices[max(range(len(choices)), key=row.__getitem__)] for row in logliks]
        per_example = [float(p == r) for p, r in zip(predictions, references)]
        return TaskScore(prepared.item.name, metric, sum(per_example) / len(examples), len(examples), predictions,
                         references, per_example)  # fmt: skip
    predictions = generate(model, tokenizer, prompts, is_seq2seq=is_seq2seq, chat=chat,
                           max_new_tokens=prepared.item.max_new_tokens, max_length=max_length,
                           batch_size=batch_size, progress=progress).texts  # fmt: skip
    per_example: list[float] | None
    if metric == "bleu":  # corpus BLEU: n-gram counts pooled over examples, not a mean of per-example scores
        value, per_example = corpus_bleu(predictions, references)[0], None  # the BLEU `score` reports, without its ROUGE
    else:
        if metric in ROUGE_METRICS:
            per_example = [row[metric]["fmeasure"] for row in score(predictions, references).per_example]
        elif metric == "exact_match":
            per_example = [float(_collapse(p) == _collapse(r)) for p, r in zip(predictions, references)]
        elif metric == "squad_f1":
            per_example = [token_f1(p, r) for p, r in zip(predictions, references)]
        else:  # squad_exact_match
            per_example = [float(squad_normalize(p) == squad_normalize(r)) for p, r in zip(predictions, references)]
        value = sum(per_example) / len(examples)
    return TaskScore(prepared.item.name, metric, float(value), len(examples), predictions, references, per_example)


def evaluate_suite(loaded, prepared: Sequence[PreparedItem], *, chat_template: str = "auto", batch_size: int = 8,
                   max_length: int = 512, progress: ProgressFactory = silent) -> dict[str, TaskScore]:
    """Every suite task's score for one model, by task name."""
    chat = uses_chat_template(loaded.tokenizer, chat_template)
    return {p.item.name: score_item(loaded, p, chat=chat, batch_size=batch_size, max_length=max_length, progress=progress)
            for p in prepared}  # fmt: skip


def paired_stderr(before: Sequence[float], after: Sequence[float]) -> float:
    """Standard error of the mean of ``after_i - before_i`` (sample standard deviation, n - 1); 0 for one example."""
    diffs = [a - b for b, a in zip(before, after)]
    return mean_and_stderr(diffs)[1] if diffs else 0.0


def bleu_delta_stderr(before: Sequence[str], after: Sequence[str], references: Sequence[str],
                      resamples: int = 1000, seed: int = 0) -> float:
    """Standard deviation of ``BLEU(after) - BLEU(before)`` over paired bootstrap resamples of the examples."""
    rng = random.Random(seed)
    n, deltas = len(references), []
    for _ in range(resamples):
        pick = [rng.randrange(n) for _ in range(n)]
        refs = [references[i] for i in pick]
        deltas.append(corpus_bleu([after[i] for i in pick], refs)[0] - corpus_bleu([before[i] for i in pick], refs)[0])
    return statistics.stdev(deltas)


def compare_scores(before: dict[str, TaskScore], after: dict[str, TaskScore], threshold: float = DEFAULT_THRESHOLD,
                   base: str = "", tuned: str = "") -> ForgettingReport:
    """Per-task before / after / delta rows, flagged where ``delta < -threshold``."""
    if threshold < 0:
        raise UserError(f"the forgetting threshold must be >= 0 (metric points, e.g. 0.05), got {threshold}")
    if set(before) != set(after):
        raise ValueError(f"before and after cover different tasks: {sorted(before)} vs {sorted(after)}")
    rows = []
    for name, b in before.items():
        a = after[name]
        delta = a.value - b.value
        examples = [{"reference": r, "before": p, "after": q}
                    for r, p, q in zip(b.references, b.predictions, a.predictions)][:EXAMPLES_SAVED]  # fmt: skip
        if b.per_example and a.per_example:
            stderr = paired_stderr(b.per_example, a.per_example)
        elif b.metric == "bleu" and b.references:  # texts kept by score_item: resample them
            stderr = bleu_delta_stderr(b.predictions, a.predictions, b.references)
        else:
            stderr = None
        rows.append(ForgettingRow(name, b.metric, b.value, a.value, delta, delta < -threshold, b.num_examples, stderr, examples))
    return ForgettingReport(rows, threshold, base, tuned)


def forgetting_report(config: ForgettingConfig, *, progress: ProgressFactory = silent,
                      log: Callable[[str], None] = lambda _: None) -> ForgettingReport:
    """Evaluate ``config.model``, then the tuned model (``config.tuned``: a fine-tuned model folder, or
    ``config.adapter`` on the base), on every task of ``config.suite``, one model in memory at a time;
    see the module docstring. ``config.out`` is not written here."""
    items, file_threshold = load_suite(config.suite)
    threshold = next((t for t in (config.threshold, file_threshold) if t is not None), DEFAULT_THRESHOLD)
    prepared = prepare_suite(items)  # data errors before any model loads
    scores = {}
    models = (("before", config.model, None), ("after", config.tuned or config.model, config.adapter))
    for label, model_name, adapter_dir in models:
        log(f"evaluating {label}: {model_name}{f' + adapter {adapter_dir}' if adapter_dir else ''}")
        loaded = load_for_inference(model_name, adapter_dir, config.dtype, config.device, config.trust_pickle, progress)
        scores[label] = evaluate_suite(loaded, prepared, chat_template=config.chat_template, batch_size=config.batch_size,
                                       max_length=config.max_length, progress=progress)  # fmt: skip
        del loaded  # one model in memory at a time
    tuned = config.tuned if config.tuned is not None else f"{config.model} + {config.adapter}"
    return compare_scores(scores["before"], scores["after"], threshold, base=config.model, tuned=tuned)
