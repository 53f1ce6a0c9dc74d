"""LoRA, rsLoRA and DoRA on the ``nn.Linear`` layers of an HF model.

LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) freezes a pretrained weight W (out x in)
and learns a low-rank update::

    h = W x + b + s * B A dropout(x)        A: (r, in), B: (out, r), s = alpha / r

A 512 x 64 weight with r = 8 trains 8*64 + 512*8 = 4,608 numbers instead of 32,768 (86% fewer).

Initialisation (``init``, peft's ``init_lora_weights``):

- ``kaiming`` (default; peft's ``True``): A Kaiming-uniform with a = sqrt(5) (the ``nn.Linear``
  default, as in the LoRA reference code ``loralib``), B = 0: training starts from the base model.
- ``gaussian``: A ~ N(0, (1/r)^2), B = 0.
- ``pissa`` (Meng et al. 2024, https://arxiv.org/abs/2404.02948): A and B start on the r principal
  singular directions of W = U S V^T and the frozen weight becomes the residual::

      B0 = U_r sqrt(S_r / s),  A0 = sqrt(S_r / s) V_r^T,  W_res = W - s B0 A0

  so the model is unchanged at step 0 but the adapter trains the directions that matter most.
  ``pissa_niter_N`` finds U_r, S_r, V_r by N subspace iterations of randomized SVD (``torch.svd_lowrank``,
  Halko et al.): much faster on large matrices, random (seeded by the run).
- ``olora`` (Büyükakyüz 2024, https://arxiv.org/abs/2406.01775): from the QR factorisation W = Q R,
  B0 = Q[:, :r], A0 = R[:r], W_res = W - s B0 A0.

PiSSA and OLoRA change the frozen weight, so an adapter trained on W_res does not fit W. Saved, it is
converted as peft converts it (``path_initial_model_for_weight_conversion``): the trained update minus
the initial one is exactly a LoRA of rank 2r on the original W::

    s (B A - B0 A0) = s [B | -B0] [A ; A0],   r' = 2r, alpha' = 2 alpha (rsLoRA: sqrt(2) alpha)

so the adapter file applies to the unmodified base, in peftlab and in peft (twice the plain size).

rsLoRA (Kalajdzievski 2023, https://arxiv.org/abs/2312.03732) uses s = alpha / sqrt(r), which keeps
the update's scale stable as r grows.

DoRA (Liu et al. 2024, https://arxiv.org/abs/2402.09353) splits the adapted weight into a learned
per-output-row magnitude m and a direction::

    W' = m * (W + s B A) / ||W + s B A||_row,     m initialised to ||W||_row (so W' = W at init)

The row norm is treated as a constant (detached, paper section 4.3). As in peft, the output is
computed from the base layer's result instead of materialising W'::

    h = W x + b + (m / n - 1) * W x' + (m / n) * s * B A x',   n = ||W + s B A||_row (detached)

where x' = dropout(x); without dropout (or in eval mode) x' = x and W x is reused from the base call.

Training with dropout keeps, per LoRA layer, the dropout's mask as bytes (not the dropped-out input
x' and the float noise that autograd would keep: 8 bytes per input element and layer), and x' is
recomputed in the backward pass from x, which sibling layers (q, k, v read the same x) share.

Adapter weights live in ``adapter_dtype`` (float32 by default, even on a bfloat16 base): the input
is cast to it and the sum is cast back to the base layer's output dtype.

    model = apply_lora(model, LoraConfig(rank=8, alpha=16, targets=["q_proj", "v_proj"]))
    ... train ...
    model = merge_and_unload(model)   # plain nn.Linear layers holding W'
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.errors import UserError
from peftlab.method_table import LORA_PLAIN_INITS
from peftlab.peft.core import (
    DTYPES,
    LAYER_PATTERN,
    WrappedLinear,
    adapter_modules,
    adapter_state_dict,
    dtype_named,
    freeze_all_but_adapters,
    get_module,
    layer_index,
    parse_layers,
    replace_module,
    select_modules,
    split_patterns,
)
from peftlab.peft.formats import AdapterFormat, patterns_from_json, paths_regex, register_format, target_names
from peftlab.peft.nf4 import NF4Linear


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
    """What to adapt: names or suffixes (``q_proj``), ``re:<regex>``, ``all-linear``, a list of these or a
    comma-separated string (``"q_proj,v_proj"``); None: the model type's default (q, v, as peft's; ``peftlab
    train`` defaults to all-linear instead, see ``method_table``)."""
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
    init: str = "kaiming"
    """How A and B start: kaiming, gaussian, pissa, pissa_niter_N or olora (see the module docstring)."""

    def __post_init__(self) -> None:
        check_init(self.init)
        if self.dora and changes_base(self.init):
            raise UserError(f"LoRA init {self.init} changes the base weight, which peftlab's DoRA does not support: "
                            "use --init pissa/olora with --method lora, or --init kaiming with DoRA")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise UserError(f"LoRA rank must be a positive integer, got {self.rank!r}: use e.g. --rank 8")
        if not self.alpha > 0:
            raise UserError(f"LoRA alpha must be positive, got {self.alpha!r}: use e.g. --alpha 16 (twice the rank)")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        dtype_named(self.adapter_dtype)  # raises on an unknown name
        parse_layers(self.layers)  # raises on a malformed spec
        self.targets = split_patterns(self.targets)
        self.exclude = split_patterns(self.exclude)

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.rank) if self.rslora else self.alpha / self.rank


PLAIN_INITS = LORA_PLAIN_INITS  # B = 0: the base weight stays as it is
WEIGHT_INITS = ("pissa", "olora")  # from W, which becomes the residual (also pissa_niter_N)
_PISSA_NITER = re.compile(r"pissa_niter_([1-9][0-9]*)")


def check_init(init: str) -> None:
    if init not in PLAIN_INITS + WEIGHT_INITS and not _PISSA_NITER.fullmatch(init):
        raise UserError(f"unknown LoRA init {init!r}: choose kaiming, gaussian, pissa, pissa_niter_N (e.g. "
                        "pissa_niter_4: randomized SVD with 4 iterations) or olora")


def changes_base(init: str) -> bool:
    """PiSSA and OLoRA start from W and leave the residual in the frozen weight."""
    return init not in PLAIN_INITS


def principal_factors(weight: torch.Tensor, rank: int, scaling: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, B0) of PiSSA or OLoRA for a float32 ``weight`` (out, in), such that s B0 A0 is the part of W the
    adapter takes over: (r, in) and (out, r)."""
    if init == "olora":
        q, r_factor = torch.linalg.qr(weight)  # (out, k), (k, in)
        return r_factor[:rank].contiguous(), q[:, :rank].contiguous()
    if init == "pissa":
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)  # W = U diag(S) V^T
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    else:  # pissa_niter_N: randomized SVD
        u, s, v = torch.svd_lowrank(weight, rank, niter=int(_PISSA_NITER.fullmatch(init)[1]))
        vh = v.t()
    root = torch.sqrt(s / scaling)  # (r,)
    return root[:, None] * vh, u * root[None, :]  # A0 = sqrt(S/s) V^T, B0 = U sqrt(S/s)


