"""(IA)^3: learned vectors that rescale keys, values and the feed-forward activations.

(IA)^3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning", https://arxiv.org/abs/2205.05638, section 3.3) multiplies three activations
of every block element-wise by learned vectors::

    K' = l_k * K,   V' = l_v * V,   FFN(x) = W_2 (l_ff * act(W_1 x))

Each vector starts at ones, so training starts from the base model. On the ``nn.Linear`` layers of
an HF model (HF peft's formulation): a key or value projection scales its output, bias included,
and the feed-forward's output projection (Llama ``down_proj``, T5 ``wo``) scales its *input*::

    h = l * (W x + b)       l: (out,),  stored as ``ia3_l`` of shape (out, 1)
    h = W (l * x) + b       l: (in,),   stored as ``ia3_l`` of shape (1, in)     (feed-forward)

That is 2 * kv_dim + d_ff numbers per block: 2 * 192 + 1536 = 1,920 for a SmolLM2-135M block.
The vectors live in float32 (also on a bfloat16 base), as in peft.

    model = apply_ia3(model, IA3Config())   # Llama: k_proj, v_proj, down_proj; T5: k, v, wo
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftlab.errors import UserError
from peftlab.peft.core import (
    DTYPES,
    WrappedLinear,
    adapter_modules,
    dtype_named,
    freeze_all_but_adapters,
    get_module,
    matches,
    replace_module,
    select_modules,
    split_patterns,
)
from peftlab.peft.formats import AdapterFormat, paths_regex, patterns_from_json, register_format, target_names

# HF peft's defaults (``TRANSFORMERS_MODELS_TO_IA3_*_MAPPING``) for the architectures we test and their kin.
_LLAMA_LIKE = ("llama", "mistral", "smollm3", "olmo", "olmo2", "granite")
_QWEN_GEMMA = ("qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
DEFAULT_IA3_TARGETS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(_LLAMA_LIKE, ("k_proj", "v_proj", "down_proj")),
    **dict.fromkeys(_QWEN_GEMMA, ("q_proj", "v_proj", "down_proj")),
    "t5": ("k", "v", "wo"),
    "mt5": ("k", "v", "wi_1"),
    "phi": ("q_proj", "v_proj", "fc2"),
    "opt": ("q_proj", "k_proj", "fc2"),
    "bart": ("q_proj", "v_proj", "fc2"),
}
DEFAULT_IA3_FEEDFORWARD: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(_LLAMA_LIKE + _QWEN_GEMMA, ("down_proj",)),
    "t5": ("wo",),
    "mt5": (),
    "phi": ("fc2",),
    "opt": ("fc2",),
    "bart": ("fc2",),
}


@dataclass
class IA3Config:
    """Where to put (IA)^3 scaling vectors."""

    targets: str | Sequence[str] | None = None
    """Layers to rescale: names or suffixes, ``re:<regex>``, ``all-linear``, a list of these or a comma-separated
    string; None: the architecture's default."""
    feedforward: str | Sequence[str] | None = None
    """Which of the targets are feed-forward output layers (their input is scaled); None: the architecture's default."""
    exclude: str | Sequence[str] = ()
    """Patterns removed from the targets."""
    adapter_dtype: str = "float32"
    """dtype of the vectors."""

    def __post_init__(self) -> None:
        dtype_named(self.adapter_dtype)  # raises on an unknown name
        self.targets = split_patterns(self.targets)
        self.feedforward = split_patterns(self.feedforward)
        self.exclude = split_patterns(self.exclude)


