"""Selective fine-tuning: train a chosen subset of the model's own weights, freeze the rest.

Nothing is added to the model; the method only decides which existing tensors train:

- ``bitfit``: every bias (Ben Zaken et al. 2022, "BitFit", https://arxiv.org/abs/2106.10199).
  Many recent models (Llama, T5) have no biases at all, and then BitFit has nothing to train.
- ``layernorm``: the weights (and biases) of every normalisation layer: LayerNorm, RMSNorm,
  T5LayerNorm (tuning only these is a strong baseline: Zhao et al. 2023, https://arxiv.org/abs/2312.11420).
- ``selective``: every parameter of the modules matching ``train_modules`` (names, dotted suffixes
  or ``re:`` regexes, as LoRA's targets) and/or inside the transformer blocks of ``train_layers``
  (``"10-11"``: the last two blocks of a 12-block model).

``train_layers`` also restricts ``bitfit`` and ``layernorm`` to those blocks.

The selection is recorded by a parameter-less marker module (``model.selective_tuning``) whose
``adapter_params()`` returns the chosen tensors by their model path, so freezing, the parameter
report and the adapter-only state dict work as for any adapter. The file (peftlab's own format,
peft_type ``"SELECTIVE"``, peft folder layout) holds those tensors under their model path
(``base_model.model.model.layers.0.input_layernorm.weight``); adapter_config.json holds
``selective_method``, ``train_modules`` and ``train_layers``. Loading selects the same tensors in
a fresh base model and overwrites them.

    model = apply_selective(model, SelectiveConfig(method="selective", train_layers="10-11"))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from peftlab.errors import UserError
from peftlab.peft.core import ALL_LINEAR, freeze_all_but_adapters, layer_index, parse_layers, select_modules, split_patterns
from peftlab.peft.formats import PEFT_PREFIX, AdapterFormat, register_format

SELECTIVE_METHODS = ("bitfit", "layernorm", "selective")
MODULE_NAME = "selective_tuning"


@dataclass
class SelectiveConfig:
    """Which of the model's own weights train."""

    method: str = "selective"
    """bitfit (biases), layernorm (normalisation weights) or selective (train_modules / train_layers)."""
    train_modules: str | Sequence[str] | None = None
    """selective: modules whose parameters train: names or suffixes (``q_proj``), ``re:<regex>``, ``all-linear``,
    a list of these or a comma-separated string."""
    train_layers: str | Sequence[int] | None = None
    """Only parameters inside these transformer blocks, e.g. ``"10-11"``; None = all blocks (and outside them)."""

    def __post_init__(self) -> None:
        self.train_modules = split_patterns(self.train_modules)
        if self.method not in SELECTIVE_METHODS:
            raise UserError(f"selective method must be one of {', '.join(SELECTIVE_METHODS)}, not {self.method!r}")
        if self.method == "selective" and self.train_modules is None and self.train_layers is None:
            raise UserError("--method selective needs --train-modules (e.g. q_proj,v_proj) and/or --train-layers (e.g. 10-11)")
        if self.method != "selective" and self.train_modules is not None:
            raise UserError(f"--train-modules is for --method selective; {self.method} chooses its own tensors")
        parse_layers(self.train_layers)  # raises on a malformed spec


class SelectedParameters(nn.Module):
    """A parameter-less marker: names the model's own parameters that train (``adapter_params``)."""

    def __init__(self, model: nn.Module, paths: list[str]) -> None:
        super().__init__()
        self.paths = paths
        object.__setattr__(self, "_root", model)  # a plain reference: not a submodule (no cycle in the module tree)

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {path: self._root.get_parameter(path) for path in self.paths}

    def extra_repr(self) -> str:
        return f"{len(self.paths)} tensors"


def _is_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or name.endswith(("LayerNorm", "RMSNorm", "Norm"))


def selected_parameters(model: nn.Module, config: SelectiveConfig) -> list[str]:
    """Paths (``model.named_parameters()`` names) of the parameters ``config`` trains, in model order."""
    named = dict(model.named_parameters())  # tied weights once, under their first name
    if config.method == "bitfit":
        paths = [p for p in named if p.rsplit(".", 1)[-1] == "bias"]
        if not paths:
            raise UserError(f"{type(model).__name__} has no bias parameters, so BitFit has nothing to train: "
                            "use --method layernorm, ia3 or lora instead")
    elif config.method == "layernorm":
        owners = [m for m in model.modules() if _is_norm(m)]
        ids = {id(p) for m in owners for p in m.parameters(recurse=False)}
        paths = [p for p, t in named.items() if id(t) in ids]
        if not paths:
            raise UserError(f"{type(model).__name__} has no normalisation layers with weights to train")
    elif config.train_modules is not None:
        patterns = config.train_modules
        modules = [  # all-linear means nn.Linear layers; names and regexes may select any module
            path
            for kind, group in ((nn.Linear, [p for p in patterns if p == ALL_LINEAR]),
                                (nn.Module, [p for p in patterns if p != ALL_LINEAR]))
            if group
            for path in select_modules(model, group, layers=config.train_layers, module_type=kind)
        ]
        ids = {id(p) for path in modules for p in model.get_submodule(path).parameters()}
        paths = [p for p, t in named.items() if id(t) in ids]
    else:
        paths = list(named)
    keep = parse_layers(config.train_layers)
    if keep is not None:
        paths = [p for p in paths if layer_index(p) in keep]
    if not paths:
        raise UserError(f"{config.method} with train_layers={config.train_layers!r} selects no parameter of "
                        f"{type(model).__name__}: check the block indices (from 0)")
    return paths


def apply_selective(model: nn.Module, config: SelectiveConfig) -> nn.Module:
    """Mark the parameters ``config`` selects as the trainable ones and freeze the rest; in place."""
    if isinstance(getattr(model, MODULE_NAME, None), SelectedParameters):
        raise UserError("the model already has a selective-tuning selection: load the base model again")
    model.add_module(MODULE_NAME, SelectedParameters(model, selected_parameters(model, config)))
    freeze_all_but_adapters(model)
    return model


# ---------------------------------------------------------------------------------------------
# peftlab's format (peft_type "SELECTIVE"): the trained tensors by their model path


def selective_config_to_json(config: SelectiveConfig, model: nn.Module) -> dict[str, Any]:
    layers = config.train_layers
    return {
        "selective_method": config.method,
        "train_modules": config.train_modules,
        "train_layers": layers if layers is None or isinstance(layers, (str, int)) else sorted(layers),
    }


def selective_config_from_json(data: dict[str, Any]) -> SelectiveConfig:
    return SelectiveConfig(method=data.get("selective_method", "selective"), train_modules=data.get("train_modules"),
                           train_layers=data.get("train_layers"))


_MARKER = MODULE_NAME + "."

register_format(
    "SELECTIVE",
    AdapterFormat(
        config_type=SelectiveConfig,
        config_from_json=selective_config_from_json,
        config_to_json=selective_config_to_json,
        apply=apply_selective,
        to_file_key=lambda key: PEFT_PREFIX + key.removeprefix(_MARKER),
        from_file_key=lambda key: _MARKER + key.removeprefix(PEFT_PREFIX),
    ),
)
