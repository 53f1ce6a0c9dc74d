"""Built-in task families and task-name resolution.

=================================  =========================================================
``mmlu``                           all 57 MMLU subjects (aggregated size-weighted, and by category)
``mmlu_stem`` (``_humanities``,    one MMLU category
``_social_sciences``, ``_other``)
``mmlu_abstract_algebra``          one subject: lm-evaluation-harness's prompt, choices `` A``..`` D``,
                                   few-shot examples the first k of ``dev``
``bbh``                            every BIG-Bench Hard task present (all 27 on the hub)
``bbh_boolean_expressions``        one BBH task: the harness's zero-shot prompt ``Q: {input}\\nA:``,
                                   greedy generation, exact match
``path/to/task.yaml``              a task file (:mod:`peftlab.eval.harness.tasks`)
``path/to/task.json``              a BIG-bench JSON task (``examples`` with ``target`` or
                                   ``target_scores``); a BBH file is one too
=================================  =========================================================

Data: without ``data_root`` the built-ins read the Hugging Face hub (``cais/mmlu``,
``SaylorTwift/bbh``, the data sets the harness reads). With ``data_root`` they read local copies:
``mmlu/{dev,val,test}/<subject>_<split>.csv`` (rows ``question,A,B,C,D,answer_letter``, no header,
as in hendrycks/test) and ``bbh/<task>.json`` (``{"examples": [{"input", "target"}]}``).
MMLU's evaluated split is ``test`` unless ``split`` says otherwise (``val``/``validation``,
``dev``); BBH and BIG-bench files have one split, so ``split`` does not apply to them.
"""

from __future__ import annotations

import csv
import difflib
import functools
import io
import json
from importlib import resources
from pathlib import Path

import yaml

from peftlab.errors import UserError
from peftlab.eval.harness.tasks import Task, config_from_dict, load_task_file, make_task, task_from_config

MMLU_HUB = "cais/mmlu"
BBH_HUB = "SaylorTwift/bbh"
MMLU_TEXT = "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:"
BBH_STOPS = ["</s>", "Q:", "<|im_end|>"]
# The harness's bbh_zeroshot strict exact match: case-insensitive, minus a final period, commas, newlines, \ and ".
BBH_IGNORE = ["\\.$", ",", "\n", "\\\\", '"']
_MMLU_SPLITS = {"test": "test", "val": "validation", "validation": "validation", "dev": "dev"}
_MMLU_FOLDER = {"test": "test", "validation": "val", "dev": "dev"}
_LETTERS = "ABCD"


@functools.cache
def mmlu_categories() -> dict[str, list[str]]:
    """``{category: [subject, ...]}`` for MMLU's 57 subjects."""
    return yaml.safe_load((resources.files("peftlab.eval.harness") / "mmlu_subjects.yaml").read_text(encoding="utf-8"))


@functools.cache
def mmlu_subjects() -> dict[str, str]:
    """``{subject: category}``."""
    return {s: category for category, subjects in mmlu_categories().items() for s in subjects}


@functools.cache
def bbh_descriptions() -> dict[str, str]:
    """``{task: the description its prompt starts with}`` for the 27 BBH tasks."""
    return yaml.safe_load((resources.files("peftlab.eval.harness") / "bbh_tasks.yaml").read_text(encoding="utf-8"))


def builtin_names() -> list[str]:
    names = ["mmlu", *(f"mmlu_{c}" for c in mmlu_categories()), *(f"mmlu_{s}" for s in mmlu_subjects())]
    return names + ["bbh", *(f"bbh_{t}" for t in bbh_descriptions())]


# ------------------------------------------------------------------------------------------ MMLU


def mmlu_config(subject: str, split: str) -> dict:
    """lm-evaluation-harness's ``mmlu_<subject>`` (default variant) as a task mapping."""
    return {
        "task": f"mmlu_{subject}",
        "output_type": "multiple_choice",
        "test_split": split,
        "fewshot_split": "dev",
        "fewshot_config": {"sampler": "first_n"},
        "num_fewshot": 0,
        "description": f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n",
        "doc_to_text": MMLU_TEXT,
        "doc_to_choice": list(_LETTERS),
        "doc_to_target": "answer",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
    }


def mmlu_task(subject: str, split: str | None, data_root: Path | None) -> Task:
    asked, split = split, _MMLU_SPLITS.get((split or "test").lower())
    if split is None:
        raise UserError(f"MMLU has no split '{asked}'; use test, val (validation) or dev")
    if data_root is not None:
        splits = {name: _read_mmlu_csv(data_root, subject, name) for name in dict.fromkeys([split, "dev"])}
        source = str(data_root / "mmlu")
    else:
        splits = _hub_splits(MMLU_HUB, subject, f"MMLU subject '{subject}'", "mmlu/{dev,val,test}/<subject>_<split>.csv")
        source = f"hub:{MMLU_HUB}"
    config = config_from_dict(mmlu_config(subject, split), source)
    return make_task(config, splits, split, group="mmlu", category=mmlu_subjects()[subject])


