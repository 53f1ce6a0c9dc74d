"""Fine-tuning methods as the training loop sees them.

A method decides which parameters train (``prepare``) and what ``final/`` holds
(``save_final``). ``full`` trains every weight and saves an HF model folder; the PEFT methods
inject adapters and save a peft-format adapter folder. The loop never branches on the method.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from peftlab.errors import UserError
from peftlab.peft import LoraConfig, apply_lora, save_adapter
from peftlab.peft.core import ParameterReport, parameter_report  # noqa: F401  (re-exported for the loop)


@dataclass(frozen=True)
class Method:
    name: str
    prepare: Callable  # (model, TrainConfig) -> model with only the method's parameters trainable
    save_final: Callable  # (model, tokenizer, folder, LoadedModel, TrainConfig) -> None


def _prepare_full(model, config):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _save_full(model, tokenizer, folder: Path, loaded, config) -> None:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _patterns(text: str | None) -> str | list[str] | None:
    """``q_proj,v_proj`` -> a list; ``all-linear`` and ``re:REGEX`` stay one pattern."""
    if text is None:
        return None
    if text.startswith("re:") or text == "all-linear":
        return text
    return [part.strip() for part in text.split(",") if part.strip()]


def lora_config(config) -> LoraConfig:
    return LoraConfig(rank=config.rank, alpha=config.alpha, dropout=config.dropout, targets=_patterns(config.targets),
                      exclude=_patterns(config.exclude) or (), layers=config.layers, rslora=config.rslora,
                      dora=config.method == "dora")


def _prepare_lora(model, config):
    return apply_lora(model, lora_config(config))


def _save_adapter(model, tokenizer, folder: Path, loaded, config) -> None:
    save_adapter(model, folder, lora_config(config), base_model_name_or_path=loaded.name)


METHODS: dict[str, Method] = {
    "full": Method("full", _prepare_full, _save_full),
    "lora": Method("lora", _prepare_lora, _save_adapter),
    "dora": Method("dora", _prepare_lora, _save_adapter),
}


def get(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f"unknown method '{name}'; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The trainable weights by parameter name: what a checkpoint must hold to resume."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, weights: dict[str, torch.Tensor]) -> None:
    expected = set(trainable_state(model))
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise UserError(f"checkpoint does not fit this run's model (missing {missing[:3]}, unexpected {extra[:3]}); start a new run")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)


def report_dict(report: ParameterReport) -> dict:
    return {"trainable": report.trainable, "total": report.total, "percent": report.percent, "line": str(report)}
