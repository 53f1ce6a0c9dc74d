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


METHODS: dict[str, Method] = {"full": Method("full", _prepare_full, _save_full)}


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
