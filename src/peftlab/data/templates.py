"""Prompt templates: turn a record into an ``(input, target)`` pair of strings.

A task is described by one YAML file in the spirit of promptsource: a few fields every template
needs, the metric that scores it, and several phrasings (Jinja2 templates) of the same request::

    task: dialogsum
    description: Dialogue summarisation (DialogSum schema).
    fields: [dialogue, summary]        # fields every template needs
    metric: rouge
    task_type: generation
    templates:
      - name: summarize
        input: "Summarize the following conversation.\\n\\n{{ dialogue }}"
        target: "{{ summary }}"

Built-in tasks live in ``peftlab/data/templates/*.yaml``. Each example gets one phrasing,
chosen by ``random.Random(f"{seed}:{index}")``: it depends only on the seed and the example's
index, so it is the same in every epoch, process and Python hash seed, and over a data set
every phrasing is used about equally often (as in FLAN's instruction-tuning mixtures).

Rendering is strict and sandboxed: a field the template uses but the record lacks (or holds as
``null``) is an error, not an empty string, and template code cannot reach Python internals.
Optional fields are written ``{% if input is defined and input %}...{% endif %}``.

Built-in tasks: ``dialogsum`` and ``samsum`` (dialogue summarisation), ``review_rating`` and
``sentiment`` (classification, with ``answer_choices``), ``qa`` (extractive question answering),
``python`` (description -> code) and ``translation``, plus ``instruction`` (Alpaca) and
``prompt_completion``. Users add their own YAML files. :func:`list_templates`, :func:`template_source`
and :func:`render_all` back ``peftlab templates list | show | render``.
"""

from __future__ import annotations

import difflib
import functools
import json
import random
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import jinja2
import yaml
from jinja2.sandbox import SandboxedEnvironment

from peftlab.data.sources import load_records
from peftlab.errors import UserError


@dataclass
class Template:
    """One phrasing of a task."""

    name: str
    input: str
    """Jinja2 source of the model input (the prompt)."""
    target: str
    """Jinja2 source of the expected output."""


@dataclass
class TaskTemplates:
    """A task: what its records hold, how it is scored, and its phrasings."""

    task: str
    description: str
    fields: list[str]
    """Record fields every template needs (used to auto-detect the task from a record)."""
    metric: str
    """How predictions are scored, e.g. ``rouge``, ``bleu``, ``exact_match``."""
    task_type: str
    """E.g. ``generation`` (free text) or ``classification`` (one of ``answer_choices``)."""
    templates: list[Template]
    answer_choices: list[str] | None = None
    """The closed set of targets of a classification task; templates see it as ``answer_choices``."""


# Auto-detection order: the first built-in whose fields the record has wins.
_DETECT_ORDER = ("dialogsum", "prompt_completion", "instruction")
_REQUIRED_KEYS = ("task", "templates")
_OPTIONAL_KEYS = ("description", "fields", "metric", "task_type", "answer_choices")


# ------------------------------------------------------------------------------------------ loading


def builtin_templates() -> dict[str, TaskTemplates]:
    """The templates shipped with peftlab, by task name."""
    folder = resources.files("peftlab.data") / "templates"
    tasks = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            task = _parse(entry.read_text(encoding="utf-8"), entry.name)
            tasks[task.task] = task
    return tasks