class LoraVariant:
    """Plain LoRA: the steps of :class:`LoraLinear` that a variant of LoRA may change.

    A variant (as peft's ``LoraVariant``) is chosen once, when the layer is built, and holds no
    tensors: whatever it adds (DoRA's magnitude) it registers on the layer, so the layer's
    parameter names stay peft's. The update s B A itself is the layer's :meth:`~LoraLinear.delta_weight`.
    """

    name = "lora"

    def init(self, layer: LoraLinear) -> None:
        """Add the variant's own tensors to ``layer``, once A and B are initialised."""

    def adapter_params(self, layer: LoraLinear) -> dict[str, nn.Parameter]:
        """The variant's trainable tensors besides ``lora_A`` and ``lora_B``, named relative to ``layer``."""
        return {}

    def forward(self, layer: LoraLinear, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """The adapted output: ``result`` = W x + b (..., out) plus the update of ``x`` (..., in, adapter dtype).

        When ``result`` is in the adapter dtype, the update is added by one ``addmm``,
        result + s * (A x') B^T, instead of a product, a scaling and a sum (three ops and two
        temporaries); in decoding, where each op works on a handful of rows, the ops are the cost.
        The sum is the same up to one rounding (addmm may fuse the scaling and the addition).
        """
        if layer.training and layer.has_dropout and torch.is_grad_enabled():
            down = _DroppedDown.apply(x, layer.lora_A.weight, layer.dropout.p)  # (..., r) = A x'
        else:
            if layer.training and layer.has_dropout:  # in eval mode dropout is the identity and draws no random numbers
                x = layer.dropout(x)
            down = F.linear(x, layer.lora_A.weight)  # (..., r) = A x'
        if result.dtype != down.dtype:  # e.g. a bfloat16 base with float32 adapters: the sum in float32
            return result + F.linear(down, layer.lora_B.weight) * layer.scaling
        out = result.shape[-1]
        flat = torch.addmm(result.reshape(-1, out), down.reshape(-1, layer.rank), layer.lora_B.weight.t(), alpha=layer.scaling)
        return flat.view(result.shape)  # (..., out)

    def merge(self, layer: LoraLinear, weight: nn.Parameter) -> None:
        """W <- W + s B A."""
        weight.data += layer.delta_weight().to(weight.dtype)

    def unmerge(self, layer: LoraLinear, weight: nn.Parameter) -> None:
        """W <- W - s B A."""
        weight.data -= layer.delta_weight().to(weight.dtype)


class _DroppedDown(torch.autograd.Function):
    """A dropout(x) (..., r), keeping x and the dropout mask (bytes) for the backward pass.

    The mask is drawn exactly as ``F.dropout`` draws it on CPU (a float tensor filled by
    ``bernoulli_(1 - p)``), so the same seed gives the same mask; x' = x * mask / (1 - p) is formed again in
    backward: dL/dA = g^T x', dL/dx = (g A) * mask / (1 - p).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
        noise = torch.empty_like(x).bernoulli_(1 - p)  # (..., in) of 0 / 1
        ctx.p = p
        ctx.save_for_backward(x, weight, noise.bool())
        return F.linear(x * noise.div_(1 - p), weight)  # (..., r)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, mask = ctx.saved_tensors
        scale = mask.to(x.dtype).div_(1 - ctx.p)  # (..., in): 0 or 1 / (1 - p)
        grad_x = (grad @ weight) * scale if ctx.needs_input_grad[0] else None  # (..., in)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            dropped = (x * scale).reshape(-1, x.shape[-1])  # (N, in) = x'
            grad_weight = grad.reshape(-1, grad.shape[-1]).t().mm(dropped)  # (r, in)
        return grad_x, grad_weight, None


class DoraVariant(LoraVariant):
    """DoRA: a learned per-row magnitude m (``lora_magnitude_vector``) times the adapted direction.

    W' = m * (W + s B A) / n with n = ||W + s B A||_row, a constant for autograd (see the module docstring).
    """

    name = "dora"

    def init(self, layer: LoraLinear) -> None:
        with torch.no_grad():
            magnitude = self._row_norm(layer, layer.delta_weight())  # (out,) = ||W||_row since B = 0
        layer.lora_magnitude_vector = nn.Parameter(magnitude)
        layer.register_buffer("_merge_norm", None, persistent=False)  # n at merge time, for unmerge

    def adapter_params(self, layer: LoraLinear) -> dict[str, nn.Parameter]:
        return {"lora_magnitude_vector": layer.lora_magnitude_vector}

    @staticmethod
    def _row_norm(layer: LoraLinear, delta: torch.Tensor) -> torch.Tensor:
        """||W + delta||_row: (out,), computed in delta's dtype."""
        return torch.linalg.norm(layer.base_layer.weight.to(delta.dtype) + delta, dim=1)

    def forward(self, layer: LoraLinear, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        weight = layer.base_layer.weight.to(x.dtype)  # (out, in)
        with torch.no_grad():  # n is a constant for autograd (DoRA paper, section 4.3)
            update = layer.scaling * (layer.lora_B.weight @ layer.lora_A.weight)  # (out, in)
            norm = torch.linalg.norm(weight + update, dim=1)  # (out,)
        mag_scale = layer.lora_magnitude_vector / norm  # (out,), m / n
        if layer.training and not isinstance(layer.dropout, nn.Identity):
            x = layer.dropout(x)
            base = F.linear(x, weight)  # (..., out) = W x', no bias
        else:
            bias = layer.base_layer.bias
            base = result if bias is None else result - bias  # (..., out) = W x
        lora = layer.lora_B(layer.lora_A(x))  # (..., out) = B A x'
        dora = (mag_scale - 1) * base + mag_scale * lora * layer.scaling
        return result + dora

    def merge(self, layer: LoraLinear, weight: nn.Parameter) -> None:
        """W <- W' = (m / n) (W + s B A), remembering n."""
        delta = layer.delta_weight()
        layer._merge_norm = self._row_norm(layer, delta)
        factor = (layer.lora_magnitude_vector / layer._merge_norm).view(-1, 1)  # (out, 1)
        weight.data = (factor * (weight.to(delta.dtype) + delta)).to(weight.dtype)

    def unmerge(self, layer: LoraLinear, weight: nn.Parameter) -> None:
        """W <- W' n / m - s B A, with the n of the merge."""
        delta = layer.delta_weight()
        factor = (layer.lora_magnitude_vector / layer._merge_norm).view(-1, 1)  # (out, 1)
        weight.data = (weight.to(delta.dtype) / factor - delta).to(weight.dtype)
        layer._merge_norm = None


class LoraLinear(WrappedLinear):
    """An ``nn.Linear`` (kept frozen as ``base_layer``) plus a LoRA / rsLoRA / DoRA update.

    Parameter names follow HF peft's (less the adapter name): ``lora_A.weight``, ``lora_B.weight``
    and, for DoRA, ``lora_magnitude_vector``. What differs between LoRA and DoRA lives in
    ``self.variant`` (:class:`LoraVariant`, :class:`DoraVariant`).
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
        init: str = "kaiming",
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.rank, self.alpha, self.rslora = rank, alpha, rslora
        self.scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.has_dropout = dropout > 0
        factory = {"device": base_layer.weight.device, "dtype": adapter_dtype}
        self.lora_A = nn.Linear(base_layer.in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, base_layer.out_features, bias=False, **factory)
        self.init = init
        self._initialise(init)
        self.variant: LoraVariant = DoraVariant() if dora else LoraVariant()
        self.variant.init(self)
        self.merged = False

    @torch.no_grad()
    def _initialise(self, init: str) -> None:
        """A and B as ``init`` says; PiSSA / OLoRA also turn the base weight into the residual and keep
        (A0, B0) as buffers ``lora_A_initial`` / ``lora_B_initial`` (not saved) for the conversion at save."""
        nn.init.zeros_(self.lora_B.weight)
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            return
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.rank)
            return
        if isinstance(self.base_layer, NF4Linear) or not self.base_layer.weight.is_floating_point():
            raise UserError(f"LoRA init {init} (PiSSA / OLoRA) starts from floating-point base weights, not a 4-bit "
                            "base: train with --init kaiming on a 4-bit base, or load this adapter without --quantize")
        weight = self.base_layer.weight
        a0, b0 = principal_factors(weight.to(torch.float32), self.rank, self.scaling, init)
        self.lora_A.weight.copy_(a0)
        self.lora_B.weight.copy_(b0)
        a0, b0 = self.lora_A.weight.float(), self.lora_B.weight.float()  # as stored (rounded in a low adapter dtype)
        weight.data = (weight.to(torch.float32) - self.scaling * (b0 @ a0)).to(weight.dtype)  # W_res
        self.register_buffer("lora_A_initial", self.lora_A.weight.detach().clone(), persistent=False)
        self.register_buffer("lora_B_initial", self.lora_B.weight.detach().clone(), persistent=False)

    @property
    def changes_base(self) -> bool:
        return changes_base(self.init)

    def converted_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A', B') of rank 2r with s B' A' = s (B A - B0 A0): the adapter for the unmodified base weight."""
        a, b = self.lora_A.weight.detach(), self.lora_B.weight.detach()
        return torch.cat([a, self.lora_A_initial], dim=0), torch.cat([b, -self.lora_B_initial], dim=1)

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight,
                **self.variant.adapter_params(self)}

    def delta_weight(self) -> torch.Tensor:
        """s * B A, the LoRA update of W: (out, in) in the adapter dtype."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)  # (..., out) = W x + b, in the base dtype
        if self.merged:
            return result
        dtype = self.lora_A.weight.dtype
        if x.dtype == dtype and result.dtype == dtype:  # no casts to make (each .to is an op, even when a no-op)
            return self.variant.forward(self, x, result)
        return self.variant.forward(self, x.to(dtype), result).to(result.dtype)

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
        self.variant.merge(self, self.base_layer.weight)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (exact up to floating-point error)."""
        if not self.merged:
            return
        self.variant.unmerge(self, self.base_layer.weight)
        self.merged = False

    def extra_repr(self) -> str:
        kind = "rslora" if self.rslora and self.variant.name == "lora" else self.variant.name
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
    if changes_base(config.init):
        check_not_shared(model, paths, config.init)
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
            init=config.init,
        )
        replace_module(model, path, layer.train(base.training))  # a model in eval mode stays in eval mode
    freeze_all_but_adapters(model)
    return model


