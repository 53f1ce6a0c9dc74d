"""QLoRA: LoRA on a base model whose linear layers are stored in 4-bit NF4 (Dettmers et al. 2023).

QLoRA (https://arxiv.org/abs/2305.14314) freezes the base in 4-bit NormalFloat with double-quantised
block scales (:mod:`peftlab.peft.nf4`), dequantises each weight on the fly in the compute dtype
(bfloat16 in the paper) and backpropagates through it into LoRA adapters kept in 16/32 bits::

    h = dequant(W_nf4) x + b + s * B A x

Every ``nn.Linear`` of the base is quantised, adapted or not, except the output head
(``get_output_embeddings()``); embeddings and norms stay as loaded. The adapter is an ordinary
LoRA adapter in peft's format: it loads on the 4-bit base and on a 16-bit one.

    model = apply_qlora(model, LoraConfig(rank=16, alpha=32, targets="all-linear"), compute_dtype="bfloat16")
    ... train: only lora_A / lora_B change; the 4-bit storage never does ...
    save_adapter(model, "runs/x/adapter", config)
    print(weight_storage(model))                       # bytes held vs the unquantised size
    merged = merge_and_unload(dequantize_model(model))  # plain nn.Linear layers again

The merged model equals the 4-bit model with its adapter up to float error; it differs from the
original 16-bit base plus the adapter by the quantisation error of W.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from peftlab.errors import UserError
from peftlab.peft.core import adapter_modules, dtype_named, replace_module
from peftlab.peft.lora import LoraConfig, apply_lora
from peftlab.peft.nf4 import NF4Linear, compute_dtype_of
from peftlab.progress import ProgressFactory, silent


def quantize_model(
    model: nn.Module,
    compute_dtype: str | torch.dtype = "bfloat16",
    device: str | torch.device | None = None,
    progress: ProgressFactory = silent,
) -> nn.Module:
    """Replace every ``nn.Linear`` but the output head by an :class:`NF4Linear`, in place.

    Each layer is quantised on ``device`` (default: where it is), then the rest of the model is
    moved there: a 16-bit model loaded on the CPU is never whole on the GPU (bitsandbytes'
    CUDA quantiser is also far faster than its CPU one). Quantise before adding adapters:
    they are added to the 4-bit layers afterwards (any LoRA-family method selects them as
    ``nn.Linear`` layers).
    """
    compute_dtype = compute_dtype_of(compute_dtype)
    if adapter_modules(model):
        raise UserError("the model already holds adapters: quantise the base model first, then add the adapter")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    paths = [
        path for path, module in model.named_modules()
        if isinstance(module, nn.Linear) and not isinstance(module, NF4Linear) and module is not head
    ]
    if not paths and not any(isinstance(m, NF4Linear) for m in model.modules()):
        raise UserError(f"{type(model).__name__} has no linear layer to quantise besides its output head")
    bar = progress("quantising to NF4", total=len(paths), unit="layer")
    for path in paths:
        linear = model.get_submodule(path)
        if device is not None:
            linear = linear.to(device)
        replace_module(model, path, NF4Linear.from_linear(linear, compute_dtype))
        bar.update(1)
    bar.close()
    if device is not None:
        model.to(device)
    for param in model.parameters():  # the base is frozen: only adapters train on a 4-bit model
        param.requires_grad_(False)
    return model


def apply_qlora(
    model: nn.Module,
    config: LoraConfig,
    compute_dtype: str | torch.dtype = "bfloat16",
    device: str | torch.device | None = None,
    progress: ProgressFactory = silent,
) -> nn.Module:
    """:func:`quantize_model` then :func:`~peftlab.peft.lora.apply_lora`; only the LoRA weights train."""
    return apply_lora(quantize_model(model, compute_dtype, device, progress), config)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, NF4Linear) for m in model.modules())


def dequantize_model(model: nn.Module, dtype: str | torch.dtype | None = None) -> nn.Module:
    """Turn every :class:`NF4Linear` (adapter base layers included) back into an ``nn.Linear``, in place.

    The new weights are the dequantised ones, in ``dtype`` (default: each layer's dtype before
    quantisation, which matches the rest of the model). Afterwards ``merge_and_unload`` works.
    """
    if isinstance(dtype, str):
        dtype = dtype_named(dtype, "dtype")
    for path, module in list(model.named_modules()):
        if isinstance(module, NF4Linear):
            replace_module(model, path, module.to_linear(dtype))
    return model


# ---------------------------------------------------------------------------------------------
# Memory


@dataclass
class StorageRow:
    """Weight storage of some quantised linear layers, in bytes."""

    layers: int = 0
    weights: int = 0
    """Number of quantised weights (sum of out * in)."""
    packed: int = 0
    """4-bit codes, two a byte."""
    scales: int = 0
    """8-bit block scales + their float32 scales and offset (double quantization)."""
    codebooks: int = 0
    """The 16 NF4 levels and the 256 levels of the 8-bit code, per layer."""
    bias: int = 0
    """Unquantised biases."""
    unquantized: int = 0
    """The same weights and biases in the reference dtype."""

    @property
    def held(self) -> int:
        return self.packed + self.scales + self.codebooks + self.bias

    @property
    def ratio(self) -> float:
        """held / unquantized."""
        return self.held / self.unquantized if self.unquantized else 0.0

    def add(self, other: StorageRow) -> None:
        for name in ("layers", "weights", "packed", "scales", "codebooks", "bias", "unquantized"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class StorageReport:
    """Bytes of weight tensors a model holds, with its 4-bit layers grouped by name (``q_proj`` ...)."""

    reference_dtype: torch.dtype
    groups: dict[str, StorageRow] = field(default_factory=dict)
    """Quantised linear layers by their last name (``q_proj``, ``down_proj``, ``wo`` ...)."""
    quantized: StorageRow = field(default_factory=StorageRow)
    """All quantised linear layers together."""
    other: int = 0
    """Every other parameter and buffer (embeddings, head, norms, adapters), as held."""
    other_unquantized: int = 0
    """The same tensors, floating-point ones counted in the reference dtype."""

    @property
    def total(self) -> int:
        return self.quantized.held + self.other

    @property
    def total_unquantized(self) -> int:
        return self.quantized.unquantized + self.other_unquantized

    def __str__(self) -> str:
        ref = str(self.reference_dtype).removeprefix("torch.")
        mib = 2**20
        lines = [f"{'layers':<12} {'n':>4} {'held MiB':>9} {ref + ' MiB':>12} {'ratio':>6}"]
        rows = [*self.groups.items(), ("quantised", self.quantized)]
        for name, row in rows:
            lines.append(
                f"{name:<12} {row.layers:>4} {row.held / mib:>9.2f} {row.unquantized / mib:>12.2f} {row.ratio:>6.3f}"
            )
        lines.append(f"{'other':<12} {'':>4} {self.other / mib:>9.2f} {self.other_unquantized / mib:>12.2f}")
        lines.append(
            f"{'total':<12} {'':>4} {self.total / mib:>9.2f} {self.total_unquantized / mib:>12.2f} "
            f"{self.total / max(self.total_unquantized, 1):>6.3f}"
        )
        return "\n".join(lines)


def weight_storage(model: nn.Module, reference_dtype: torch.dtype = torch.float32) -> StorageReport:
    """Measure the bytes of the tensors ``model`` holds, against the same model unquantised.

    Each tensor storage is counted once (tied embeddings are one tensor). ``reference_dtype`` is the
    dtype of the unquantised comparison (float32 by default; bfloat16 for a 16-bit base).
    """
    ref_size = torch.empty((), dtype=reference_dtype).element_size()
    report = StorageReport(reference_dtype)
    seen: set[int] = set()

    def first_time(tensor: torch.Tensor) -> bool:
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen:
            return False
        seen.add(ptr)
        return True

    for path, module in model.named_modules():
        if not isinstance(module, NF4Linear):
            continue
        for tensor in module.buffers(recurse=False):
            first_time(tensor)
        stored = module.storage_bytes()
        weights = module.in_features * module.out_features
        bias = module.bias
        bias_held = bias.numel() * bias.element_size() if bias is not None and first_time(bias) else 0
        row = StorageRow(
            layers=1, weights=weights, **stored, bias=bias_held,
            unquantized=(weights + (bias.numel() if bias is not None else 0)) * ref_size,
        )
        name = path.removesuffix(".base_layer").rsplit(".", 1)[-1]  # an adapted layer is named by its wrapper
        report.groups.setdefault(name, StorageRow()).add(row)
        report.quantized.add(row)

    for tensor in [*model.parameters(), *model.buffers()]:
        if first_time(tensor):
            report.other += tensor.numel() * tensor.element_size()
            size = ref_size if tensor.is_floating_point() else tensor.element_size()
            report.other_unquantized += tensor.numel() * size
    return report
