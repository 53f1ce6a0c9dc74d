"""Bottleneck adapters: a small down-project / nonlinearity / up-project block with a residual.

Houlsby et al. 2019 ("Parameter-Efficient Transfer Learning for NLP", https://arxiv.org/abs/1902.00751)
insert after a sublayer's output projection, before the block's own residual connection::

    h = y + W_up act(W_down y + b_down) + b_up,      y = the sublayer's output (d,)
    W_down: (d/r, d), W_up: (d, d/r), r = reduction_factor

Placement ``houlsby``: after every attention sublayer (self- and, in T5's decoder, cross-attention)
and after every feed-forward sublayer; ``pfeiffer`` (Pfeiffer et al. 2021, AdapterFusion,
https://arxiv.org/abs/2005.00247): after the feed-forward sublayer only. On HF models the adapter
wraps the sublayer's output projection: Llama-style ``self_attn.o_proj`` and ``mlp.down_proj``,
T5 ``SelfAttention.o`` / ``EncDecAttention.o`` and ``DenseReluDense.wo``.

The up-projection starts at zero (weights and bias), so the adapted model starts exactly as the
base model (Houlsby's near-identity initialisation, made exact); the down-projection has the
``nn.Linear`` default initialisation. With d = 576 and r = 16 (SmolLM2-135M) one adapter has
2 * 576 * 36 + 36 + 576 = 42,084 parameters.

peftlab's own format: peft_type ``"BOTTLENECK"`` in the peft folder layout; adapter_config.json has
``reduction_factor``, ``placement``, ``activation``, ``adapter_dtype`` and ``target_modules`` (the exact
paths of the wrapped projections); tensors are ``base_model.model.<path>.adapter_down.weight`` (and
``.bias``, ``adapter_up.weight``, ``adapter_up.bias``).

    model = apply_bottleneck(model, BottleneckConfig(reduction_factor=16, placement="houlsby"))
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
    replace_module,
    select_modules,
    split_patterns,
)
from peftlab.peft.formats import AdapterFormat, register_format

PLACEMENTS = ("houlsby", "pfeiffer")
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}

# Output projections of the sublayers, by kind; the names of the common HF architectures.
ATTENTION_OUTPUTS = ("self_attn.o_proj", "SelfAttention.o", "EncDecAttention.o", "self_attn.out_proj",
                     "encoder_attn.out_proj", "self_attention.dense", "attention.dense")
FEEDFORWARD_OUTPUTS = ("mlp.down_proj", "DenseReluDense.wo", "mlp.dense_4h_to_h", "fc2")


@dataclass
class BottleneckConfig:
    """Where and how large bottleneck adapters are."""

    reduction_factor: int = 16
    """r: the adapter's hidden width is the sublayer's width // r."""
    placement: str = "houlsby"
    """houlsby: after the attention and the feed-forward sublayers; pfeiffer: after the feed-forward only."""
    activation: str = "relu"
    """The nonlinearity between the projections: relu, gelu, silu or tanh."""
    targets: str | Sequence[str] | None = None
    """Override the placement: the layers (names, suffixes, ``re:``; a list or a comma-separated string) whose
    outputs get an adapter."""
    adapter_dtype: str = "float32"
    """dtype of the adapter weights (float32 also on a bfloat16 base)."""

    def __post_init__(self) -> None:
        r = self.reduction_factor
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise UserError(f"reduction_factor must be a positive integer, got {r!r}: use e.g. --reduction-factor 16")
        if self.placement not in PLACEMENTS:
            raise UserError(f"adapter placement must be one of {', '.join(PLACEMENTS)}, not {self.placement!r}")
        if self.activation not in ACTIVATIONS:
            raise UserError(f"adapter activation must be one of {', '.join(ACTIVATIONS)}, not {self.activation!r}")
        dtype_named(self.adapter_dtype)  # raises on an unknown name
        self.targets = split_patterns(self.targets)