def load_templates(path: str | Path) -> TaskTemplates:
    """Read and validate one task YAML file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"template file not found: {path}; give a YAML file like peftlab/data/templates/dialogsum.yaml")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); re-save it as UTF-8") from None
    return _parse(text, str(path))


def resolve_templates(name_or_file: str | None, records: list[dict]) -> TaskTemplates:
    """The task for ``--template``: ``None`` detects it from ``records[0]``, else a built-in name or a YAML file.

    The first record must hold the task's ``fields``, so a mismatch fails here, before training.
    """
    builtins = builtin_templates()
    first = records[0] if records else None
    if name_or_file is None:
        if first is None:
            raise UserError("no records to detect the prompt template from; give --data with examples")
        order = [n for n in _DETECT_ORDER if n in builtins] + [n for n in builtins if n not in _DETECT_ORDER]
        for name in order:
            if set(builtins[name].fields) <= set(first):
                return builtins[name]
        raise UserError(
            f"cannot detect a prompt template from the record fields ({_fields(first)}); "
            f"built-in templates: {_needs(builtins)}; rename the fields or pass --template FILE (a YAML file)"
        )

    if name_or_file in builtins:
        task = builtins[name_or_file]
    elif name_or_file.endswith((".yaml", ".yml")) or Path(name_or_file).expanduser().is_file():
        task = load_templates(name_or_file)
    else:
        close = difflib.get_close_matches(name_or_file, builtins, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(
            f"unknown template '{name_or_file}'{hint}; built-in: {', '.join(builtins)}; "
            "or pass --template FILE (a YAML file)"
        )
    if first is not None:
        missing = [f for f in task.fields if f not in first]
        if missing:
            raise UserError(
                f"template '{task.task}' needs fields {', '.join(task.fields)}, but the first record lacks "
                f"{', '.join(missing)} (it has {_fields(first)}); choose another --template or rename the fields"
            )
    return task


def _parse(text: str, source: str) -> TaskTemplates:
    """Validate the YAML of one task; every problem names ``source``."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise UserError(f"{source}: not valid YAML ({problem}{where})") from None
    except RecursionError:
        raise UserError(f"{source}: YAML nested too deeply (thousands of lists or mappings inside each other)") from None
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a YAML mapping with keys {', '.join(_REQUIRED_KEYS)}")
    missing = [k for k in _REQUIRED_KEYS if k not in data]
    if missing:
        raise UserError(f"{source}: missing key(s) {', '.join(missing)}; see peftlab/data/templates/dialogsum.yaml")
    unknown = [k for k in data if k not in _REQUIRED_KEYS + _OPTIONAL_KEYS]
    if unknown:
        raise UserError(
            f"{source}: unknown key(s) {', '.join(map(_shown, unknown))}; "
            f"allowed: {', '.join(_REQUIRED_KEYS + _OPTIONAL_KEYS)}"
        )
    raw = data["templates"]
    if not isinstance(raw, list) or not raw:
        raise UserError(f"{source}: 'templates' must be a non-empty list of {{name, input, target}}")
    templates = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) for k in ("name", "input", "target")):
            raise UserError(f"{source}: templates[{i}] needs string keys name, input and target")
        template = Template(item["name"], item["input"], item["target"])
        if not template.name.isprintable():
            raise UserError(f"{source}: templates[{i}] name '{_shown(template.name)}' must be printable text on one line")
        for part in ("input", "target"):
            try:
                _compile(getattr(template, part))
            except jinja2.TemplateSyntaxError as e:
                raise UserError(
                    f"{source}: template '{template.name}' {part}: Jinja2 syntax error ({e.message}, line {e.lineno})"
                ) from None
            except (ValueError, RecursionError) as e:  # Python's own limits, met while compiling
                too_big = "expressions nested too deeply" if isinstance(e, RecursionError) else "a number over 4300 digits"
                raise UserError(f"{source}: template '{template.name}' {part} holds {too_big}; simplify it") from None
            if next(_ENV.parse(getattr(template, part)).find_all(_FILE_TAGS), None) is not None:
                raise UserError(
                    f"{source}: template '{template.name}' {part}: templates cannot include, import or extend other "
                    "files ({% include %}, {% import %}, {% extends %}); write the text into the template itself"
                )
        templates.append(template)
    names = [t.name for t in templates]
    if len(set(names)) != len(names):
        raise UserError(f"{source}: template names must be unique, got {', '.join(names)}")
    fields = data.get("fields", [])
    choices = data.get("answer_choices")
    if not isinstance(fields, list) or not all(isinstance(f, str) for f in fields):
        raise UserError(f"{source}: 'fields' must be a list of record field names")
    unprintable = [name for name in [str(data["task"]), *fields] if not name.isprintable()]
    if unprintable:
        raise UserError(f"{source}: task and field names must be printable text on one line, not '{_shown(unprintable[0])}'")
    if choices is not None and (not isinstance(choices, list) or not all(isinstance(c, str) for c in choices)):
        raise UserError(f"{source}: 'answer_choices' must be a list of strings")
    return TaskTemplates(
        task=str(data["task"]),
        description=str(data.get("description", "")),
        fields=fields,
        metric=str(data.get("metric", "rouge")),
        task_type=str(data.get("task_type", "generation")),
        templates=templates,
        answer_choices=choices,
    )