def check_not_shared(model: nn.Module, paths: list[str], init: str) -> None:
    """PiSSA / OLoRA rewrite the weight as the residual: refuse a weight another module shares (a tied output head)."""
    counts: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        counts[id(param)] = counts.get(id(param), 0) + 1
    for path in paths:
        if counts.get(id(get_module(model, path).weight), 0) > 1:
            raise UserError(f"LoRA init {init} would turn {path}.weight into a residual, but that weight is shared "
                            "(tied to another module): leave it out of --targets or use --init kaiming")


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


# ---------------------------------------------------------------------------------------------
# peft's format (peft_type "LORA"; rsLoRA and DoRA are flags of it)

# peft LoraConfig fields that change the maths or add tensors we do not implement, with the value meaning "off".
_UNSUPPORTED_LORA_FIELDS = {
    "bias": "none",
    "lora_bias": False,
    "fan_in_fan_out": False,
    "modules_to_save": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layer_replication": None,
    "trainable_token_indices": None,
    "target_parameters": None,
    "use_qalora": False,
    "use_bdlora": None,
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "velora_config": None,
    "monteclora_config": None,
    "kasa_config": None,
}
# init_lora_weights values that leave the base weights and the LoRA forward as they are.
_PLAIN_LORA_INITS = (True, False, "gaussian", "eva", "orthogonal")


