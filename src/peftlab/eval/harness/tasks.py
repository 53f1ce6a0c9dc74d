"""Benchmark tasks in lm-evaluation-harness's YAML format: a subset of its fields, same meaning.

A task file describes where the documents come from, how each becomes a prompt and what is
scored (``python -m peftlab harness --tasks my_task.yaml``)::

    task: my_mc
    dataset_path: json                   # json / csv / parquet with data_files, or a hub id (+ dataset_name)
    dataset_kwargs:
      data_files: {test: items.jsonl}    # relative paths are read beside the YAML file
    test_split: test                     # the evaluated split (--split overrides it)
    fewshot_split: test                  # few-shot examples are drawn from here
    output_type: multiple_choice         # or generate_until
    description: "Answer the questions.\\n\\n"
    doc_to_text: "Question: {{question}}\\nAnswer:"
    doc_to_choice: "{{choices}}"         # a field name, a Jinja template giving a list, or a list
    doc_to_target: label                 # a field name or a template: a choice index or the choice text
    num_fewshot: 2
    metric_list: [{metric: acc}, {metric: acc_norm}]

The prompt is assembled exactly as lm-evaluation-harness's ``ConfigurableTask.fewshot_context``
(v0.4) does::

    description + Σ_shots (text + target_delimiter + answer + fewshot_delimiter) + text(doc)

and a multiple-choice continuation is ``target_delimiter + choice``. With a chat template
(``--apply-chat-template``) the description is the system message, each shot a user and an
assistant turn, the question the last user turn, the prompt ends with the template's generation
prompt, and a continuation is the bare choice (the harness drops the target delimiter there). Few-shot documents come from
``fewshot_split`` (else training, else validation, else test split), drawn with
``random.Random(seed)``: one generator per task, shared by its documents in order (so document i's
shots depend on the seed and on i), excluding the evaluated document when the few-shot split is
the evaluated one; the ``first_n`` sampler takes the first k instead (MMLU's ``dev``).

Templates are Jinja2 in a sandbox (no Python internals), strict about undefined fields, with
the harness's ``regex_replace`` filter. ``!function`` hooks, ``process_docs``, filters and
``gen_prefix`` are not supported: peftlab task files never run Python.
"""

from __future__ import annotations

import ast
import difflib
import functools
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import yaml
from jinja2.sandbox import SandboxedEnvironment

from peftlab.errors import UserError

OUTPUT_TYPES = ("multiple_choice", "generate_until")
SAMPLERS = ("default", "first_n")
DEFAULT_MAX_GEN_TOKS = 256  # lm-evaluation-harness's default
DEFAULT_FEWSHOT_SEED = 1234  # lm-evaluation-harness's fewshot_random_seed default

# Keys the harness has that we accept and ignore: naming, grouping and bookkeeping only.
_IGNORED_KEYS = ("tag", "task_alias", "metadata", "group", "repeats", "should_decontaminate",
                 "doc_to_decontamination_query")
_FEWSHOT_KEYS = ("sampler", "split", "samples", "doc_to_text", "doc_to_target", "doc_to_choice",
                 "target_delimiter", "fewshot_delimiter")


@dataclass
class FewshotConfig:
    """How few-shot examples are chosen and written; unset fields inherit the task's."""

    sampler: str = "default"
    """``default`` (seeded random sample) or ``first_n`` (the first k documents, in order)."""
    split: str | None = None
    samples: list[dict] | None = None
    """Inline few-shot documents (used when no split is given)."""
    doc_to_text: Any = None
    doc_to_target: Any = None
    doc_to_choice: Any = None
    target_delimiter: str | None = None
    fewshot_delimiter: str | None = None