# ---------------------------------------------------------------------------------------- rendering

# No autoescape (prompts are not HTML); keep_trailing_newline so a template's text is kept exactly.
_ENV = SandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True)
# Tags that read other template files: the environment has no loader, a template is one self-contained text.
_FILE_TAGS = (jinja2.nodes.Include, jinja2.nodes.Import, jinja2.nodes.FromImport, jinja2.nodes.Extends)


@functools.lru_cache(maxsize=512)
def _compile(source: str) -> jinja2.Template:
    return _ENV.from_string(source)


def choose(task: TaskTemplates, index: int, seed: int) -> Template:
    """The phrasing of example ``index``: a function of ``(seed, index)`` only."""
    return random.Random(f"{seed}:{index}").choice(task.templates)


def render(task: TaskTemplates, record: dict, index: int, seed: int) -> tuple[str, str]:
    """``(input, target)`` of one example, with the phrasing :func:`choose` picks for it."""
    template = choose(task, index, seed)
    return _render(template, record, task, f"example {index} (record {index + 1} of the data)")


def render_with(template: Template, record: dict) -> tuple[str, str]:
    """``(input, target)`` of ``record`` with one fixed phrasing."""
    return _render(template, record, None, "the record")


def _render(template: Template, record: dict, task: TaskTemplates | None, where: str) -> tuple[str, str]:
    # A null value counts as missing, so an empty CSV cell or parquet null is not rendered as "None".
    context = {k: v for k, v in record.items() if v is not None}
    if task is not None and task.answer_choices is not None:
        context.setdefault("answer_choices", task.answer_choices)
    try:
        return _compile(template.input).render(context), _compile(template.target).render(context)
    except jinja2.UndefinedError as e:
        match = re.match(r"'([^']+)' is undefined", e.message or "")
        what = f"field '{match.group(1)}'" if match else f"a field ({e.message})"
        if match and match.group(1) in record:  # present, but null
            raise UserError(
                f"{where}: template '{template.name}'{_of(task)} needs {what}, which is null in this record; "
                "fill it in or remove the record"
            ) from None
        raise UserError(
            f"{where}: template '{template.name}'{_of(task)} needs {what}, which the record lacks "
            f"(it has {_fields(record)}); fix the data or choose another --template"
        ) from None
    except (jinja2.TemplateError, TypeError, ValueError, ArithmeticError, LookupError) as e:
        # the sandbox refusing an unsafe attribute, a failing filter, arithmetic on a text field ('{{ text / 2 }}')
        message = " ".join(str(e).split()) or type(e).__name__
        raise UserError(
            f"{where}: template '{template.name}'{_of(task)} failed to render ({message}); fix the template"
        ) from None


def _of(task: TaskTemplates | None) -> str:
    return f" of task '{task.task}'" if task is not None else ""


def _fields(record: dict) -> str:
    names = [_shown(k) for k in record if not str(k).startswith("_")]  # not bookkeeping keys like _index
    return ", ".join(names) or "no fields"


def _shown(name) -> str:
    """A name from the data as it can stand in a one-line message: line breaks and other unprintables escaped."""
    text = str(name)
    return text if text.isprintable() else repr(text)[1:-1]


def _needs(builtins: dict[str, TaskTemplates]) -> str:
    return "; ".join(f"{name} ({', '.join(t.fields)})" for name, t in builtins.items())


# ------------------------------------------------------------------ browsing (peftlab templates ...)
# `peftlab templates list [PATH ...]`, `show NAME|FILE`, `render NAME|FILE (--record JSON | --data
# SOURCE [--index N]) [--name TEMPLATE]` are thin wrappers over the functions below.