def _init_from_json(value: Any) -> str:
    """peft's ``init_lora_weights`` -> our ``init``. A plain init is overwritten by the loaded weights; an unconverted
    PiSSA / OLoRA file expects the residual base, which peft rebuilds on load by redoing the init: so do we."""
    if value in _PLAIN_LORA_INITS:
        return "kaiming"
    if isinstance(value, str) and (value in WEIGHT_INITS or _PISSA_NITER.fullmatch(value)):
        return value
    raise UserError(f"this LoRA adapter uses init_lora_weights={value!r}, which changes the base weights or the "
                    "forward: convert it to plain LoRA with peft first")


def lora_config_from_json(data: dict[str, Any]) -> LoraConfig:
    for name, off in _UNSUPPORTED_LORA_FIELDS.items():
        value = data.get(name, off)
        if value != off and value not in (None, False, {}, []):
            raise UserError(f"this LoRA adapter uses peft's {name}={value!r}, which peftlab does not support")
    init = _init_from_json(data.get("init_lora_weights", True))
    layers = data.get("layers_to_transform")
    patterns = data.get("layers_pattern")
    patterns = [patterns] if isinstance(patterns, str) else patterns or []
    if layers is not None and not set(patterns) <= {"layers", "block", "h"}:
        raise UserError(f"this LoRA adapter uses layers_pattern={patterns!r}; peftlab knows layers, block and h")
    return LoraConfig(  # peft's defaults where the file is silent
        rank=data.get("r", 8),
        alpha=data.get("lora_alpha", 8),
        dropout=data.get("lora_dropout", 0.0),
        targets=patterns_from_json(data.get("target_modules")),
        exclude=patterns_from_json(data.get("exclude_modules")) or (),
        layers=layers,
        rslora=data.get("use_rslora", False),
        dora=data.get("use_dora", False),
        init=init,
    )