class IA3Linear(WrappedLinear):
    """An ``nn.Linear`` (frozen, as ``base_layer``) whose output (or, feed-forward, input) is rescaled by ``ia3_l``."""

    def __init__(self, base_layer: nn.Linear, feedforward: bool, adapter_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.feedforward = feedforward
        shape = (1, base_layer.in_features) if feedforward else (base_layer.out_features, 1)  # peft's shapes
        self.ia3_l = nn.Parameter(torch.ones(shape, dtype=adapter_dtype, device=base_layer.weight.device))

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"ia3_l": self.ia3_l}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.ia3_l.flatten()  # (in,) or (out,)
        if self.feedforward:
            return self.base_layer((x.to(scale.dtype) * scale).to(x.dtype))  # W (l * x) + b
        result = self.base_layer(x)  # (..., out)
        return (result * scale).to(result.dtype)  # l * (W x + b)

    def extra_repr(self) -> str:
        return f"feedforward={self.feedforward}"


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def apply_ia3(model: nn.Module, config: IA3Config, strict: bool = True) -> nn.Module:
    """Wrap the selected ``nn.Linear`` layers in :class:`IA3Linear` and freeze the rest; in place.

    ``strict=False`` accepts targets that match nothing as long as one does (peft's rule for adapter files).
    """
    model_type = _model_type(model)
    targets = config.targets
    if targets is None:
        if model_type not in DEFAULT_IA3_TARGETS:
            raise UserError(f"no default (IA)^3 targets for model type {model_type!r}: pass --targets (e.g. k_proj,v_proj,down_proj)")
        targets = DEFAULT_IA3_TARGETS[model_type]
    feedforward = config.feedforward
    if feedforward is None:
        feedforward = DEFAULT_IA3_FEEDFORWARD.get(model_type, ())
    paths = select_modules(model, targets, config.exclude, strict=strict)
    dtype = DTYPES[config.adapter_dtype]
    for path in paths:
        is_ff = any(matches(p, path) for p in feedforward)
        base = get_module(model, path)
        replace_module(model, path, IA3Linear(base, is_ff, dtype).train(base.training))
    freeze_all_but_adapters(model)
    return model


def ia3_layers(model: nn.Module) -> dict[str, IA3Linear]:
    return {p: m for p, m in adapter_modules(model).items() if isinstance(m, IA3Linear)}


@torch.no_grad()
def merge_ia3_and_unload(model: nn.Module) -> nn.Module:
    """Fold every (IA)^3 vector into its layer's weight and put the plain ``nn.Linear`` back (peft's IA3 merge).

    Output scaling ``l * (W x + b)`` becomes ``W' = l[:, None] * W``, ``b' = l * b``; input scaling
    (feed-forward) ``W (l * x) + b`` becomes ``W' = W * l[None, :]`` with the bias unchanged.
    """
    layers = ia3_layers(model)
    if not layers:
        raise UserError("the model has no (IA)^3 layers to merge: load an adapter first")
    for path, layer in layers.items():
        base = layer.base_layer
        scale = layer.ia3_l.to(torch.float32)  # (1, in) or (out, 1): broadcasts over W (out, in) as peft's
        base.weight.data = (base.weight.to(torch.float32) * scale).to(base.weight.dtype)
        if base.bias is not None and not layer.feedforward:
            base.bias.data = (base.bias.to(torch.float32) * scale.flatten()).to(base.bias.dtype)
        replace_module(model, path, base)
    return model


# ---------------------------------------------------------------------------------------------
# peft's format (peft_type "IA3"): ``base_model.model.<path>.ia3_l``


def _names_or_regex(model: nn.Module, paths: list[str]) -> list[str] | str:
    """peft's way to name a set of layers: their sorted names if those select exactly them, else a full-match regex."""
    return target_names(model, paths, IA3Linear) or paths_regex(paths)


def ia3_config_to_json(config: IA3Config, model: nn.Module) -> dict[str, Any]:
    layers = ia3_layers(model)
    feedforward = [p for p, m in layers.items() if m.feedforward]
    return {
        "target_modules": _names_or_regex(model, list(layers)),
        "feedforward_modules": _names_or_regex(model, feedforward) if feedforward else [],
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "init_ia3_weights": True,
        "modules_to_save": None,
    }


def ia3_config_from_json(data: dict[str, Any]) -> IA3Config:
    if data.get("fan_in_fan_out"):
        raise UserError("this (IA)^3 adapter uses fan_in_fan_out=True (Conv1D layers, GPT-2), which peftlab does not support")
    if data.get("modules_to_save"):
        raise UserError(f"this (IA)^3 adapter also trains modules_to_save={data['modules_to_save']!r}, "
                        "which peftlab does not support")
    return IA3Config(
        targets=patterns_from_json(data.get("target_modules")),
        feedforward=patterns_from_json(data.get("feedforward_modules")),  # None: the architecture's default, as peft
        exclude=patterns_from_json(data.get("exclude_modules")) or (),
    )


register_format(
    "IA3",
    AdapterFormat(
        config_type=IA3Config,
        config_from_json=ia3_config_from_json,
        config_to_json=ia3_config_to_json,
        apply=lambda model, config: apply_ia3(model, config, strict=False),
    ),
)