@dataclass
class Rendered:
    """One phrasing applied to one record."""

    template: str
    input: str
    target: str


def load_task(name_or_file: str) -> TaskTemplates:
    """A built-in task by name, or a task YAML file (no record to check the fields against)."""
    return resolve_templates(name_or_file, [])


def list_templates(*paths: str | Path) -> list[TaskTemplates]:
    """The built-in tasks, then those of ``paths`` (YAML files, or folders: their ``*.yaml``/``*.yml``)."""
    tasks = list(builtin_templates().values())
    for path in map(lambda p: Path(p).expanduser(), paths):
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".yaml", ".yml") and p.is_file())
            if not files:
                raise UserError(f"folder {path} holds no .yaml template files; give a folder of task YAML files")
            tasks += [load_templates(p) for p in files]
        else:
            tasks.append(load_templates(path))
    return tasks


def describe(task: TaskTemplates) -> dict:
    """One row of ``peftlab templates list``."""
    return {
        "task": task.task,
        "fields": list(task.fields),
        "templates": len(task.templates),
        "metric": task.metric,
        "task_type": task.task_type,
        "answer_choices": list(task.answer_choices) if task.answer_choices is not None else None,
        "description": task.description,
    }


def template_source(name_or_file: str) -> tuple[str, str]:
    """``(where, YAML text)`` of a built-in task or a task file, for ``peftlab templates show``."""
    if name_or_file in builtin_templates():
        folder = resources.files("peftlab.data") / "templates"
        for entry in sorted(folder.iterdir(), key=lambda e: e.name):
            if entry.name.endswith(".yaml"):
                text = entry.read_text(encoding="utf-8")
                if _parse(text, entry.name).task == name_or_file:
                    return f"built-in {entry.name}", text
    load_task(name_or_file)  # validates the file, or raises a UserError naming the built-ins
    path = Path(name_or_file).expanduser()
    return str(path), path.read_text(encoding="utf-8")


def find_template(task: TaskTemplates, name: str) -> Template:
    """The phrasing called ``name``; a UserError lists the task's phrasings."""
    for template in task.templates:
        if template.name == name:
            return template
    names = [t.name for t in task.templates]
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise UserError(f"task '{task.task}' has no template '{name}'{hint}; its templates: {', '.join(names)}")


def render_template(task: TaskTemplates, template: Template | str, record: dict) -> tuple[str, str]:
    """``(input, target)`` of ``record`` with one fixed phrasing of ``task`` (which sees ``answer_choices``)."""
    if isinstance(template, str):
        template = find_template(task, template)
    return _render(template, record, task, "the record")


def render_all(task: TaskTemplates, record: dict, template: str | None = None) -> list[Rendered]:
    """``record`` through every phrasing of ``task`` (or only the one named ``template``)."""
    chosen = [find_template(task, template)] if template is not None else task.templates
    return [Rendered(t.name, *render_template(task, t, record)) for t in chosen]


def example_record(record: str | dict | None = None, data: str | None = None, index: int = 0) -> dict:
    """The record to render: ``record`` as a JSON object (text or dict), or record ``index`` of ``data``
    (any source :func:`peftlab.data.sources.load_records` reads; 0 is the first)."""
    if (record is None) == (data is None):
        raise UserError("give exactly one of a record (a JSON object) or a data source with an index")
    if data is not None:
        records = load_records(data)
        if not -len(records) <= index < len(records):
            raise UserError(f"{data} holds {len(records)} records, so there is no record {index}; give --index 0..{len(records) - 1}")
        return records[index]
    if isinstance(record, str):
        try:
            record = json.loads(record)
        except json.JSONDecodeError as e:
            raise UserError(f"the record is not valid JSON ({e.msg} at column {e.colno}); give an object like '{{\"text\": \"...\"}}'") from None
        except (ValueError, RecursionError):  # past Python's limits: an int over 4300 digits, nesting too deep
            raise UserError("the record holds a number or nesting too large for Python to read; shorten it") from None
    if not isinstance(record, dict):
        raise UserError(f"the record must be a JSON object like {{\"text\": \"...\"}}, not a {type(record).__name__}")
    return record