class BottleneckAdapter(WrappedLinear):
    """A sublayer's output projection (frozen, as ``base_layer``) followed by a residual bottleneck."""

    def __init__(self, base_layer: nn.Linear, hidden: int, activation: str = "relu",
                 adapter_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.base_layer = base_layer
        width = base_layer.out_features
        factory = {"device": base_layer.weight.device, "dtype": adapter_dtype}
        self.adapter_down = nn.Linear(width, hidden, **factory)
        self.act = ACTIVATIONS[activation]()
        self.adapter_up = nn.Linear(hidden, width, **factory)
        nn.init.zeros_(self.adapter_up.weight)  # identity at the start
        nn.init.zeros_(self.adapter_up.bias)

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {f"adapter_{part}.{name}": p for part in ("down", "up")
                for name, p in getattr(self, f"adapter_{part}").named_parameters()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)  # (..., d)
        z = y.to(self.adapter_down.weight.dtype)
        return y + self.adapter_up(self.act(self.adapter_down(z))).to(y.dtype)  # (..., d)

    def extra_repr(self) -> str:
        return f"hidden={self.adapter_down.out_features}"


def placement_targets(model: nn.Module, placement: str) -> list[str]:
    """The output projections after which ``placement`` puts adapters."""
    names = FEEDFORWARD_OUTPUTS if placement == "pfeiffer" else ATTENTION_OUTPUTS + FEEDFORWARD_OUTPUTS
    try:
        paths = select_modules(model, list(names), strict=False)
    except UserError:
        paths = []
    feedforward = [p for p in paths if any(p == n or p.endswith("." + n) for n in FEEDFORWARD_OUTPUTS)]
    if not feedforward or (placement == "houlsby" and len(feedforward) == len(paths)):
        raise UserError(
            f"cannot find the sublayer output projections of {type(model).__name__} for {placement} adapters: "
            "name them with targets (e.g. o_proj,down_proj)"
        )
    return paths


def apply_bottleneck(model: nn.Module, config: BottleneckConfig) -> nn.Module:
    """Wrap the selected output projections in :class:`BottleneckAdapter` and freeze the rest; in place."""
    paths = placement_targets(model, config.placement) if config.targets is None else select_modules(model, config.targets)
    for path in paths:  # check every layer before changing any
        width = get_module(model, path).out_features
        if width // config.reduction_factor == 0:
            raise UserError(
                f"reduction factor {config.reduction_factor} leaves no hidden units for {path} (width {width}): "
                f"use --reduction-factor {width} or less"
            )
    for path in paths:
        base = get_module(model, path)
        layer = BottleneckAdapter(base, base.out_features // config.reduction_factor, config.activation,
                                  DTYPES[config.adapter_dtype])
        replace_module(model, path, layer.train(base.training))
    freeze_all_but_adapters(model)
    return model


def bottleneck_layers(model: nn.Module) -> dict[str, BottleneckAdapter]:
    return {p: m for p, m in adapter_modules(model).items() if isinstance(m, BottleneckAdapter)}


# ---------------------------------------------------------------------------------------------
# peftlab's format (peft_type "BOTTLENECK")


def bottleneck_config_to_json(config: BottleneckConfig, model: nn.Module) -> dict[str, Any]:
    return {
        "reduction_factor": config.reduction_factor,
        "placement": config.placement,
        "activation": config.activation,
        "adapter_dtype": config.adapter_dtype,
        "target_modules": list(bottleneck_layers(model)),  # exact paths, so loading wraps the same layers
    }


def bottleneck_config_from_json(data: dict[str, Any]) -> BottleneckConfig:
    return BottleneckConfig(
        reduction_factor=data.get("reduction_factor", 16),
        placement=data.get("placement", "houlsby"),
        activation=data.get("activation", "relu"),
        targets=data.get("target_modules"),
        adapter_dtype=data.get("adapter_dtype", "float32"),
    )


register_format(
    "BOTTLENECK",
    AdapterFormat(
        config_type=BottleneckConfig,
        config_from_json=bottleneck_config_from_json,
        config_to_json=bottleneck_config_to_json,
        apply=apply_bottleneck,
    ),
)
