"""Load a data set as a list of records (plain dicts), whatever it is stored in.

A *source* is one string, as given to ``--data``:

=============================  ==============================================================
``train.jsonl``                one JSON object per line (blank lines are skipped)
``train.json``                 a list of objects, or ``{"examples": [...]}`` (BIG-Bench style)
``train.csv``                  a header row, then one row per record (every value a string)
``train.parquet``              read with pyarrow
``some/folder``                a ``datasets.save_to_disk`` folder (of a DatasetDict: its
                               ``train`` split, or its only split), or a folder holding
                               exactly one of the files above
``demo:dialogsum``             data this project generates itself (:mod:`peftlab.data.demo`);
                               also ``demo:reviews``, ``demo:python``, ``demo:qa``
``hf:NAME[:CONFIG][@SPLIT]``   a Hugging Face hub data set, via ``datasets.load_dataset``
                               (split ``train`` unless given), e.g. ``hf:knkarthick/dialogsum@test``
=============================  ==============================================================

``datasets`` and ``pyarrow`` are imported only by the branches that need them: starting the
CLI should not pay for them.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import io
import json
import re
from pathlib import Path

from peftlab.data.demo import DEMO_SOURCES
from peftlab.errors import UserError

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")

_HOW = "give a .jsonl, .json, .csv or .parquet file, a datasets.save_to_disk folder, demo:NAME or hf:NAME"


def load_records(source: str) -> list[dict]:
    """All records of ``source`` (see the module docstring), in file order; never empty."""
    if source.startswith("demo:"):
        records = _load_demo(source[len("demo:") :])
    elif source.startswith("hf:"):
        records = _load_hub(source[len("hf:") :])
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise UserError(f"data file not found: {source} ({_HOW})")
        records = _load_folder(path) if path.is_dir() else _load_file(path)
    if not records:
        raise UserError(f"data set is empty: {source} holds no records; point --data at a file with examples")
    return records


# ---------------------------------------------------------------------------------------------- files


def _load_file(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    loaders = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    if suffix not in loaders:
        raise UserError(
            f"unsupported data file type '{suffix or path.name}': {path}; "
            f"supported: {', '.join(FILE_SUFFIXES)}, a datasets.save_to_disk folder, demo:NAME, hf:NAME"
        )
    return loaders[suffix](path)


def _read_text(path: Path, newline: str | None = None) -> str:
    try:
        with path.open(encoding="utf-8-sig", newline=newline) as f:  # -sig: tolerate a byte-order mark
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); re-save it as UTF-8") from None


_CSV_FIELD_LIMIT = 2**31 - 1  # the largest the csv module takes on every platform
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # \uD800-\uDFFF: half of a UTF-16 pair


def _parse_json(text: str, where: str):
    """``json.loads``, with what it cannot hold as a UserError naming ``where`` (syntax errors are the caller's)."""
    try:
        data = json.loads(text)
    except RecursionError:
        raise UserError(f"{where}: JSON nested too deeply (thousands of lists or objects inside each other); flatten it") from None
    except json.JSONDecodeError:
        raise
    except ValueError as e:  # Python's limit on the digits of an int
        raise UserError(f"{where}: a number too long to read ({_first_line(e).split(':')[0]}); write it as a string") from None
    if _SURROGATE_ESCAPE.search(text):  # one outside a pair gives a lone surrogate, which is not text
        try:
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise UserError(
                f"{where}: the escape {ascii(e.object[e.start : e.end])[1:-1]} is half of a UTF-16 surrogate pair "
                "(a cut emoji?); fix or remove that text"
            ) from None
    return data


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    # Lines end at "\n" only: str.splitlines would also cut at U+2028, U+0085 ..., which JSON strings may hold raw.
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = _parse_json(line, f"{path}, line {number}")
        except json.JSONDecodeError as e:
            raise UserError(
                f"{path}, line {number}: not valid JSON ({e.msg} at column {e.colno}); "
                "a .jsonl file holds one JSON object per line"
            ) from None
        if not isinstance(record, dict):
            raise UserError(
                f"{path}, line {number}: expected a JSON object like {{\"prompt\": ...}}, "
                f"got a {_json_type(record)}"
            )
        records.append(record)
    return records


def _read_json(path: Path) -> list[dict]:
    try:
        data = _parse_json(_read_text(path), str(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if isinstance(data, dict):
        if "examples" not in data:
            keys = ", ".join(list(data)[:8]) or "none"
            raise UserError(
                f"{path}: a JSON object must hold the records under \"examples\" (its keys: {keys}); "
                "or make the file a list of objects"
            )
        data = data["examples"]
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a list of JSON objects, got a {_json_type(data)}")
    for i, record in enumerate(data):
        if not isinstance(record, dict):
            raise UserError(f"{path}: record {i} is a {_json_type(record)}, expected a JSON object")
    return data


def _read_csv(path: Path) -> list[dict]:
    # newline="": a quoted value keeps its "\r" and "\r\n" (the csv module's rule for the files it reads)
    reader = csv.DictReader(io.StringIO(_read_text(path, newline=""), newline=""))  # restkey None: values past the header
    records = []
    limit = csv.field_size_limit(_CSV_FIELD_LIMIT)  # a long dialogue is one value: no 128 KiB cap
    try:
        if reader.fieldnames is None:
            return []
        for row in reader:
            if None in row:
                raise UserError(
                    f"{path}, line {reader.line_num}: more values than the {len(reader.fieldnames)} header columns; "
                    "quote values that contain commas"
                )
            records.append(row)
    except csv.Error as e:
        raise UserError(f"{path}, line {reader.line_num}: not valid CSV ({_first_line(e)}); check its quoting") from None
    finally:
        csv.field_size_limit(limit)
    return records


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError ... for a damaged file
        raise UserError(f"{path}: not a readable parquet file ({_first_line(e)})") from None


_SAVED_DATASET_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")  # what save_to_disk writes


def _load_folder(path: Path) -> list[dict]:
    if any((path / name).is_file() for name in _SAVED_DATASET_MARKERS):
        return _load_saved_dataset(path)
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FILE_SUFFIXES)
    if len(files) != 1:
        found = ", ".join(p.name for p in files) if files else f"no {'/'.join(FILE_SUFFIXES)} file"
        raise UserError(
            f"folder {path} is not a datasets.save_to_disk folder and holds {found}; "
            "pass the one file to use as --data"
        )
    return _load_file(files[0])


def _load_saved_dataset(path: Path) -> list[dict]:
    """A ``save_to_disk`` folder; of a DatasetDict, its ``train`` split (or its only split)."""
    from datasets import DatasetDict, load_from_disk

    try:
        with _quiet_datasets():
            data = load_from_disk(str(path))
    except Exception as e:  # a damaged or hand-made folder: missing arrow files, bad JSON, ... (datasets' errors vary)
        raise UserError(
            f"{path} looks like a datasets.save_to_disk folder but cannot be read ({type(e).__name__}: {_first_line(e)}); "
            "save it again with save_to_disk, or pass a .jsonl/.json/.csv/.parquet file"
        ) from None
    if isinstance(data, DatasetDict):
        if "train" in data:
            data = data["train"]
        elif len(data) == 1:
            data = next(iter(data.values()))
        else:
            raise UserError(
                f"{path} holds splits {', '.join(data)} and none is named 'train'; "
                "save the split you want on its own with Dataset.save_to_disk"
            )
    return data.to_list()


# ---------------------------------------------------------------------------------- demo and hub


def _load_demo(name: str) -> list[dict]:
    if name not in DEMO_SOURCES:
        close = difflib.get_close_matches(name, DEMO_SOURCES, n=3)
        hint = f" (did you mean {', '.join('demo:' + c for c in close)}?)" if close else ""
        names = ", ".join("demo:" + n for n in DEMO_SOURCES)
        raise UserError(f"unknown demo data set 'demo:{name}'{hint}; available: {names}")
    return DEMO_SOURCES[name]()


def parse_hub_id(spec: str) -> tuple[str, str | None, str]:
    """``NAME[:CONFIG][@SPLIT]`` -> ``(name, config or None, split)``, split ``train`` by default."""
    rest, _, split = spec.partition("@")
    name, _, config = rest.partition(":")
    if not name or (("@" in spec) and not split) or ((":" in rest) and not config):
        raise UserError(
            f"bad hub data set 'hf:{spec}': write hf:NAME[:CONFIG][@SPLIT], e.g. hf:knkarthick/dialogsum@test"
        )
    return name, config or None, split or "train"


def _load_hub(spec: str) -> list[dict]:
    name, config, split = parse_hub_id(spec)
    from datasets import load_dataset

    try:
        with _quiet_datasets():
            data = load_dataset(name, config, split=split)
    except Exception as e:  # offline, unknown id, unknown split: all end the same way for the user
        raise UserError(
            f"could not load hf:{spec} from the Hugging Face hub ({type(e).__name__}: {_first_line(e)}); "
            "check the id and your connection, or save the data to a local .jsonl/.parquet file and pass its path"
        ) from None
    return data.to_list()


# -------------------------------------------------------------------------------------------- util


@contextlib.contextmanager
def _quiet_datasets():
    """Silence ``datasets``' own progress bars (library code never prints), then restore them."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _json_type(value) -> str:
    names = {list: "list", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else "no details"
