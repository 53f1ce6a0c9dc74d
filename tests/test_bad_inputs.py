"""The catalogue of bad inputs (README, "When something is wrong"): every row is one case here.

Each case writes its bad input under ``tmp_path``, runs the command in-process and expects one line
on stderr naming the problem, exit code 2, no traceback, and no file changed (bytes and mtimes of
everything under ``tmp_path`` and of the shared tiny models, before and after). A test checks that
the README table and these cases agree one to one.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import expect_error, write_dialogues
from peftlab.cli import COMMANDS, main

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## When something is wrong"


@dataclass(frozen=True)
class Models:
    """What the cases read: the tiny models, a LoRA adapter of the Llama one, a good data file."""

    llama: Path
    t5: Path
    adapter: Path
    data: Path


@dataclass(frozen=True)
class Case:
    id: str
    problem: str
    """The README row's problem text, word for word."""
    setup: Callable[[Path, Models], list[str]]
    """Writes the bad input under the case's folder and returns the command's arguments."""
    expected: str
    """A fragment of the one-line message."""


def write(folder: Path, name: str, content: str | bytes) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def copy_tree(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def template_file(folder: Path, input_text: str, extra: str = "") -> Path:
    return write(folder, "task.yaml", f"task: t\n{extra}templates:\n  - name: a\n    input: {json.dumps(input_text)}\n"
                                      "    target: '{{ summary }}'\n")


def eval_args(m: Models, folder: Path, *more: str, data: Path | str | None = None, out: Path | str | None = None) -> list[str]:
    return ["eval", "--model", str(m.llama), "--data", str(data or m.data), "--out", str(out or folder / "ev"), "--device", "cpu",
            "--limit", "1", "--max-new-tokens", "2", *more]


def generate_args(model: Path | str, *more: str) -> list[str]:
    return ["generate", "--model", str(model), "--prompt", "hi", "--device", "cpu", "--max-new-tokens", "2", *more]


def adapter_copy(folder: Path, m: Models, edit: Callable[[Path], object]) -> Path:
    adapter = copy_tree(m.adapter, folder / "adapter")
    edit(adapter)
    return adapter


def edit_adapter_config(**changes) -> Callable[[Path], object]:
    def edit(adapter: Path) -> None:
        config = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return edit


def truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def score_args(folder: Path, *more: str, references: str = "it is cold outside\nit is warm inside\n") -> list[str]:
    write(folder, "p.txt", "it is cold\nit is warm\n")
    write(folder, "r.txt", references)
    return ["score", "--predictions", str(folder / "p.txt"), "--references", str(folder / "r.txt"), *more]


def merge_args(m: Models, out: Path, *more: str, model: Path | None = None) -> list[str]:
    return ["merge", "--model", str(model or m.llama), "--adapter", str(m.adapter), "--out", str(out), *more]


def compare_args(m: Models, out: Path, methods: str = "base", *more: str) -> list[str]:
    return ["compare", "--model", str(m.llama), "--data", str(m.data), "--out", str(out), "--methods", methods, *more]


def train_args(m: Models, folder: Path, *more: str) -> list[str]:
    return ["train", "--model", str(m.llama), "--data", str(m.data), "--out", str(folder / "run"), "--device", "cpu",
            "--max-steps", "1", *more]


def merge_adapters_args(m: Models, folder: Path, *more: str, adapters: tuple[Path, ...] | None = None,
                        out: Path | None = None, model: Path | None = None) -> list[str]:
    specs = [f"--adapter={name}={path}" for name, path in zip("abc", (m.adapter, m.adapter) if adapters is None else adapters)]
    return ["merge-adapters", "--model", str(model or m.llama), *specs, "--out", str(out or folder / "merged"), *more]


def lora_of_rank(folder: Path, m: Models, rank: int) -> Path:
    from peftlab.models import load_model
    from peftlab.peft import LoraConfig, apply_lora, save_adapter

    config = LoraConfig(rank=rank)
    return save_adapter(apply_lora(load_model(str(m.llama)).model, config), folder / f"r{rank}", config)


def forgetting_args(m: Models, folder: Path, *more: str, out: Path | None = None) -> list[str]:
    return ["forgetting", "--model", str(m.llama), "--adapter", str(m.adapter), "--out", str(out or folder / "fg"),
            "--device", "cpu", *more]


def two_data_files(folder: Path) -> Path:
    write(folder, "data/a.jsonl", DIALOGUE)
    return write(folder, "data/b.jsonl", DIALOGUE).parent


def model_copy(folder: Path, m: Models, edit: Callable[[Path], object]) -> Path:
    model = copy_tree(m.llama, folder / "model")
    edit(model)
    return model


def harness_args(m: Models, tasks: str, *more: str, command: str = "harness") -> list[str]:
    return [command, "--model", str(m.llama), "--tasks", tasks, "--device", "cpu", "--limit", "1", *more]


DIALOGUE = '{"dialogue": "#Person1#: Hi. #Person2#: Hello.", "summary": "They greet."}\n'
# A GGUF header (magic, version 3) that ends inside its tensor count: a download cut short.
TRUNCATED_GGUF = b"GGUF" + struct.pack("<I", 3) + b"\x01\x00"

CASES = [
    # ------------------------------------------------------------------ data files
    Case("data-missing", "The data file does not exist",
         lambda t, m: eval_args(m, t, data=t / "missing.jsonl"), "data file not found"),
    Case("jsonl-bad-line", "A .jsonl line is not valid JSON",
         lambda t, m: eval_args(m, t, data=write(t, "d.jsonl", DIALOGUE + '{"dialogue": oops}\n')), "line 2: not valid JSON"),
    Case("jsonl-not-object", "A .jsonl line holds a list, not an object",
         lambda t, m: eval_args(m, t, data=write(t, "d.jsonl", "[1, 2]\n")), "expected a JSON object"),
    Case("json-no-examples", 'A .json file is an object without "examples"',
         lambda t, m: eval_args(m, t, data=write(t, "d.json", '{"rows": []}')), 'under "examples"'),
    Case("csv-extra-values", "A .csv row has more values than the header",
         lambda t, m: eval_args(m, t, data=write(t, "d.csv", "dialogue,summary\na,b,c\n")), "more values than the 2 header columns"),
    Case("parquet-damaged", "A .parquet file is damaged",
         lambda t, m: eval_args(m, t, data=write(t, "d.parquet", "not parquet")), "not a readable parquet file"),
    Case("data-suffix", "The data file has an unsupported type (.txt)",
         lambda t, m: eval_args(m, t, data=write(t, "d.txt", "hello\n")), "unsupported data file type '.txt'"),
    Case("data-empty", "The data file is empty",
         lambda t, m: eval_args(m, t, data=write(t, "d.jsonl", "")), "data set is empty"),
    Case("data-not-utf8", "The data file is not UTF-8",
         lambda t, m: eval_args(m, t, data=write(t, "d.jsonl", b'{"dialogue": "\xff"}\n')), "is not UTF-8 text"),
    Case("data-folder-two-files", "A data folder holds two data files",
         lambda t, m: eval_args(m, t, data=two_data_files(t)),
         "pass the one file to use as --data"),
    Case("datasets-fake-state", "A folder with a fake datasets state.json",
         lambda t, m: eval_args(m, t, data=write(t, "ds/state.json", '{"_data_files": [{"filename": "x.arrow"}]}').parent),
         "looks like a datasets.save_to_disk folder but cannot be read"),
    Case("demo-unknown", "An unknown demo data set (demo:dialogsun)",
         lambda t, m: eval_args(m, t, data="demo:dialogsun"), "did you mean demo:dialogsum"),
    Case("hub-id-malformed", "A malformed hub data set id (hf:name@)",
         lambda t, m: eval_args(m, t, data="hf:name@"), "write hf:NAME[:CONFIG][@SPLIT]"),
    Case("fields-undetectable", "The records' fields match no built-in template",
         lambda t, m: eval_args(m, t, data=write(t, "d.jsonl", '{"a": 1}\n')), "cannot detect a prompt template"),
    Case("field-null", "A record's summary is null",
         lambda t, m: eval_args(m, t, "--split", "all", data=write(t, "d.jsonl", DIALOGUE + '{"dialogue": "x", "summary": null}\n')),
         "(record 2 of the data): template"),
    Case("field-missing", "A later record lacks a field the template needs",
         lambda t, m: eval_args(m, t, "--split", "all", data=write(t, "d.jsonl", DIALOGUE + '{"dialogue": "x"}\n')),
         "which the record lacks (it has dialogue)"),
    Case("completions-all-empty", "Every record's completion is empty",
         lambda t, m: eval_args(m, t, data=write(t, "d.jsonl", '{"prompt": "p", "completion": ""}\n' * 10)),
         "has an empty completion"),
    # ------------------------------------------------------------------ templates
    Case("template-file-missing", "The --template YAML file does not exist",
         lambda t, m: eval_args(m, t, "--template", str(t / "missing.yaml")), "template file not found"),
    Case("template-bad-yaml", "A template file is not valid YAML",
         lambda t, m: eval_args(m, t, "--template", str(write(t, "t.yaml", "task: [\n"))), "not valid YAML"),
    Case("template-missing-keys", "A template file lacks 'templates'",
         lambda t, m: eval_args(m, t, "--template", str(write(t, "t.yaml", "task: t\n"))), "missing key(s) templates"),
    Case("template-unknown-key", "A template file has an unknown key",
         lambda t, m: eval_args(m, t, "--template", str(template_file(t, "{{ dialogue }}", "colour: red\n"))),
         "unknown key(s) colour"),
    Case("template-jinja-syntax", "A template has a Jinja syntax error",
         lambda t, m: eval_args(m, t, "--template", str(template_file(t, "{{ dialogue"))), "Jinja2 syntax error"),
    Case("template-include", "A template uses {% include %}",
         lambda t, m: eval_args(m, t, "--template", str(template_file(t, '{% include "/etc/passwd" %}'))),
         "templates cannot include, import or extend other files"),
    Case("template-extends", "A template uses {% extends %}",
         lambda t, m: eval_args(m, t, "--template", str(template_file(t, '{% extends "base.txt" %}'))),
         "templates cannot include, import or extend other files"),
    Case("template-arithmetic", "A template does arithmetic on a text field",
         lambda t, m: eval_args(m, t, "--template", str(template_file(t, "{{ dialogue / 2 }}"))), "failed to render"),
    Case("template-python-internals", "A template reaches for Python internals",
         lambda t, m: eval_args(m, t, "--template", str(template_file(t, "{{ dialogue.__class__.__mro__ }}"))), "unsafe"),
    Case("template-unknown-name", "An unknown --template name",
         lambda t, m: eval_args(m, t, "--template", "dialogsun"), "did you mean dialogsum"),
    Case("template-fields-mismatch", "The template needs fields the data lacks",
         lambda t, m: eval_args(m, t, "--template", "instruction"), "needs fields instruction, output"),
    Case("templates-record-not-json", "templates render: --record is not JSON",
         lambda t, m: ["templates", "render", "dialogsum", "--record", "{dialogue: x}"], "the record is not valid JSON"),
    Case("templates-index-out-of-range", "templates render: --index past the end of --data",
         lambda t, m: ["templates", "render", "dialogsum", "--data", str(m.data), "--index", "99"], "there is no record 99"),
    Case("templates-unknown-phrasing", "templates render: an unknown --template phrasing",
         lambda t, m: ["templates", "render", "dialogsum", "--data", str(m.data), "--template", "nope"], "has no template 'nope'"),
    Case("templates-show-unknown", "templates show: an unknown task",
         lambda t, m: ["templates", "show", "dialogsun"], "unknown template 'dialogsun'"),
    # ------------------------------------------------------------------ configs and recipes
    Case("recipe-missing", "The --config recipe does not exist",
         lambda t, m: ["eval", "--config", str(t / "missing.yaml")], "config file not found"),
    Case("recipe-bad-yaml", "A recipe is not valid YAML",
         lambda t, m: ["eval", "--config", str(write(t, "r.yaml", "model: [\n"))], "is not valid YAML at line"),
    Case("recipe-not-mapping", "A recipe is a list, not a mapping",
         lambda t, m: ["eval", "--config", str(write(t, "r.yaml", "- a\n- b\n"))], "must be a mapping"),
    Case("recipe-other-command", "A recipe written for another command",
         lambda t, m: ["eval", "--config", str(write(t, "r.yaml", "command: train\n"))], "is a recipe for 'peftlab train'"),
    Case("recipe-unknown-key", "A recipe has an unknown option",
         lambda t, m: ["eval", "--config", str(write(t, "r.yaml", "modle: x\n"))], "did you mean 'model'"),
    Case("override-not-key-value", "A trailing override is not key=value",
         lambda t, m: eval_args(m, t, "limit"), "is not key=value"),
    Case("override-typo", "A misspelt key=value override",
         lambda t, m: eval_args(m, t, "batchsize=2"), "did you mean 'batch_size'"),
    # ------------------------------------------------------------------ CLI values
    Case("split-fractions-malformed", "--split-fractions is not three numbers",
         lambda t, m: eval_args(m, t, "--split-fractions", "a,b"), "three comma-separated fractions"),
    Case("split-fractions-sum", "--split-fractions do not sum to 1",
         lambda t, m: eval_args(m, t, "--split-fractions", "0.5,0.2,0.2"), "sum to 1, these sum to 0.9"),
    Case("split-empty", "The evaluated split is empty",
         lambda t, m: eval_args(m, t, "--split-fractions", "1,0,0"), "the test split of"),
    Case("fewshot-no-train-split", "--fewshot with an empty train split",
         lambda t, m: eval_args(m, t, "--split-fractions", "0,0,1", "--fewshot", "2"), "takes its examples from the train split"),
    Case("batch-size-zero", "--batch-size 0",
         lambda t, m: eval_args(m, t, "--batch-size", "0"), "--batch-size must be > 0"),
    Case("number-not-a-number", "A number option given a word (--limit many)",
         lambda t, m: eval_args(m, t, "--limit", "many"), "--limit expects int"),
    Case("number-overflow", "A number too large for an integer option (--limit 1e400)",
         lambda t, m: eval_args(m, t, "--limit", "1e400"), "--limit expects int, got '1e400'"),
    Case("choice-invalid", "A value outside an option's choices (--dtype fp8)",
         lambda t, m: eval_args(m, t, "--dtype", "fp8"), "invalid choice: 'fp8'"),
    Case("device-unknown", "An unknown --device",
         lambda t, m: generate_args(m.llama, "--device", "tpu"), "unknown device 'tpu'"),
    Case("generate-prompt-and-input", "generate: both --prompt and --input",
         lambda t, m: generate_args(m.llama, "--input", str(write(t, "in.txt", "hi\n"))), "give exactly one of --prompt TEXT or --input FILE"),
    Case("train-rank-zero", "train: --rank 0",
         lambda t, m: train_args(m, t, "--method", "lora", "--rank", "0"), "LoRA rank must be a positive integer"),
    Case("train-unknown-init", "train: an unknown --init",
         lambda t, m: train_args(m, t, "--method", "lora", "--init", "svd"), "unknown LoRA init 'svd'"),
    Case("train-pissa-on-4bit", "train: --init pissa with qlora",
         lambda t, m: train_args(m, t, "--method", "qlora", "--init", "pissa"), "starts from the float base weights"),
    Case("train-pissa-with-dora", "train: --init olora with dora",
         lambda t, m: train_args(m, t, "--method", "dora", "--init", "olora"), "peftlab's DoRA does not support"),
    Case("train-loraplus-not-lora", "train: --loraplus-ratio with a method outside the LoRA family",
         lambda t, m: train_args(m, t, "--method", "ia3", "--loraplus-ratio", "16"), "applies to the LoRA family"),
    Case("train-resume-overwrite", "train: --resume with --overwrite",
         lambda t, m: train_args(m, t, "--resume", "--overwrite"), "contradict each other"),
    Case("train-target-length", "train: --max-target-length not below --max-length",
         lambda t, m: train_args(m, t, "--max-length", "64", "--max-target-length", "64"), "must be smaller than --max-length"),
    Case("train-ewc-without-data", "train: --regularize ewc without --ewc-data",
         lambda t, m: train_args(m, t, "--regularize", "ewc"), "needs --ewc-data"),
    # ------------------------------------------------------------------ model folders
    Case("model-missing", "The --model folder does not exist",
         lambda t, m: generate_args(t / "nowhere"), "model folder/file not found"),
    Case("model-no-config", "A --model folder without config.json",
         lambda t, m: generate_args(write(t, "model/notes.txt", "x").parent), "has no config.json"),
    Case("model-is-adapter", "An adapter folder given as --model",
         lambda t, m: generate_args(m.adapter), "looks like an adapter folder"),
    Case("model-config-garbage", "A model folder whose config.json is not JSON",
         lambda t, m: generate_args(model_copy(t, m, lambda model: write(model, "config.json", "garbage"))),
         "is not a valid JSON file"),
    Case("model-weights-truncated", "A model folder with a truncated model.safetensors",
         lambda t, m: generate_args(model_copy(t, m, lambda model: truncate(model / "model.safetensors", 3000))),
         "holds a damaged weights file"),
    Case("model-weights-missing", "A model folder without weights",
         lambda t, m: generate_args(model_copy(t, m, lambda model: (model / "model.safetensors").unlink())),
         "no file named model.safetensors"),
    Case("gguf-text-file", "A text file named .gguf as --model",
         lambda t, m: generate_args(write(t, "model.gguf", "hello\n")), "is not a GGUF file"),
    Case("gguf-truncated", "A truncated .gguf file as --model",
         lambda t, m: generate_args(write(t, "model.gguf", TRUNCATED_GGUF)), "is not a readable GGUF model"),
    Case("model-plain-file", "A file that is not .gguf as --model",
         lambda t, m: generate_args(write(t, "model.bin", "x")), "is a file but not a .gguf model"),
    Case("model-unknown-alias", "A misspelt model alias",
         lambda t, m: generate_args("smollm2-135m-instuct"), "did you mean smollm2-135m-instruct"),
    # ------------------------------------------------------------------ adapter folders
    Case("adapter-missing", "The --adapter folder does not exist",
         lambda t, m: generate_args(m.llama, "--adapter", str(t / "nowhere")), "adapter folder"),
    Case("adapter-no-config", "An --adapter folder without adapter_config.json",
         lambda t, m: generate_args(m.llama, "--adapter", str(m.llama)), "has no adapter_config.json"),
    Case("adapter-config-garbage", "adapter_config.json is not JSON",
         lambda t, m: generate_args(m.llama, "--adapter", str(adapter_copy(t, m, lambda a: write(a, "adapter_config.json", "{")))),
         "is not valid JSON"),
    Case("adapter-weights-truncated", "A truncated adapter_model.safetensors",
         lambda t, m: generate_args(m.llama, "--adapter", str(adapter_copy(t, m, lambda a: truncate(a / "adapter_model.safetensors", 500)))),
         "adapter_model.safetensors is damaged"),
    Case("adapter-other-rank", "adapter_config.json disagrees with the weights (another rank)",
         lambda t, m: generate_args(m.llama, "--adapter", str(adapter_copy(t, m, edit_adapter_config(r=2)))),
         "was this adapter trained for another base model?"),
    Case("adapter-other-architecture", "An adapter for another architecture",
         lambda t, m: generate_args(m.t5, "--adapter", str(m.adapter)), "select no layer of T5ForConditionalGeneration"),
    Case("adapter-unknown-type", "An adapter of a type peftlab does not read",
         lambda t, m: generate_args(m.llama, "--adapter", str(adapter_copy(t, m, edit_adapter_config(peft_type="VERA")))),
         "'VERA'"),
    Case("adapter-pickle", "A pickled adapter without --trust-pickle",
         lambda t, m: generate_args(m.llama, "--adapter", str(adapter_copy(t, m, lambda a: (a / "adapter_model.safetensors").rename(a / "adapter_model.bin")))),
         "--trust-pickle"),
    Case("inspect-prompt-lora", "inspect-prompt on a LoRA adapter",
         lambda t, m: ["inspect-prompt", str(m.adapter), "--model", str(m.llama)], "not a soft prompt"),
    # ------------------------------------------------------------------ output folders
    Case("score-json-over-input", "score: --json names the predictions file",
         lambda t, m: score_args(t, "--json", str(t / "p.txt")), "would overwrite the --predictions input"),
    Case("score-per-example-over-input", "score: --per-example names the references file",
         lambda t, m: score_args(t, "--per-example", str(t / "r.txt")), "would overwrite the --references input"),
    Case("score-json-under-file", "score: --json under a file",
         lambda t, m: score_args(t, "--json", str(t / "p.txt" / "m.json")), "which is a file, not a folder"),
    Case("score-json-folder", "score: --json names a folder",
         lambda t, m: score_args(t, "--json", str(t)), "is a folder; give a file path"),
    Case("score-json-unwritable", "score: --json in an unwritable place",
         lambda t, m: score_args(t, "--json", "/proc/peftlab/m.json"), "cannot write in"),
    Case("score-same-outputs", "score: --json and --per-example name the same file",
         lambda t, m: score_args(t, "--json", str(t / "m.json"), "--per-example", str(t / "m.json")), "give two different files"),
    Case("eval-out-under-file", "eval: --out under a file",
         lambda t, m: eval_args(m, t, out=write(t, "f.txt", "x") / "ev"), "which is a file, not a folder"),
    Case("eval-out-unwritable", "eval: --out in an unwritable place",
         lambda t, m: eval_args(m, t, out="/proc/peftlab/ev"), "cannot write in"),
    Case("eval-out-holds-results", "eval: --out already holds results",
         lambda t, m: eval_args(m, t, out=write(t, "ev/metrics.json", "{}").parent), "pass --overwrite to replace them"),
    Case("eval-out-over-data", "eval: --out would overwrite the --data file",
         lambda t, m: eval_args(m, t, "--overwrite", data=write(t, "ev/predictions.jsonl", DIALOGUE)), "would overwrite the --data input"),
    Case("merge-over-base", "merge: --out is the base model folder (with --overwrite)",
         lambda t, m: merge_args(m, copy_tree(m.llama, t / "base"), "--overwrite", model=t / "base"), "would overwrite the --model input"),
    Case("merge-inside-base", "merge: --out inside the base model folder",
         lambda t, m: merge_args(m, t / "base" / "merged", model=copy_tree(m.llama, t / "base")), "lies inside the --model input"),
    Case("merge-holding-adapter", "merge: --out holds the adapter",
         lambda t, m: merge_args(m, m.adapter.parent, "--overwrite"), "would replace the folder holding the --adapter input"),
    Case("merge-out-file", "merge: --out is a file",
         lambda t, m: merge_args(m, write(t, "f.txt", "x")), "is a file; give a folder path"),
    Case("merge-out-exists", "merge: --out already holds a model",
         lambda t, m: merge_args(m, write(t, "merged/config.json", "{}").parent), "pass --overwrite to replace them"),
    Case("compare-out-file", "compare: --out is a file",
         lambda t, m: compare_args(m, write(t, "f.txt", "x")), "is a file; give a folder path"),
    Case("compare-damaged-experiment", "compare: a damaged experiment.json in --out",
         lambda t, m: compare_args(m, write(t, "cmp/experiment.json", "{").parent), "experiment.json is damaged (not valid JSON"),
    Case("compare-out-other-settings", "compare: --out holds an experiment with other settings",
         lambda t, m: compare_args(m, write(t, "cmp/experiment.json", json.dumps({"shared": {"model": "other"}})).parent),
         "holds an experiment with other settings"),
    Case("forgetting-out-holds-results", "forgetting: --out already holds forgetting.json",
         lambda t, m: forgetting_args(m, t, out=write(t, "fg/forgetting.json", "{}").parent), "already holds forgetting.json"),
    Case("harness-out-under-file", "harness: --out under a file",
         lambda t, m: harness_args(m, "mmlu", "--out", str(write(t, "f.txt", "x") / "h")), "which is a file, not a folder"),
    Case("holistic-out-file", "holistic: --out is a file",
         lambda t, m: harness_args(m, "mmlu", "--out", str(write(t, "f.txt", "x")), command="holistic"), "is a file; give a folder path"),
    # ------------------------------------------------------------------ commands
    Case("score-count-mismatch", "score: fewer references than predictions",
         lambda t, m: score_args(t, references="one\n"), "give one reference per prediction"),
    Case("score-object-without-text", 'score: a .jsonl line without "text"',
         lambda t, m: ["score", "--predictions", str(write(t, "p.jsonl", '{"summary": "x"}\n')), "--references", str(t / "p.jsonl")],
         'without a "text" field'),
    Case("score-file-missing", "score: the predictions file does not exist",
         lambda t, m: ["score", "--predictions", str(t / "p.txt"), "--references", str(t / "p.txt")], "text file not found"),
    Case("generate-input-empty", "generate: an empty --input file",
         lambda t, m: ["generate", "--model", str(m.llama), "--input", str(write(t, "in.txt", ""))], "no prompts in"),
    Case("generate-input-object", 'generate: an --input object without "prompt" or "text"',
         lambda t, m: ["generate", "--model", str(m.llama), "--input", str(write(t, "in.jsonl", '{"question": "x"}\n'))],
         'without a "prompt" or "text" field'),
    Case("generate-chat-template-on", "generate: --chat-template on for a tokenizer without one",
         lambda t, m: generate_args(m.llama, "--chat-template", "on"), "has no chat template"),
    Case("compare-unknown-method", "compare: an unknown method",
         lambda t, m: compare_args(m, t / "cmp", "base,lorra"), "unknown method 'lorra'"),
    Case("compare-fewshot-malformed", "compare: fewshot without a count",
         lambda t, m: compare_args(m, t / "cmp", "fewshot:x"), "write fewshot:K"),
    Case("compare-method-twice", "compare: a method listed twice",
         lambda t, m: compare_args(m, t / "cmp", "lora,lora"), "lists a method twice"),
    Case("compare-method-option-without-value", "compare: a method option without a value",
         lambda t, m: compare_args(m, t / "cmp", "full,lora:init"), "written METHOD:KEY=VALUE"),
    Case("compare-method-option-unknown", "compare: an unknown option of a method",
         lambda t, m: compare_args(m, t / "cmp", "lora:inti=pissa"), "unknown option 'inti'"),
    Case("sweep-unknown-option", "sweep: an unknown option swept",
         lambda t, m: ["sweep", "--model", str(m.llama), "--data", str(m.data), "--out", str(t / "sw"), "--sweep", "rnak=1,2"],
         "did you mean 'rank'"),
    Case("sweep-bad-value", "sweep: a value of the wrong type",
         lambda t, m: ["sweep", "--model", str(m.llama), "--data", str(m.data), "--out", str(t / "sw"), "--rank", "a,b"],
         "--rank expects int"),
    Case("report-no-results", "report: a folder without results.json",
         lambda t, m: ["report", "--run-dir", str(t)], "holds no results.json"),
    Case("report-damaged-results", "report: a damaged results.json",
         lambda t, m: ["report", "--run-dir", str(write(t, "cmp/results.json", "[]").parent)],
         "results.json is damaged (it lacks kind, rows)"),
    Case("harness-unknown-task", "harness: an unknown task",
         lambda t, m: harness_args(m, "mmlu_cooking"), "unknown"),
    Case("harness-task-file-suffix", "harness: a task file that is neither YAML nor JSON",
         lambda t, m: harness_args(m, str(write(t, "task.txt", "x"))), "must end in .yaml/.yml"),
    Case("harness-bigbench-no-examples", 'harness: a BIG-bench .json without "examples"',
         lambda t, m: harness_args(m, str(write(t, "task.json", "{}"))), 'expected {"examples"'),
    Case("forgetting-suite-missing", "forgetting: the suite file does not exist",
         lambda t, m: forgetting_args(m, t, "--suite", str(t / "suite.yaml")), "suite not found"),
    Case("forgetting-suite-bad-split", "forgetting: a suite task with an unknown split",
         lambda t, m: forgetting_args(m, t, "--suite", str(write(t, "suite.yaml", f"suite:\n  - {{name: a, data: {m.data}, split: dev}}\n"))),
         "split must be one of"),
    Case("forgetting-tuned-and-adapter", "forgetting: both --tuned and --adapter",
         lambda t, m: forgetting_args(m, t, "--tuned", str(m.llama)), "one of them"),
    Case("train-parallel-without-torchrun", "train: --parallel without torchrun",
         lambda t, m: train_args(m, t, "--parallel", "fsdp"), "torchrun --nproc_per_node=N"),
    Case("train-sharded-without-fsdp", "train: --sharded-checkpoints without --parallel fsdp",
         lambda t, m: train_args(m, t, "--sharded-checkpoints"), "--sharded-checkpoints writes FSDP's shards"),
    Case("serve-adapter-not-name-dir", "serve: --adapter without NAME=",
         lambda t, m: ["serve", "--model", str(m.llama), "--adapter", str(m.adapter)], "is not NAME=DIR"),
    Case("serve-adapter-missing", "serve: the adapter folder does not exist",
         lambda t, m: ["serve", "--model", str(m.llama), "--adapter", f"a={t / 'no'}"], "does not exist"),
    Case("serve-port-out-of-range", "serve: --port above 65535",
         lambda t, m: ["serve", "--model", str(m.llama), "--port", "70000"], "--port must be at most 65535"),
    Case("merge-adapters-no-adapter", "merge-adapters: no --adapter",
         lambda t, m: merge_adapters_args(m, t, adapters=()), "give the adapters to combine"),
    Case("merge-adapters-unknown-combination", "merge-adapters: an unknown --combination",
         lambda t, m: merge_adapters_args(m, t, "--combination", "average"), "invalid choice: 'average'"),
    Case("merge-adapters-weights-count", "merge-adapters: --weights does not give one weight per adapter",
         lambda t, m: merge_adapters_args(m, t, "--weights", "0.5"), "give one per --adapter"),
    Case("merge-adapters-density-missing", "merge-adapters: ties without --density",
         lambda t, m: merge_adapters_args(m, t, "--combination", "ties"), "needs --density"),
    Case("merge-adapters-density-range", "merge-adapters: --density outside (0, 1]",
         lambda t, m: merge_adapters_args(m, t, "--combination", "dare_ties", "--density", "1.5"),
         "--density must be in (0, 1], got 1.5"),
    Case("merge-adapters-density-unused", "merge-adapters: --density with --combination svd",
         lambda t, m: merge_adapters_args(m, t, "--density", "0.5"), "--density is used by ties, dare_linear and dare_ties only"),
    Case("merge-adapters-name-twice", "merge-adapters: two adapters with the same NAME",
         lambda t, m: ["merge-adapters", "--model", str(m.llama), "--adapter", f"a={m.adapter}", "--adapter", f"a={m.adapter}",
                       "--out", str(t / "merged")], "names 'a' twice"),
    Case("merge-adapters-ranks-differ", "merge-adapters: linear on adapters of different ranks",
         lambda t, m: merge_adapters_args(m, t, "--combination", "linear", adapters=(m.adapter, lora_of_rank(t, m, 2))),
         "needs adapters of equal rank"),
    Case("merge-adapters-dora", "merge-adapters: a DoRA adapter",
         lambda t, m: merge_adapters_args(m, t, adapters=(m.adapter, adapter_copy(t, m, edit_adapter_config(use_dora=True)))),
         "is a DoRA adapter"),
    Case("merge-adapters-not-lora", "merge-adapters: an adapter that is not LoRA",
         lambda t, m: merge_adapters_args(m, t, adapters=(m.adapter, adapter_copy(t, m, edit_adapter_config(peft_type="IA3")))),
         "combines LoRA adapters only"),
    Case("merge-adapters-other-model", "merge-adapters: adapters of another base model",
         lambda t, m: merge_adapters_args(m, t, model=m.t5), "pass the --model the adapters were trained on"),
    Case("merge-adapters-out-holds-adapter", "merge-adapters: --out holds an input adapter",
         lambda t, m: merge_adapters_args(m, t, "--overwrite", out=m.adapter.parent),
         "would replace the folder holding the --adapter input"),
]


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def models(tiny_llama_dir, tiny_t5_dir, tmp_path_factory) -> Models:
    from peftlab.models import load_model
    from peftlab.peft import LoraConfig, apply_lora, save_adapter

    folder = tmp_path_factory.mktemp("bad-inputs")
    config = LoraConfig(rank=4)
    adapter = save_adapter(apply_lora(load_model(str(tiny_llama_dir)).model, config), folder / "run" / "final", config,
                           base_model_name_or_path=str(tiny_llama_dir))
    return Models(tiny_llama_dir, tiny_t5_dir, adapter, write_dialogues(folder / "d.jsonl", n=20))


def expect_one_line(args: list[str], capsys) -> str:
    """``expect_error``, also for argparse's own errors (``--dtype fp8``), which exit through SystemExit(2)."""
    try:
        return expect_error(args, capsys)
    except SystemExit as exit:
        err = capsys.readouterr().err.strip()
        assert exit.code == 2 and len(err.splitlines()) == 1 and "error:" in err and "Traceback" not in err, err
        return err


def snapshot(*folders: Path) -> dict[Path, tuple[bytes, int]]:
    """Every file under ``folders``: its bytes and modification time."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- the cases


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_ends_in_one_line(case: Case, models: Models, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))  # a GGUF conversion would write here
    work = tmp_path / "case"
    work.mkdir()
    args = case.setup(work, models)
    watched = (tmp_path, models.llama, models.t5, models.adapter.parent.parent)
    before = snapshot(*watched)
    message = expect_one_line(args, capsys)
    assert case.expected in message, message
    assert snapshot(*watched) == before, "a failed command changed or left files"


# ---------------------------------------------------------------------------------------------- the README


def readme_rows() -> dict[str, str]:
    """``problem -> message`` of the README's catalogue table."""
    text = README.read_text(encoding="utf-8")
    assert SECTION in text, f"README.md has no section '{SECTION}'"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) == 2 and cells[0] not in ("problem", "") and not set(cells[0]) <= set("-: "):
            assert cells[0] not in rows, f"the README lists '{cells[0]}' twice"
            rows[cells[0].replace("\\|", "|")] = cells[1].replace("\\|", "|")
    return rows


def test_readme_catalogue_matches_the_cases():
    rows = readme_rows()
    problems = [c.problem for c in CASES]
    assert len(set(problems)) == len(problems), "two cases share a problem text"
    assert len({c.id for c in CASES}) == len(CASES), "two cases share an id"
    assert sorted(set(rows) - set(problems)) == [], "README rows without a test case"
    assert sorted(set(problems) - set(rows)) == [], "test cases without a README row"
    for case in CASES:
        assert case.expected in rows[case.problem], f"the README message of '{case.problem}' lacks '{case.expected}'"
    assert len(rows) >= 40


# ---------------------------------------------------------------------------------------------- --help


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_of_every_command(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: peftlab {command}") and "--" in out