@dataclass
class TaskConfig:
    """One task: the harness's field names and defaults."""

    task: str
    output_type: str = "generate_until"
    dataset_path: str | None = None
    dataset_name: str | None = None
    dataset_kwargs: dict | None = None
    training_split: str | None = None
    validation_split: str | None = None
    test_split: str | None = None
    fewshot_split: str | None = None
    description: str = ""
    doc_to_text: Any = None
    doc_to_target: Any = None
    doc_to_choice: Any = None
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    num_fewshot: int | None = None
    fewshot_config: FewshotConfig = field(default_factory=FewshotConfig)
    generation_kwargs: dict | None = None
    metric_list: list[dict] | None = None
    source: str = "<memory>"
    """Where the config came from (a file path or a built-in family), for error messages."""

    def __post_init__(self) -> None:
        where = f"{self.source}: task '{self.task}'"
        if self.output_type not in OUTPUT_TYPES:
            raise UserError(f"{where}: output_type '{self.output_type}' is not supported; use {' or '.join(OUTPUT_TYPES)}")
        if self.doc_to_text is None:
            raise UserError(f"{where}: doc_to_text is missing; give a field name or a Jinja template")
        if self.output_type == "multiple_choice" and self.doc_to_choice is None:
            raise UserError(f"{where}: a multiple_choice task needs doc_to_choice (a field, a template or a list)")
        if self.doc_to_target is None:
            raise UserError(f"{where}: doc_to_target is missing; give a field name or a Jinja template")
        if self.fewshot_config.sampler not in SAMPLERS:
            raise UserError(f"{where}: unknown few-shot sampler '{self.fewshot_config.sampler}'; use {' or '.join(SAMPLERS)}")
        if self.num_fewshot is not None and (not isinstance(self.num_fewshot, int) or self.num_fewshot < 0):
            raise UserError(f"{where}: num_fewshot must be a whole number >= 0, got {self.num_fewshot!r}")
        if self.output_type == "generate_until":
            kwargs = dict(self.generation_kwargs or {})
            kwargs.setdefault("until", [self.fewshot_delimiter])
            if kwargs.get("do_sample"):
                raise UserError(f"{where}: only greedy decoding is supported; set do_sample: false")
            if float(kwargs.get("temperature", 0.0) or 0.0) != 0.0:
                raise UserError(f"{where}: only greedy decoding is supported; set temperature: 0")
            self.generation_kwargs = kwargs

    # Few-shot fields inherit the task's (the harness's FewshotConfig.from_dict).
    @property
    def fewshot_split_name(self) -> str | None:
        return self.fewshot_config.split if self.fewshot_config.split is not None else self.fewshot_split

    @property
    def until(self) -> list[str]:
        until = (self.generation_kwargs or {}).get("until", [])
        return [until] if isinstance(until, str) else list(until)

    @property
    def max_gen_toks(self) -> int:
        kwargs = self.generation_kwargs or {}
        for key in ("max_gen_toks", "max_new_tokens", "max_tokens"):
            if kwargs.get(key) is not None:
                return int(kwargs[key])
        return DEFAULT_MAX_GEN_TOKS


# ------------------------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """Safe YAML; ``!function`` (the harness's Python hooks) becomes a clear error, not code."""


def _refuse_function(loader: yaml.Loader, node: yaml.Node) -> Any:
    raise UserError(
        f"'!function {loader.construct_scalar(node)}' is not supported: peftlab task files cannot run Python; "
        "write the field as a Jinja template instead"
    )


_Loader.add_constructor("!function", _refuse_function)


