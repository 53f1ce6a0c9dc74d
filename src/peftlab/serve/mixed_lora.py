"""LoRA for a batch whose rows use different adapters, in one forward pass.

Row b of the batch uses adapter k(b) (or none), so a wrapped ``nn.Linear`` computes::

    h_b = W x_b + s_k B_k A_k x_b          (nothing added for a row without adapter)

peft's ``adapter_names=`` loops over the adapters present (one slice, two matmuls and a scatter each),
so its cost grows with the number of distinct adapters. Here the k adapters present in the batch are
stacked once (S-LoRA / Punica's grouping, in its dense form), and every row goes through two GEMMs::

    down = x  @ [A_1; ...; A_k]^T          (B, T, k r)   every row against every present A
    down = down * M                        M (B, 1, k r): s_k(b) on row b's own block, 0 elsewhere
                                           (a packed row of several examples: M (1, T, k r), per token)
    h    = W x + down @ [B_1 ... B_k]^T    (B, T, out)

The masked blocks contribute exact zeros, so a row only sees its own adapter. The op count is fixed;
the flops grow with k r, small next to W's (k r << in on the models we serve), and the stacked
weights are rebuilt only when the set of present adapters changes, not at each step. A batch whose
rows all use one adapter takes LoRA's own two matmuls (``addmm``, as :class:`~peftlab.peft.lora.LoraLinear`).

Adapters live in ``capacity`` slots of zero-padded stacks, A (S, r_max, in) and B (S, out, r_max),
float32 (the adapter dtype of :class:`~peftlab.peft.lora.LoraLinear`); a layer an adapter does not
target keeps zeros in its slot. :class:`RowAdapters` is the one object the engine sets before each
forward; every layer reads it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.peft.core import WrappedLinear


class RowAdapters:
    """Which LoRA slot each row of the next forward uses (-1: none), shared by every mixed layer."""

    def __init__(self, capacity: int, max_rank: int) -> None:
        self.capacity, self.max_rank = capacity, max_rank
        self.scaling = [0.0] * capacity  # s = alpha / r (or alpha / sqrt(r)) of the adapter in each slot
        self.uniform: int | None = -1  # the one slot every row uses (-1: no adapter at all), None: mixed
        self.present: tuple[int, ...] = ()  # slots used by some row, in slot order
        self.mask: torch.Tensor | None = None  # (B, 1, k r_max): row b's scaling on its own slot's block (packed: (1, T, k r_max))
        self.version = 0  # changes when the slots' contents or ``present`` change: layers rebuild their stacks

    def set_rows(self, slots: list[int], device: torch.device, lengths: list[int] | None = None) -> None:
        """Use ``slots[b]`` for row b in the forwards to come; with ``lengths``, the forward is one packed
        row holding example b's ``lengths[b]`` tokens end to end, and ``slots[b]`` applies to those tokens."""
        distinct = set(slots)
        if len(distinct) == 1:
            self.uniform, self.mask = slots[0], None
            return
        self.uniform = None
        present = tuple(sorted(s for s in distinct if s >= 0))
        if present != self.present:
            self.present = present
            self.version += 1
        r = self.max_rank
        mask = torch.zeros(len(slots), 1, len(present) * r, device=device)  # (B, 1, k r)
        for row, slot in enumerate(slots):
            if slot >= 0:
                block = present.index(slot)
                mask[row, 0, block * r : (block + 1) * r] = self.scaling[slot]
        if lengths is not None:  # one packed row: each example's scaling on each of its tokens, (1, T, k r)
            mask = mask.repeat_interleave(torch.tensor(lengths, device=device), dim=0).transpose(0, 1)
        self.mask = mask

    def changed(self) -> None:
        """A slot was filled or emptied: stacks built from it are stale."""
        self.version += 1


class MixedLoraLinear(WrappedLinear):
    """An ``nn.Linear`` (``base_layer``) plus, per row, the LoRA update of that row's adapter slot."""

    def __init__(self, base_layer: nn.Linear, rows: RowAdapters) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.rows = rows
        device = base_layer.weight.device
        self.register_buffer("lora_A", torch.zeros(rows.capacity, rows.max_rank, base_layer.in_features, device=device))
        self.register_buffer("lora_B", torch.zeros(rows.capacity, base_layer.out_features, rows.max_rank, device=device))
        self._stacks: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (version, A stack, B stack)

    @torch.no_grad()
    def fill(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Put A (r, in) and B (out, r) in ``slot`` (zero-padded to r_max); None empties the slot."""
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        if a is not None:
            r = a.shape[0]
            self.lora_A[slot, :r].copy_(a)
            self.lora_B[slot, :, :r].copy_(b)

    def _stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[A_1; ...; A_k] (k r, in) and [B_1 ... B_k]^T (k r, out) over the present slots, cached per version."""
        if self._stacks is None or self._stacks[0] != self.rows.version:
            index = torch.tensor(self.rows.present, device=self.lora_A.device)
            a = self.lora_A.index_select(0, index).flatten(0, 1)  # (k r, in)
            b = self.lora_B.index_select(0, index).transpose(1, 2).flatten(0, 1)  # (k r, out)
            self._stacks = (self.rows.version, a, b)
        return self._stacks[1], self._stacks[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)  # (B, T, out) = W x + b
        slot = self.rows.uniform
        if slot == -1:  # no row uses an adapter
            return result
        xf = x.to(self.lora_A.dtype)
        sum_dtype = self.lora_A.dtype
        base = result.to(sum_dtype)
        if slot is not None:  # one adapter for every row: LoRA's own two matmuls
            down = F.linear(xf, self.lora_A[slot])  # (B, T, r_max)
            out = base.shape[-1]
            flat = torch.addmm(base.reshape(-1, out), down.reshape(-1, down.shape[-1]), self.lora_B[slot].t(),
                               alpha=self.rows.scaling[slot])
            return flat.view(result.shape).to(result.dtype)
        a, b = self._stacked()
        down = F.linear(xf, a) * self.rows.mask  # (B, T, k r): each row keeps its own block, scaled
        out = base.shape[-1]
        flat = torch.addmm(base.reshape(-1, out), down.reshape(-1, down.shape[-1]), b)  # one GEMM for all rows
        return flat.view(result.shape).to(result.dtype)  # (B, T, out)

    def extra_repr(self) -> str:
        return f"slots={self.rows.capacity}, max_rank={self.rows.max_rank}"
