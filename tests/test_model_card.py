"""Model cards: the README.md of a real tiny run's final/, read back with yaml and huggingface_hub's
ModelCard; the numbers in it are the run's own (run.json)."""

from __future__ import annotations

import json
import shlex

import pytest
import yaml
from helpers import write_dialogues

from peftlab import api
from peftlab.config import TrainConfig
from peftlab.model_card import (
    NOT_YET,
    model_card,
    train_command,
    update_model_card_results,
    write_model_card,
)

SECTIONS = ["## Method", "## Trainable parameters", "## Hyperparameters", "## Training data", "## Training results",
            "## Evaluation results", "## How it was made"]


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, tmp_path_factory):
    """Two finished 2-step runs of the tiny Llama: LoRA (a peft-format adapter) and a bottleneck adapter (ours)."""
    folder = tmp_path_factory.mktemp("card-runs")
    data = write_dialogues(folder / "dialogues.jsonl")
    out = {}
    for method in ("lora", "adapter"):
        api.train(TrainConfig(model=str(tiny_llama_dir), data=str(data), out=str(folder / method), method=method,
                              max_steps=2, batch_size=4, seed=1))
        out[method] = folder / method
    return out


def header(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def section(text: str, title: str) -> str:
    return text.split(title, 1)[1].split("\n## ", 1)[0]


def test_card_of_a_real_run_has_the_header_the_hub_reads(runs, tiny_llama_dir, tmp_path):
    from huggingface_hub import ModelCard

    for method, library, tags in (("lora", "peft", {"peftlab", "lora", "peft", "text-generation"}),
                                  ("adapter", "peftlab", {"peftlab", "adapter", "text-generation"})):
        info = json.loads((runs[method] / "run.json").read_text())
        (tmp_path / method).mkdir()  # not the run's own final/: the last test checks that training writes one
        path = write_model_card(tmp_path / method, info, command=None)
        text = path.read_text()
        print(f"\n{text}") if method == "lora" else None
        data = header(text)
        assert data["base_model"] == str(tiny_llama_dir)
        assert data["library_name"] == library and set(data["tags"]) == tags
        assert data["datasets"] == ["dialogues.jsonl"] and data["pipeline_tag"] == "text-generation"
        card = ModelCard(text).data
        assert (card.base_model, card.library_name, card.pipeline_tag) == (str(tiny_llama_dir), library, "text-generation")
        assert [t for t in SECTIONS if t in text] == SECTIONS
        assert [p.name for p in (tmp_path / method).iterdir()] == ["README.md"], "the card is written atomically"


def test_card_sections_hold_the_runs_numbers(runs):
    info = json.loads((runs["lora"] / "run.json").read_text())
    text = model_card(info, command="peftlab train --model M --data d.jsonl --method lora --out r")
    result = info["result"]
    assert result["steps"] == 2
    training = section(text, "## Training results")
    assert "| optimizer steps | 2 |" in training
    assert f"| final train loss | {result['train_loss']:.4f} |" in training
    assert f"| validation loss | {result['eval_loss']:.4f} |" in training
    assert info["parameters"]["line"] in section(text, "## Trainable parameters")
    assert info["parameters"]["line"].startswith("trainable params: ")
    hyper = section(text, "## Hyperparameters")
    assert "| rank | 8 |" in hyper and "| lr | 0.001 (the method's default) |" in hyper and "| max_steps | 2 |" in hyper
    assert "reduction_factor" not in hyper, "another method's options are left out"
    d = info["data"]
    assert f"| train / validation / test examples | {d['train']} / {d['validation']} / {d['test']} |" in section(text, "## Training data")
    assert "| family | reparameterisation |" in section(text, "## Method")
    assert section(text, "## Evaluation results").strip() == NOT_YET
    assert "peftlab train --model M --data d.jsonl --method lora --out r" in section(text, "## How it was made")
    assert "| reduction_factor | 16 |" in model_card(json.loads((runs["adapter"] / "run.json").read_text()))


def test_without_argv_the_card_gives_the_equivalent_train_command(runs, tiny_llama_dir):
    info = json.loads((runs["lora"] / "run.json").read_text())
    words = shlex.split(train_command(info["config"]))
    assert words[:2] == ["peftlab", "train"]
    options = dict(zip(words[2::2], words[3::2]))
    assert options == {"--model": str(tiny_llama_dir), "--data": info["config"]["data"], "--method": "lora",
                       "--max-steps": "2", "--batch-size": "4", "--seed": "1", "--out": str(runs["lora"])}
    assert train_command(info["config"]) in model_card(info)


def test_hub_datasets_are_named_in_the_header(runs):
    info = json.loads((runs["lora"] / "run.json").read_text())
    info["config"] = {**info["config"], "data": "hf:knkarthick/dialogsum:default@train"}
    assert header(model_card(info))["datasets"] == ["knkarthick/dialogsum"]
    info["config"] = {**info["config"], "data": None, "task": ["sum=hf:knkarthick/dialogsum", "qa=/x/qa.jsonl"]}
    assert header(model_card(info))["datasets"] == ["knkarthick/dialogsum", "qa.jsonl"]


def test_evaluation_results_replace_the_section(runs, tmp_path):
    from huggingface_hub import ModelCard

    info = json.loads((runs["lora"] / "run.json").read_text())
    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    (tmp_path / "run" / "run.json").write_text(json.dumps(info))
    path = update_model_card_results(final, {"rouge1": 0.25, "bleu": 3.5})  # no card yet: written from run.json
    first = path.read_text()
    assert "| rouge1 | 0.2500 |" in section(first, "## Evaluation results") and NOT_YET not in first
    update_model_card_results(final, {"rouge1": 0.5})
    text = path.read_text()
    assert "| rouge1 | 0.5000 |" in text and "0.2500" not in text and "bleu" not in text
    assert [t for t in SECTIONS if t in text] == SECTIONS
    assert text.replace(section(text, "## Evaluation results"), "") == first.replace(section(first, "## Evaluation results"), "")
    assert ModelCard(text).data.library_name == "peft"
    assert update_model_card_results(tmp_path / "nowhere" / "final", {"rouge1": 1.0}) is None


def test_training_writes_the_card_into_final(runs):
    assert (runs["adapter"] / "final" / "README.md").is_file()