def lora_config_to_json(config: LoraConfig, model: nn.Module) -> dict[str, Any]:
    """peft's LoraConfig fields; only long-standing ones, so that older peft versions read the file too.

    A PiSSA / OLoRA adapter is written converted (see the module docstring): rank 2r, alpha scaled to keep s."""
    rank, alpha = config.rank, config.alpha
    if any(layer.changes_base for layer in lora_layers(model).values()):
        rank, alpha = 2 * rank, (alpha * math.sqrt(2) if config.rslora else 2 * alpha)
    return {
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": config.dropout,
        **lora_target_fields(model),
        "use_rslora": config.rslora,
        "use_dora": config.dora,
        "init_lora_weights": True,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def lora_target_fields(model: nn.Module) -> dict[str, Any]:
    """peft's ``target_modules`` (+ ``layers_to_transform``, ``layers_pattern``) for the LoRA layers in ``model``.

    As peft itself writes them when possible: the sorted layer names (``["q_proj", "v_proj"]``),
    restricted to some blocks if ``layers`` was used; otherwise (``exclude`` was used) a regex that
    matches each adapted path.
    """
    paths = list(lora_layers(model))
    if names := target_names(model, paths, LoraLinear):
        return {"target_modules": names, "layers_to_transform": None, "layers_pattern": None}
    indices = {layer_index(p) for p in paths}
    if None not in indices and (names := target_names(model, paths, LoraLinear, layers=indices)):
        patterns = sorted({LAYER_PATTERN.search(p)[1] for p in paths})
        return {
            "target_modules": names,
            "layers_to_transform": sorted(indices),
            "layers_pattern": patterns[0] if len(patterns) == 1 else patterns,
        }
    return {"target_modules": paths_regex(paths), "layers_to_transform": None, "layers_pattern": None}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors an adapter file holds: A, B (and DoRA's magnitudes); PiSSA / OLoRA layers converted to rank 2r."""
    tensors = adapter_state_dict(model)
    for path, layer in lora_layers(model).items():
        if layer.changes_base:
            tensors[f"{path}.lora_A.weight"], tensors[f"{path}.lora_B.weight"] = layer.converted_factors()
    return tensors


register_format(
    "LORA",
    AdapterFormat(
        config_type=LoraConfig,
        config_from_json=lora_config_from_json,
        config_to_json=lora_config_to_json,
        apply=lambda model, config: apply_lora(model, config, strict=False),
        state_dict=lora_state_dict,
    ),
)