def _read_mmlu_csv(data_root: Path, subject: str, split: str) -> list[dict]:
    folder = _MMLU_FOLDER[split]
    path = data_root / "mmlu" / folder / f"{subject}_{folder}.csv"
    if not path.is_file():
        raise UserError(f"MMLU file not found: {path}; --data-root must hold mmlu/{{dev,val,test}}/<subject>_<split>.csv")
    docs = []
    rows = csv.reader(io.StringIO(path.read_text(encoding="utf-8-sig"), newline=""))
    for number, row in enumerate(rows, start=1):
        if len(row) != 6 or row[5].strip() not in _LETTERS:
            raise UserError(f"{path}, row {number}: expected question,A,B,C,D,answer_letter (A-D); got {len(row)} values")
        docs.append({"question": row[0], "subject": subject, "choices": row[1:5], "answer": _LETTERS.index(row[5].strip())})
    return docs


# ------------------------------------------------------------------------------------------- BBH


def bbh_config(name: str) -> dict:
    """lm-evaluation-harness's ``bbh_zeroshot_<name>`` (strict match), plus an exact match of the first line."""
    strict = {"metric": "exact_match", "ignore_case": True, "regexes_to_ignore": BBH_IGNORE}
    return {
        "task": f"bbh_{name}",
        "output_type": "generate_until",
        "test_split": "test",
        "fewshot_split": "test",  # few-shot examples (if asked for) from the other examples
        "num_fewshot": 0,
        "description": bbh_descriptions().get(name, ""),
        "doc_to_text": "Q: {{input}}\nA:",
        "doc_to_target": "{{target}}",
        "generation_kwargs": {"until": list(BBH_STOPS), "do_sample": False, "temperature": 0.0},
        # The strict match is the harness's; a generation that starts with a space or goes on past the
        # answer (" False\n\nA: ...") fails it, so the first line, stripped, is scored too (and first:
        # it is the item score the holistic report uses).
        "metric_list": [{**strict, "name": "exact_match_first_line", "first_line": True}, strict],
    }


def bbh_task(name: str, data_root: Path | None) -> Task:
    if data_root is not None:
        path = data_root / "bbh" / f"{name}.json"
        if not path.is_file():
            raise UserError(f"BBH file not found: {path}; --data-root must hold bbh/<task>.json")
        splits = {"test": _read_examples(path)}
        source = str(path)
    else:
        splits = _hub_splits(BBH_HUB, name, f"BBH task '{name}'", "bbh/<task>.json")
        source = f"hub:{BBH_HUB}"
    return make_task(config_from_dict(bbh_config(name), source), splits, "test", group="bbh")


def bbh_present(data_root: Path | None) -> list[str]:
    """BBH tasks to run for ``bbh``: those with a file under ``data_root/bbh``, else all 27."""
    if data_root is None:
        return list(bbh_descriptions())
    folder = data_root / "bbh"
    present = sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []
    if not present:
        raise UserError(f"no BBH files under {folder}; --data-root must hold bbh/<task>.json")
    return present