def read_task_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """The task's keys, with ``include:`` files merged first (local keys win), as the harness does."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"task file not found: {path}; give a task YAML file or a built-in task name")
    path = path.resolve()
    if path in _seen:
        raise UserError(f"{path}: include cycle ({' -> '.join(p.name for p in (*_seen, path))})")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path}: not valid YAML ({getattr(e, 'problem', None) or type(e).__name__}{where})") from None
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a YAML mapping of task fields (task, doc_to_text, ...)")
    includes = data.pop("include", None)
    if includes is None:
        return _with_base(data, path.parent)
    merged: dict = {}
    for include in includes if isinstance(includes, list) else [includes]:
        merged.update(read_task_yaml(path.parent / str(include), (*_seen, path)))
    merged.update(_with_base(data, path.parent))
    return merged


def _with_base(data: dict, base: Path) -> dict:
    """Remember the folder of the file that named the data files: relative paths are read from there."""
    if isinstance(data.get("dataset_kwargs"), dict) and "data_files" in data["dataset_kwargs"]:
        data = {**data, "_data_base": str(base)}
    return data


def config_from_dict(data: dict, source: str) -> TaskConfig:
    """Validate a task mapping (from YAML or a built-in family) into a :class:`TaskConfig`."""
    data = dict(data)
    base = data.pop("_data_base", None)
    if "task" not in data:
        raise UserError(f"{source}: the key 'task' (the task's name) is missing")
    for key in _IGNORED_KEYS:
        data.pop(key, None)
    known = {f for f in TaskConfig.__dataclass_fields__ if f != "source"}
    unknown = [k for k in data if k not in known]
    if unknown:
        close = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
        hints = ", ".join(f"{k} (did you mean {c[0]}?)" if c else k for k, c in close.items())
        raise UserError(
            f"{source}: unsupported key(s) {hints}; peftlab reads these lm-evaluation-harness fields: {', '.join(sorted(known))}"
        )
    fewshot = data.pop("fewshot_config", None) or {}
    if not isinstance(fewshot, dict) or any(k not in _FEWSHOT_KEYS for k in fewshot):
        raise UserError(f"{source}: fewshot_config may hold only {', '.join(_FEWSHOT_KEYS)}")
    if data.get("dataset_kwargs") is not None and base is not None:
        data["dataset_kwargs"] = _resolve_data_files(data["dataset_kwargs"], Path(base))
    if data.get("metric_list") is not None:
        data["metric_list"] = _check_metric_list(data["metric_list"], source)
    return TaskConfig(**data, fewshot_config=FewshotConfig(**fewshot), source=source)


def load_task_file(path: str | Path) -> TaskConfig:
    path = Path(path).expanduser()
    return config_from_dict(read_task_yaml(path), str(path))


def _resolve_data_files(kwargs: dict, base: Path) -> dict:
    def resolve(value: Any) -> Any:
        if isinstance(value, str):
            candidate = Path(value).expanduser()
            return str(candidate if candidate.is_absolute() else base / candidate)
        if isinstance(value, list):
            return [resolve(v) for v in value]
        if isinstance(value, dict):
            return {k: resolve(v) for k, v in value.items()}
        return value

    return {**kwargs, "data_files": resolve(kwargs["data_files"])}


def _check_metric_list(metrics: Any, source: str) -> list[dict]:
    if not isinstance(metrics, list) or not all(isinstance(m, dict) and "metric" in m for m in metrics):
        raise UserError(f"{source}: metric_list must be a list of {{metric: NAME, ...}} entries")
    return [dict(m) for m in metrics]


# --------------------------------------------------------------------------------------- rendering


def _regex_replace(text: str, pattern: str, repl: str, count: int = 0) -> str:
    return re.sub(pattern, repl, text, count=count)


_ENV = SandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True)
_ENV.filters["regex_replace"] = _regex_replace


@functools.lru_cache(maxsize=1024)
def _compile(source: str) -> jinja2.Template:
    return _ENV.from_string(source)


def template_fields(source: Any) -> set[str]:
    """The document fields a ``doc_to_*`` value reads (a field name or a template's variables)."""
    if not isinstance(source, str):
        return set()
    from jinja2 import meta

    try:
        return set(meta.find_undeclared_variables(_ENV.parse(source))) | {source}
    except jinja2.TemplateSyntaxError:
        return {source}


@dataclass
class Task:
    """A task with its documents: what the runner evaluates."""

    config: TaskConfig
    docs: list[dict]
    """The evaluated split, in order."""
    fewshot_docs: list[dict] | None
    """The pool few-shot examples are drawn from (None when there is none)."""
    split: str
    group: str | None = None
    """A family the task aggregates into, e.g. ``mmlu`` or ``bbh``."""
    category: str | None = None
    """A sub-group inside the family (MMLU's stem / humanities / social_sciences / other)."""

    @property
    def name(self) -> str:
        return self.config.task

    @property
    def is_multiple_choice(self) -> bool:
        return self.config.output_type == "multiple_choice"

    def where(self, index: int | None = None) -> str:
        doc = f", document {index}" if index is not None else ""
        return f"task '{self.name}' ({self.config.source}){doc}"

    # The harness's doc_to_text / doc_to_target / doc_to_choice, one rule each ----------------------

    def render(self, source: str, doc: dict, what: str, index: int | None) -> str:
        try:
            return _compile(source).render(doc)
        except jinja2.UndefinedError as e:
            match = re.match(r"'([^']+)' is undefined", e.message or "")
            missing = f"field '{match.group(1)}'" if match else f"a field ({e.message})"
            fields = ", ".join(map(str, doc)) or "no fields"
            raise UserError(
                f"{self.where(index)}: {what} uses {missing}, which the document lacks (it has {fields}); "
                "fix the template or the data"
            ) from None
        except jinja2.TemplateSyntaxError as e:
            raise UserError(f"{self.where(index)}: {what} is not a valid Jinja template ({e.message})") from None
        except jinja2.TemplateError as e:
            raise UserError(f"{self.where(index)}: {what} failed to render ({' '.join(str(e).split())})") from None

    def text(self, doc: dict, index: int | None = None, source: Any = None) -> str:
        source = self.config.doc_to_text if source is None else source
        if isinstance(source, str) and source in doc:
            value = doc[source]
        elif isinstance(source, str):
            value = self.render(source, doc, "doc_to_text", index)
        else:
            raise UserError(f"{self.where(index)}: doc_to_text must be a field name or a template, got {source!r}")
        if not isinstance(value, str):
            raise UserError(f"{self.where(index)}: doc_to_text gave {type(value).__name__} {value!r}, expected text")
        return value

    def target(self, doc: dict, index: int | None = None, source: Any = None) -> int | str | list:
        source = self.config.doc_to_target if source is None else source
        if isinstance(source, (int, list)):
            return source
        if isinstance(source, str) and source in doc:
            return doc[source]
        if not isinstance(source, str):
            raise UserError(f"{self.where(index)}: doc_to_target must be a field name, a template or an index")
        text = self.render(source, doc, "doc_to_target", index)
        if text.isdigit() and self.config.doc_to_choice is not None:
            return int(text)  # a choice index
        if len(text) >= 2 and text[0] == "[" and text[-1] == "]":
            try:
                return ast.literal_eval(text)  # several acceptable targets
            except (SyntaxError, ValueError):
                return text
        return text

    def choices(self, doc: dict, index: int | None = None, source: Any = None) -> list[str] | None:
        source = self.config.doc_to_choice if source is None else source
        if source is None:
            return None
        if isinstance(source, dict):
            value: Any = list(source.values())
        elif isinstance(source, list):
            value = source
        elif isinstance(source, str) and source in doc:
            value = doc[source]
        elif isinstance(source, str):
            rendered = self.render(source, doc, "doc_to_choice", index)
            try:
                value = ast.literal_eval(rendered)
            except (SyntaxError, ValueError):
                raise UserError(
                    f"{self.where(index)}: doc_to_choice rendered {rendered[:80]!r}, which is not a list literal; "
                    "give a field holding a list, a template like \"{{choices}}\", or a YAML list"
                ) from None
        else:
            raise UserError(f"{self.where(index)}: doc_to_choice must be a field name, a template or a list")
        if not isinstance(value, (list, tuple)) or not value:
            raise UserError(f"{self.where(index)}: doc_to_choice gave {value!r}, expected a non-empty list of strings")
        return [str(v) for v in value]

    def description(self, doc: dict, index: int | None = None) -> str:
        source = self.config.description or ""
        if source in doc:
            return str(doc[source])
        return self.render(source, doc, "description", index) if source else ""

    def gold(self, doc: dict, choices: list[str], index: int | None = None) -> list[int]:
        """Indices of the correct choice(s); one-line error when the label is not a choice."""
        target = self.target(doc, index)
        targets = target if isinstance(target, list) else [target]
        gold = []
        for t in targets:
            if isinstance(t, bool) or not isinstance(t, (int, str)):
                raise UserError(f"{self.where(index)}: doc_to_target gave {t!r}; expected a choice index or a choice text")
            if isinstance(t, int):
                if not 0 <= t < len(choices):
                    raise UserError(
                        f"{self.where(index)}: gold label index {t} is out of range for the {len(choices)} choices "
                        f"({_show(choices)}); fix doc_to_target or doc_to_choice"
                    )
                gold.append(t)
            else:
                if t not in choices:
                    raise UserError(
                        f"{self.where(index)}: gold label {t!r} is not among the choices ({_show(choices)}); "
                        "fix doc_to_target or doc_to_choice"
                    )
                gold.append(choices.index(t))
        if not gold:
            raise UserError(f"{self.where(index)}: doc_to_target gave no label")
        return gold

    def references(self, doc: dict, index: int | None = None) -> list[str]:
        """The acceptable answers of a generation task, as text."""
        target = self.target(doc, index)
        choices = self.choices(doc, index)
        if choices is not None and isinstance(target, int):
            return [choices[target]]
        return [str(t) for t in target] if isinstance(target, list) else [str(target)]

    # Prompt assembly --------------------------------------------------------------------------------

    def _solved(self, doc: dict) -> tuple[str, str | None, str, str]:
        """A few-shot example as ``(question, answer or None, target_delimiter, fewshot_delimiter)``."""
        fs = self.config.fewshot_config
        tgt_delim = fs.target_delimiter if fs.target_delimiter is not None else self.config.target_delimiter
        few_delim = fs.fewshot_delimiter if fs.fewshot_delimiter is not None else self.config.fewshot_delimiter
        question = self.text(doc, source=fs.doc_to_text)
        answer = self.target(doc, source=fs.doc_to_target)
        if answer is None or answer == "":
            return question, None, tgt_delim, few_delim
        if isinstance(answer, list):  # several acceptable answers: the first is shown
            answer = answer[0]
        choices = self.choices(doc, source=fs.doc_to_choice) if (fs.doc_to_choice or self.config.doc_to_choice) else None
        if choices and isinstance(answer, int) and not isinstance(answer, bool):
            answer = choices[answer]
        return question, str(answer), tgt_delim, few_delim

    def fewshot_turn(self, doc: dict) -> str:
        """One solved example: ``text + target_delimiter + answer + fewshot_delimiter``."""
        question, answer, tgt_delim, few_delim = self._solved(doc)
        if answer is None:
            return question  # the harness writes no delimiters for an example without an answer
        return question + tgt_delim + answer + few_delim

    def context(self, doc: dict, shots: list[dict], index: int | None = None, query: dict | None = None) -> str:
        """The prompt for ``doc``: description, solved ``shots``, then the question.

        ``query`` (a perturbed copy of ``doc``) replaces the document in the question only.
        """
        question = self.text(query if query is not None else doc, index)
        return self.description(doc, index) + "".join(self.fewshot_turn(s) for s in shots) + question

    def chat_messages(self, doc: dict, shots: list[dict], index: int | None = None,
                      query: dict | None = None) -> list[dict[str, str]]:
        """The same prompt as chat messages, as the harness's ``--apply_chat_template`` builds them.

        The description is the system message (none when empty); each solved shot is a user turn
        (its question) and an assistant turn (its answer), without delimiters; the question is the
        last user turn (the harness's default ``fewshot_as_multiturn``).
        """
        description = self.description(doc, index)
        messages = [{"role": "system", "content": description}] if description else []
        for shot in shots:
            question, answer, _, _ = self._solved(shot)
            messages.append({"role": "user", "content": question})
            if answer is not None:
                messages.append({"role": "assistant", "content": answer})
        messages.append({"role": "user", "content": self.text(query if query is not None else doc, index)})
        return messages


def _show(choices: list[str], limit: int = 6) -> str:
    shown = ", ".join(repr(c) for c in choices[:limit])
    return shown + (", ..." if len(choices) > limit else "")


# ---------------------------------------------------------------------------------------- sampling


class FewshotSampler:
    """The harness's few-shot samplers, with one seeded generator per task.

    ``default``: ``rng.sample(pool, k)``; when the evaluated document may be in the pool it draws
    k + 1, drops the document and keeps k (the harness's ``rm_eval_doc``). ``first_n``: the first k
    documents of the pool (without the evaluated document).
    """

    def __init__(self, pool: list[dict], kind: str, seed: int, where: str) -> None:
        self.pool, self.kind, self.rng, self.where = pool, kind, random.Random(seed), where

    def sample(self, k: int, eval_doc: dict | None) -> list[dict]:
        if k == 0:
            return []
        available = len([d for d in self.pool if d != eval_doc]) if eval_doc is not None else len(self.pool)
        if k > available:
            raise UserError(
                f"{self.where}: {k} few-shot examples asked for, but the few-shot pool has {available}; "
                "lower --num-fewshot or choose another few-shot split"
            )
        if self.kind == "first_n":
            pool = [d for d in self.pool if d != eval_doc] if eval_doc is not None else self.pool
            return pool[:k]
        if eval_doc is None:
            return self.rng.sample(self.pool, k)
        shots = [d for d in self.rng.sample(self.pool, min(k + 1, len(self.pool))) if d != eval_doc][:k]
        if len(shots) < k:  # duplicates of the evaluated document were drawn: resample without it
            shots = self.rng.sample([d for d in self.pool if d != eval_doc], k)
        return shots


def fewshot_pool(config: TaskConfig, splits: dict[str, list[dict]]) -> list[dict] | None:
    """The harness's choice of few-shot documents: the few-shot split, inline samples, else train/val/test."""
    name = config.fewshot_split_name
    if name is not None:
        if name not in splits:
            raise UserError(
                f"{config.source}: task '{config.task}': few-shot split '{name}' not found "
                f"(the data has {', '.join(splits) or 'no splits'})"
            )
        return splits[name]
    if config.fewshot_config.samples is not None:
        return list(config.fewshot_config.samples)
    for split in (config.training_split, config.validation_split, config.test_split):
        if split is not None and split in splits:
            return splits[split]
    return None


def evaluated_split(config: TaskConfig, split: str | None) -> str:
    """``split`` if given, else the task's test split, else its validation split (the harness's order)."""
    chosen = split or config.test_split or config.validation_split
    if chosen is None:
        raise UserError(f"{config.source}: task '{config.task}' names no test_split or validation_split; add one or pass --split")
    return chosen


# ------------------------------------------------------------------------------------------ data


def load_splits(config: TaskConfig, needed: list[str]) -> dict[str, list[dict]]:
    """Documents of the task's data set, by split: ``datasets.load_dataset(path, name, **kwargs)`` as in the harness."""
    if config.dataset_path is None:
        raise UserError(f"{config.source}: task '{config.task}' has no dataset_path (a hub id, or json/csv/parquet with data_files)")
    import datasets

    kwargs = dict(config.dataset_kwargs or {})
    for path in _local_files(kwargs.get("data_files")):
        if not Path(path).exists():
            raise UserError(f"{config.source}: task '{config.task}': data file not found: {path}")
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # library code never prints
    try:
        data = datasets.load_dataset(config.dataset_path, config.dataset_name, **kwargs)
    except Exception as e:  # offline hub, unknown id or config, unreadable file: one line for the user
        message = " ".join(str(e).split())[:200] or type(e).__name__
        raise UserError(
            f"{config.source}: task '{config.task}': could not load dataset {config.dataset_path!r}"
            f"{f' ({config.dataset_name})' if config.dataset_name else ''}: {type(e).__name__}: {message}; "
            "check the id (the hub needs a connection) or point dataset_kwargs.data_files at local files"
        ) from None
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()
    splits = {name: data[name].to_list() for name in data if name in needed}
    missing = [n for n in needed if n not in splits]
    if missing:
        raise UserError(
            f"{config.source}: task '{config.task}': split '{missing[0]}' not found (the data has {', '.join(data)}); "
            "pass --split or fix the task's *_split fields"
        )
    return splits


def _local_files(data_files: Any) -> list[str]:
    if isinstance(data_files, str):
        return [data_files] if not any(ch in data_files for ch in "*?[") else []
    if isinstance(data_files, list):
        return [f for v in data_files for f in _local_files(v)]
    if isinstance(data_files, dict):
        return [f for v in data_files.values() for f in _local_files(v)]
    return []


def task_from_config(config: TaskConfig, split: str | None = None) -> Task:
    """Load the documents a config needs and check its templates on the first document."""
    if split is not None:
        config.test_split = split  # the harness's meaning: the evaluated split is the test split
    chosen = evaluated_split(config, split)
    needed = [chosen] + [s for s in (config.fewshot_split_name,) if s is not None and s != chosen]
    if (config.num_fewshot or 0) > 0 and config.fewshot_split_name is None and config.fewshot_config.samples is None:
        needed += [s for s in (config.training_split, config.validation_split) if s is not None and s not in needed]
    splits = load_splits(config, needed)
    return make_task(config, splits, chosen)


def make_task(config: TaskConfig, splits: dict[str, list[dict]], chosen: str, group: str | None = None,
              category: str | None = None) -> Task:
    docs = splits.get(chosen)
    if not docs:
        raise UserError(f"{config.source}: task '{config.task}': the '{chosen}' split is empty or missing")
    task = Task(config, docs, fewshot_pool(config, splits), chosen, group, category)
    check_first_document(task)
    return task


def check_first_document(task: Task) -> None:
    """Render the first document now, so a template naming a missing field fails before any model work."""
    doc = task.docs[0]
    task.description(doc, 0)
    task.text(doc, 0)
    if task.is_multiple_choice:
        task.gold(doc, task.choices(doc, 0), 0)
    else:
        task.references(doc, 0)
