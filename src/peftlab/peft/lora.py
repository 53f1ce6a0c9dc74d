"""LoRA, rsLoRA and DoRA on the ``nn.Linear`` layers of an HF model.

LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) freezes a pretrained weight W (out x in)
and learns a low-rank update::

    h = W x + b + s * B A dropout(x)        A: (r, in), B: (out, r), s = alpha / r

A is initialised Kaiming-uniform with a = sqrt(5) (the ``nn.Linear`` default, as in the LoRA
reference code ``loralib`` and HF peft) and B with zeros, so training starts from the base model.
A 512 x 64 weight with r = 8 trains 8*64 + 512*8 = 4,608 numbers instead of 32,768 (86% fewer).

rsLoRA (Kalajdzievski 2023, https://arxiv.org/abs/2312.03732) uses s = alpha / sqrt(r), which keeps
the update's scale stable as r grows.

DoRA (Liu et al. 2024, https://arxiv.org/abs/2402.09353) splits the adapted weight into a learned
per-output-row magnitude m and a direction::

    W' = m * (W + s B A) / ||W + s B A||_row,     m initialised to ||W||_row (so W' = W at init)

The row norm is treated as a constant (detached, paper section 4.3). As in peft, the output is
computed from the base layer's result instead of materialising W'::

    h = W x + b + (m / n - 1) * W x' + (m / n) * s * B A x',   n = ||W + s B A||_row (detached)

where x' = dropout(x); without dropout (or in eval mode) x' = x and W x is reused from the base call.

Adapter weights live in ``adapter_dtype`` (float32 by default, even on a bfloat16 base): the input
is cast to it and the sum is cast back to the base layer's output dtype.

    model = apply_lora(model, LoraConfig(rank=8, alpha=16, targets=["q_proj", "v_proj"]))
    ... train ...
    model = merge_and_unload(model)   # plain nn.Linear layers holding W'
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.errors import UserError
from peftlab.peft.core import (
    WrappedLinear,
    adapter_modules,
    freeze_all_but_adapters,
    get_module,
    parse_layers,
    replace_module,
    select_modules,
)
from peftlab.peft.nf4 import NF4Linear

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass
class LoraConfig:
    """How to add LoRA (or rsLoRA / DoRA) adapters to a model."""

    rank: int = 8
    """r, the rank of the update B A."""
    alpha: float = 16
    """The update is scaled by alpha / r (alpha / sqrt(r) with ``rslora``)."""
    dropout: float = 0.0
    """Dropout probability on the adapter's input (the base path sees the raw input)."""
    targets: str | Sequence[str] | None = None
    """What to adapt: names or suffixes (``q_proj``), ``re:<regex>``, ``all-linear``; None: the model type's default."""
    exclude: str | Sequence[str] = ()
    """Patterns removed from the selection (same syntax as ``targets``)."""
    layers: str | Sequence[int] | None = None
    """Only adapt layers inside these transformer blocks, e.g. ``"0-3,6"``; None = all blocks."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""
    dora: bool = False
    """Weight-decomposed LoRA: learn a per-row magnitude on top of the low-rank direction update."""
    adapter_dtype: str = "float32"
    """dtype of the adapter weights: float32 (default, also on a bfloat16 base), bfloat16, float16 or float64."""

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise UserError(f"LoRA rank must be a positive integer, got {self.rank!r}: use e.g. --rank 8")
        if not self.alpha > 0:
            raise UserError(f"LoRA alpha must be positive, got {self.alpha!r}: use e.g. --alpha 16 (twice the rank)")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if self.adapter_dtype not in DTYPES:
            raise UserError(f"adapter_dtype {self.adapter_dtype!r} is not one of {', '.join(DTYPES)}")
        parse_layers(self.layers)  # raises on a malformed spec

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.rank) if self.rslora else self.alpha / self.rank


class LoraLinear(WrappedLinear):
    """An ``nn.Linear`` (kept frozen as ``base_layer``) plus a LoRA / rsLoRA / DoRA update.

    Parameter names follow HF peft's (less the adapter name): ``lora_A.weight``, ``lora_B.weight``
    and, for DoRA, ``lora_magnitude_vector``.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        dora: bool = False,
        adapter_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.rank, self.alpha, self.rslora, self.dora = rank, alpha, rslora, dora
        self.scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        factory = {"device": base_layer.weight.device, "dtype": adapter_dtype}
        self.lora_A = nn.Linear(base_layer.in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, base_layer.out_features, bias=False, **factory)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if dora:
            with torch.no_grad():
                magnitude = self._row_norm(self.delta_weight())  # (out,) = ||W||_row since B = 0
            self.lora_magnitude_vector = nn.Parameter(magnitude)
        self.merged = False
        self.register_buffer("_merge_norm", None, persistent=False)  # DoRA: n at merge time, for unmerge

    def adapter_params(self) -> dict[str, nn.Parameter]:
        params = {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}
        if self.dora:
            params["lora_magnitude_vector"] = self.lora_magnitude_vector
        return params

    def delta_weight(self) -> torch.Tensor:
        """s * B A, the LoRA update of W: (out, in) in the adapter dtype."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def _row_norm(self, delta: torch.Tensor) -> torch.Tensor:
        """||W + delta||_row: (out,), computed in delta's dtype."""
        return torch.linalg.norm(self.base_layer.weight.to(delta.dtype) + delta, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)  # (..., out) = W x + b, in the base dtype
        if self.merged:
            return result
        x = x.to(self.lora_A.weight.dtype)
        if not self.dora:
            return (result + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling).to(result.dtype)

        weight = self.base_layer.weight.to(x.dtype)  # (out, in)
        with torch.no_grad():  # n is a constant for autograd (DoRA paper, section 4.3)
            norm = torch.linalg.norm(weight + self.scaling * (self.lora_B.weight @ self.lora_A.weight), dim=1)  # (out,)
        mag_scale = self.lora_magnitude_vector / norm  # (out,), m / n
        if self.training and not isinstance(self.dropout, nn.Identity):
            x = self.dropout(x)
            base = F.linear(x, weight)  # (..., out) = W x', no bias
        else:
            bias = self.base_layer.bias
            base = result if bias is None else result - bias  # (..., out) = W x
        lora = self.lora_B(self.lora_A(x))  # (..., out) = B A x'
        dora = (mag_scale - 1) * base + mag_scale * lora * self.scaling
        return (result + dora).to(result.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into ``base_layer.weight`` (W <- W + s B A, or W' for DoRA); forward is unchanged."""
        if self.merged:
            return
        if isinstance(self.base_layer, NF4Linear):  # its weight is rebuilt on each access: nowhere to add to
            raise UserError(
                "cannot merge a LoRA adapter into a 4-bit NF4 layer: dequantise the model first "
                "(peftlab.peft.qlora.dequantize_model(model)), then merge"
            )
        weight = self.base_layer.weight
        delta = self.delta_weight()
        if self.dora:
            self._merge_norm = self._row_norm(delta)
            factor = (self.lora_magnitude_vector / self._merge_norm).view(-1, 1)  # (out, 1)
            weight.data = (factor * (weight.to(delta.dtype) + delta)).to(weight.dtype)
        else:
            weight.data += delta.to(weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (exact up to floating-point error)."""
        if not self.merged:
            return
        weight = self.base_layer.weight
        delta = self.delta_weight()
        if self.dora:
            factor = (self.lora_magnitude_vector / self._merge_norm).view(-1, 1)  # (out, 1)
            weight.data = (weight.to(delta.dtype) / factor - delta).to(weight.dtype)
            self._merge_norm = None
        else:
            weight.data -= delta.to(weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        kind = "dora" if self.dora else "rslora" if self.rslora else "lora"
        return f"{kind}, rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:.4g}, merged={self.merged}"


def apply_lora(model: nn.Module, config: LoraConfig, strict: bool = True) -> nn.Module:
    """Wrap the selected ``nn.Linear`` layers of ``model`` in :class:`LoraLinear`, freeze the rest; in place.

    ``strict=False`` accepts targets that match nothing as long as one does (peft's rule for adapter files).
    """
    paths = select_modules(model, config.targets, config.exclude, config.layers, strict=strict)
    # check every layer before changing any; suggest the largest rank that fits them all
    sizes = {path: (get_module(model, path).out_features, get_module(model, path).in_features) for path in paths}
    path, (rows, cols) = min(sizes.items(), key=lambda item: min(item[1]))
    if config.rank > min(rows, cols):
        raise UserError(
            f"LoRA rank {config.rank} is larger than layer {path} allows: its weight is "
            f"{rows} x {cols}; use --rank {min(rows, cols)} or less"
        )
    for path in paths:
        base = get_module(model, path)
        layer = LoraLinear(
            base,
            rank=config.rank,
            alpha=config.alpha,
            dropout=config.dropout,
            rslora=config.rslora,
            dora=config.dora,
            adapter_dtype=DTYPES[config.adapter_dtype],
        )
        replace_module(model, path, layer.train(base.training))  # a model in eval mode stays in eval mode
    freeze_all_but_adapters(model)
    return model


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {p: m for p, m in adapter_modules(model).items() if isinstance(m, LoraLinear)}


def merge_adapters(model: nn.Module) -> nn.Module:
    """Merge every LoRA layer into its base weight (the wrappers stay; :func:`unmerge_adapters` undoes it)."""
    for layer in lora_layers(model).values():
        layer.merge()
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every LoRA layer and put its plain ``nn.Linear`` back: a model with no adapter code left."""
    layers = lora_layers(model)
    if not layers:
        raise UserError("the model has no LoRA layers to merge: load an adapter first")
    for path, layer in layers.items():
        layer.merge()
        replace_module(model, path, layer.base_layer)
    return model