def _read_examples(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    examples = data.get("examples") if isinstance(data, dict) else None
    if not isinstance(examples, list) or not examples or not all(isinstance(e, dict) for e in examples):
        raise UserError(f"{path}: expected {{\"examples\": [{{\"input\": ..., \"target\": ...}}, ...]}}")
    return examples


# ------------------------------------------------------------------------------------- BIG-bench


def bigbench_task(path: str | Path) -> Task:
    """A BIG-bench JSON task: ``target_scores`` -> multiple choice, else generation scored by exact match.

    The prompt follows BIG-bench's JSON-task defaults: ``task_prefix`` then, per example,
    ``example_input_prefix`` (``"Q: "``) + input + (each choice after ``choice_prefix`` when
    ``append_choices_to_input``) + ``example_output_prefix`` (``"\\nA: "``); solved examples are
    separated by a newline.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"BIG-bench task file not found: {path}")
    examples = _read_examples(path)
    meta = json.loads(path.read_text(encoding="utf-8-sig"))
    name = str(meta.get("name") or path.stem).replace(" ", "_")
    in_prefix = str(meta.get("example_input_prefix", "\nQ: ")).lstrip("\n")
    out_prefix = str(meta.get("example_output_prefix", "\nA: "))
    choice_prefix = str(meta.get("choice_prefix", "\n  choice: "))
    multiple_choice = any("target_scores" in e for e in examples)
    docs = []
    for i, example in enumerate(examples):
        if "input" not in example or not ({"target", "target_scores"} & set(example)):
            raise UserError(f"{path}: example {i} needs 'input' and 'target' or 'target_scores'")
        doc = {"input": str(example["input"])}
        if multiple_choice:
            scores = example.get("target_scores")
            if not isinstance(scores, dict) or not scores:
                raise UserError(f"{path}: example {i} has no target_scores, but other examples do (a multiple-choice task)")
            best = max(scores.values())
            doc.update(choices=list(scores), scores=[float(v) for v in scores.values()],
                       gold=[j for j, v in enumerate(scores.values()) if v == best])
        else:
            target = example["target"]
            doc["target"] = [str(t) for t in target] if isinstance(target, list) else [str(target)]
        docs.append(doc)
    show_choices = multiple_choice and bool(meta.get("append_choices_to_input", True))
    choices_text = f"{{% for c in choices %}}{_literal(choice_prefix)}{{{{c}}}}{{% endfor %}}" if show_choices else ""
    config = {
        "task": f"bigbench_{name}",
        "output_type": "multiple_choice" if multiple_choice else "generate_until",
        "test_split": "test",
        "fewshot_split": "test",
        "description": _literal(str(meta.get("task_prefix", ""))),
        "doc_to_text": _literal(in_prefix) + "{{input}}" + choices_text + _literal(out_prefix),
        "doc_to_target": "gold" if multiple_choice else "target",
        "target_delimiter": "",
        "fewshot_delimiter": "\n",
        "num_fewshot": 0,
    }
    if multiple_choice:
        config.update(doc_to_choice="choices", metric_list=[{"metric": "multiple_choice_grade"}, {"metric": "acc"}, {"metric": "acc_norm"}])
    else:
        stop = meta.get("stop_string")
        config.update(generation_kwargs={"until": [str(stop)] if stop else ["\n"]}, metric_list=[{"metric": "exact_str_match"}])
    return make_task(config_from_dict(config, str(path)), {"test": docs}, "test", group=None)


def _literal(text: str) -> str:
    """``text`` as literal Jinja (no template syntax inside it is interpreted)."""
    return "{% raw %}" + text + "{% endraw %}" if text else ""


# -------------------------------------------------------------------------------------- the hub


def _hub_splits(path: str, name: str, what: str, layout: str) -> dict[str, list[dict]]:
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # library code never prints
    try:
        data = datasets.load_dataset(path, name)
    except Exception as e:  # offline, no such config: one line that says what to do
        cause = " ".join(str(e).split())[:160] or type(e).__name__
        raise UserError(
            f"could not load {what} from the Hugging Face hub ({path}: {type(e).__name__}: {cause}); "
            f"pass --data-root DIR holding {layout} to read local copies"
        ) from None
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()
    return {split: data[split].to_list() for split in data}


# ---------------------------------------------------------------------------------- name -> tasks


def resolve_tasks(names: list[str], *, data_root: str | Path | None = None, split: str | None = None) -> list[Task]:
    """Tasks for names, families and files, in the order given (duplicates once)."""
    if not names:
        raise UserError("no tasks given; name some, e.g. mmlu_abstract_algebra, bbh_boolean_expressions or a task.yaml")
    root = Path(data_root).expanduser() if data_root is not None else None
    if root is not None and not root.is_dir():
        raise UserError(f"--data-root {root} is not a folder; it should hold mmlu/ and/or bbh/")
    tasks: dict[str, Task] = {}
    for name in names:
        for task in _expand(name.strip(), root, split):
            tasks.setdefault(task.name, task)
    return list(tasks.values())


def _expand(name: str, root: Path | None, split: str | None) -> list[Task]:
    lowered = name.lower()
    if lowered.endswith((".yaml", ".yml")):
        return [task_from_config(load_task_file(name), split)]
    if lowered.endswith(".json"):
        return [bigbench_task(name)]
    subjects, categories, bbh = mmlu_subjects(), mmlu_categories(), bbh_descriptions()
    if lowered == "mmlu":
        return [mmlu_task(s, split, root) for s in subjects]
    if lowered.startswith("mmlu_") and lowered[5:] in categories:
        return [mmlu_task(s, split, root) for s in categories[lowered[5:]]]
    if lowered.startswith("mmlu_") and lowered[5:] in subjects:
        return [mmlu_task(lowered[5:], split, root)]
    if lowered == "bbh":
        return [bbh_task(t, root) for t in bbh_present(root)]
    if lowered.startswith("bbh_") and lowered[4:] in bbh:
        return [bbh_task(lowered[4:], root)]
    if Path(name).expanduser().exists():
        raise UserError(f"{name}: a task file must end in .yaml/.yml (task YAML) or .json (BIG-bench task)")
    close = difflib.get_close_matches(lowered, builtin_names(), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise UserError(
        f"unknown task '{name}'; {hint}built-in: mmlu, mmlu_<subject>, mmlu_<category>, bbh, bbh_<task>, "
        "or a task .yaml / BIG-bench .json file"
    )
