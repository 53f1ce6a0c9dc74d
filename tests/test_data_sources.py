"""load_records: every source format gives the same records; every user mistake is a one-line UserError."""

from __future__ import annotations

import json

import pytest

from peftlab.data.demo import dialogsum_demo
from peftlab.data.sources import load_records, parse_hub_id
from peftlab.data.templates import resolve_templates
from peftlab.errors import UserError

RECORDS = [
    {"prompt": "Say hi.", "completion": "Hi!"},
    {"prompt": "Two, three", "completion": "line one\nline two"},  # a comma and a newline survive CSV quoting
    {"prompt": "Ünïcode ✓", "completion": "ok"},
]


def user_error(source: str) -> str:
    """The message of the UserError that loading ``source`` raises; it must be one line."""
    with pytest.raises(UserError) as info:
        load_records(source)
    message = str(info.value)
    assert "\n" not in message and message
    return message


def write_jsonl(path, records, extra_lines=()):
    lines = [json.dumps(r, ensure_ascii=False) for r in records] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------- formats


def test_jsonl_skips_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", RECORDS[:2], extra_lines=["", "   "])
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(RECORDS[2], ensure_ascii=False) + "\n")
    assert load_records(str(path)) == RECORDS


def test_json_list_and_examples_object(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps(RECORDS), encoding="utf-8")
    (tmp_path / "obj.json").write_text(json.dumps({"canary": "x", "examples": RECORDS}), encoding="utf-8")
    assert load_records(str(tmp_path / "list.json")) == RECORDS
    assert load_records(str(tmp_path / "obj.json")) == RECORDS


def test_csv_with_header_quoting_and_bom(tmp_path):
    import csv

    path = tmp_path / "d.csv"
    with path.open("w", encoding="utf-8-sig", newline="") as f:  # Excel writes a byte-order mark
        writer = csv.DictWriter(f, fieldnames=["prompt", "completion"])
        writer.writeheader()
        writer.writerows(RECORDS)
    assert load_records(str(path)) == RECORDS


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(RECORDS), path)
    assert load_records(str(path)) == RECORDS


def test_save_to_disk_folder_and_dataset_dict(tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "ds"))
    assert load_records(str(tmp_path / "ds")) == RECORDS

    other = [{"prompt": "p", "completion": "c"}]
    both = DatasetDict({"test": Dataset.from_list(other), "train": Dataset.from_list(RECORDS)})
    both.save_to_disk(str(tmp_path / "dd"))
    assert load_records(str(tmp_path / "dd")) == RECORDS  # the train split

    DatasetDict({"test": Dataset.from_list(other), "validation": Dataset.from_list(other)}).save_to_disk(
        str(tmp_path / "no-train")
    )
    message = user_error(str(tmp_path / "no-train"))
    assert "test, validation" in message and "'train'" in message


def test_folder_holding_one_file(tmp_path):
    write_jsonl(tmp_path / "only.jsonl", RECORDS)
    (tmp_path / "notes.txt").write_text("ignored")
    assert load_records(str(tmp_path)) == RECORDS


def test_demo_source():
    assert load_records("demo:dialogsum") == dialogsum_demo()


def test_hub_code_path_with_a_local_dataset_folder(tmp_path, monkeypatch):
    # load_dataset also takes a local folder of data files: the hf: branch runs for real, offline.
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    (tmp_path / "hub").mkdir()
    write_jsonl(tmp_path / "hub" / "train.jsonl", RECORDS)
    assert load_records(f"hf:{tmp_path / 'hub'}") == RECORDS
    assert load_records(f"hf:{tmp_path / 'hub'}@train[:2]") == RECORDS[:2]


def test_hub_id_parsing():
    assert parse_hub_id("knkarthick/dialogsum") == ("knkarthick/dialogsum", None, "train")
    assert parse_hub_id("glue:sst2@validation") == ("glue", "sst2", "validation")
    assert parse_hub_id("org/name@test") == ("org/name", None, "test")
    for bad in ["", "name@", "name:@test", ":cfg"]:
        with pytest.raises(UserError, match="hf:NAME"):
            parse_hub_id(bad)


def test_shared_dialogsum_dev_loads_and_detects_the_template(shared_data):
    records = load_records(str(shared_data / "dialogsum" / "dev.jsonl"))
    assert len(records) == 500
    assert {"dialogue", "summary", "topic"} <= set(records[0])
    assert records[0]["dialogue"].startswith("#Person1#: ")
    assert resolve_templates(None, records).task == "dialogsum"


# ------------------------------------------------------------------------------------------ errors


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.jsonl"
    message = user_error(str(missing))
    assert "not found" in message and str(missing) in message


def test_unsupported_extension_lists_the_supported_ones(tmp_path):
    (tmp_path / "d.txt").write_text("hello")
    message = user_error(str(tmp_path / "d.txt"))
    assert "'.txt'" in message
    for suffix in (".jsonl", ".json", ".csv", ".parquet"):
        assert suffix in message


