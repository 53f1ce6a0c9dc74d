"""Gated MLPs that keep two activations for the backward pass instead of three.

A SwiGLU MLP (Llama, Mistral, Qwen2/3, SmolLM) computes::

    h = down(silu(g) * u)        g = gate(x), u = up(x), each (tokens, intermediate)

autograd keeps g (for silu's backward), and silu(g) and u (for the product's): three tensors of the
MLP's intermediate width per token and layer, the largest activations of a training step (with
the intermediate 2.7x the hidden width, about half of everything a LoRA step keeps). Here the product
keeps g and u only and recomputes silu(g) in the backward pass, one elementwise op::

    du = dh' * silu(g)           dg = silu'(g) * (dh' * u)          (dh' = the gradient at the product)

with the same kernels on the same inputs as autograd's own formulas, so the gradients are the same
bits (tests/test_training_speed_paths.py). The saving applies to LoRA and full fine-tuning alike.

Only the MLP classes listed in ``GATED_MLPS`` are changed (their forward is exactly
``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` with a SiLU ``act_fn``); other models run as they are.
"""

from __future__ import annotations

from types import MethodType

import torch
import torch.nn.functional as F
from torch import nn

GATED_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})


class _SiluTimes(torch.autograd.Function):
    """silu(g) * u, keeping g and u (not silu(g)) for the backward pass."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


def _lean_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(_SiluTimes.apply(self.gate_proj(x), self.up_proj(x)))


def _silu(act: nn.Module) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def lean_gated_mlps(model: nn.Module) -> int:
    """Give every SwiGLU MLP of ``model`` the lean product (in place); returns how many were changed."""
    changed = 0
    for module in model.modules():
        if type(module).__name__ in GATED_MLPS and _silu(getattr(module, "act_fn", None)):
            module.forward = MethodType(_lean_forward, module)
            changed += 1
    return changed