def test_malformed_jsonl_line_names_line_and_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", RECORDS[:2], extra_lines=['{"prompt": "x", "completion": }'])
    message = user_error(str(path))
    assert "line 3" in message and "Expecting value" in message and str(path) in message


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", RECORDS[:1], extra_lines=['["a", "list"]'])
    message = user_error(str(path))
    assert "line 2" in message and "JSON object" in message and "list" in message


@pytest.mark.parametrize(
    ("name", "content"),
    [("e.jsonl", "\n\n"), ("e.json", "[]"), ("e.csv", "prompt,completion\n"), ("e2.csv", ""),
     ("e3.json", '{"examples": []}')],  # fmt: skip
)
def test_empty_data_set_names_the_file(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    message = user_error(str(tmp_path / name))
    assert "empty" in message and str(tmp_path / name) in message


def test_empty_parquet_names_the_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), tmp_path / "e.parquet")
    assert "empty" in user_error(str(tmp_path / "e.parquet"))


def test_bad_json_files(tmp_path):
    (tmp_path / "bad.json").write_text('[{"a": 1},')
    assert "not valid JSON" in user_error(str(tmp_path / "bad.json"))
    (tmp_path / "keys.json").write_text('{"data": []}')
    message = user_error(str(tmp_path / "keys.json"))
    assert '"examples"' in message and "data" in message
    (tmp_path / "scalars.json").write_text('[{"a": 1}, 7]')
    assert "record 1" in user_error(str(tmp_path / "scalars.json"))


def test_csv_row_with_too_many_values(tmp_path):
    (tmp_path / "d.csv").write_text("prompt,completion\na,b\nc,d,e\n")
    message = user_error(str(tmp_path / "d.csv"))
    assert "line 3" in message and "2 header columns" in message


def test_not_utf8(tmp_path):
    (tmp_path / "d.jsonl").write_bytes(b'{"prompt": "caf\xe9"}\n')
    assert "UTF-8" in user_error(str(tmp_path / "d.jsonl"))


def test_bad_parquet(tmp_path):
    (tmp_path / "d.parquet").write_text("not parquet")
    assert "parquet" in user_error(str(tmp_path / "d.parquet"))


def test_folder_with_several_or_no_data_files(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", RECORDS)
    write_jsonl(tmp_path / "b.jsonl", RECORDS)
    message = user_error(str(tmp_path))
    assert "a.jsonl, b.jsonl" in message
    (tmp_path / "empty").mkdir()
    assert "no .jsonl/.json/.csv/.parquet file" in user_error(str(tmp_path / "empty"))


def test_unknown_demo_suggests_close_names():
    message = user_error("demo:dialogsun")
    assert "demo:dialogsun" in message and "did you mean demo:dialogsum" in message


def test_hub_offline_names_the_id_and_suggests_a_local_file():
    # conftest sets HF_HUB_OFFLINE=1, so no network is tried.
    message = user_error("hf:peftlab-tests/no-such-dataset:cfg@test")
    assert "hf:peftlab-tests/no-such-dataset:cfg@test" in message
    assert "local .jsonl" in message


def test_damaged_save_to_disk_folder_is_one_line(tmp_path):
    (tmp_path / "missing-arrow").mkdir()
    (tmp_path / "missing-arrow" / "state.json").write_text('{"_data_files": [{"filename": "x.arrow"}]}')
    (tmp_path / "bad-json").mkdir()
    (tmp_path / "bad-json" / "state.json").write_text("garbage")
    (tmp_path / "bad-json" / "dataset_info.json").write_text("garbage")
    for name in ("missing-arrow", "bad-json"):
        message = user_error(str(tmp_path / name))
        assert "looks like a datasets.save_to_disk folder but cannot be read" in message and "\n" not in message


def test_every_completion_empty_is_refused_and_the_train_split_may_be_empty_for_evaluation(tmp_path):
    from peftlab.data.pipeline import prepare

    write_jsonl(tmp_path / "empty.jsonl", [{"prompt": f"p{i}", "completion": " "} for i in range(5)])
    with pytest.raises(UserError, match="every record of .* has an empty completion"):
        prepare(str(tmp_path / "empty.jsonl"), None, "0.8,0.1,0.1", 0)
    write_jsonl(tmp_path / "some.jsonl", [{"prompt": f"p{i}", "completion": "" if i else "c"} for i in range(5)])
    assert len(prepare(str(tmp_path / "some.jsonl"), None, "1,0,0", 0).splits["train"]) == 5
    with pytest.raises(UserError, match="the train split is empty"):
        prepare(str(tmp_path / "some.jsonl"), None, "0,0,1", 0)
    assert len(prepare(str(tmp_path / "some.jsonl"), None, "0,0,1", 0, require_train=False).splits["test"]) == 5
