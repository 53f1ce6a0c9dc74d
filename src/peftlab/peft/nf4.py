"""4-bit NormalFloat (NF4) storage of a frozen linear weight, dequantised on the fly (QLoRA).

QLoRA (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314, section 3) stores a frozen weight
W (out x in), flattened, in blocks of 64 values. A block keeps its absolute maximum c = max |w| and,
for each value, the 4-bit index of the nearest level of the NormalFloat code q (16 levels)::

    i = argmin_j |w / c - q_j|          w ~ c * q_i

The levels are quantiles of N(0, 1) rescaled to [-1, 1], with an exact zero (paper, Appendix E;
bitsandbytes' ``get_4bit_type("nf4")``): -1, -0.696, -0.525, -0.395, -0.284, -0.185, -0.091, 0,
0.080, 0.161, 0.246, 0.338, 0.441, 0.563, 0.723, 1. Two indices share one byte (the first value
of a pair in the high nibble).

Double quantization (paper, section 3) stores the block scales c in 8 bits as well: with mu the
mean of all c, the shifted scales c - mu are quantised blockwise (256 scales a block) with the
8-bit dynamic code d (256 levels), keeping one float32 scale s per 256 blocks::

    c_k ~ mu + s_b * d_j                (b = k // 256)

Per weight that is 4 + 8/64 + 32/(64*256) ~ 4.127 bits: 0.129x of float32, 0.258x of bfloat16.

The storage and its arithmetic are bitsandbytes' (``quantize_4bit(..., quant_type="nf4",
compress_statistics=True)`` and ``dequantize_4bit``), which run on CPU and CUDA. torchao's
``NF4Tensor`` was the other candidate, but it needs the number of block scales to divide by its
scale-block size (256): SmolLM2's 576 x 576 projections have 5,184 blocks, so it cannot store them.
The weight is always dequantised as the flat vector it was quantised as: bitsandbytes 0.50.2's CPU
kernel, given the 2-D shape, puts the block boundaries per row, which is wrong when ``in_features``
is not a multiple of 64 (and ``matmul_4bit`` passes it the 2-D shape, so the forward pass does its
own product, :class:`_NF4Matmul`).

    layer = NF4Linear.from_linear(nn.Linear(576, 576), compute_dtype=torch.bfloat16)
    y = layer(x)                 # x @ dequant(W).T + b, in bfloat16; autograd never keeps W
    w = layer.dequantize()       # (576, 576), the weight the layer computes with
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.errors import UserError

BLOCK_SIZE = 64
"""Weights per NF4 block (one absmax scale each)."""
SCALE_BLOCK_SIZE = 256
"""Block scales per block of the double quantization (one float32 scale each)."""
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""dtypes the dequantised weight and the matrix product use."""


@functools.cache
def bitsandbytes() -> ModuleType:
    """Import bitsandbytes (an optional dependency: only 4-bit quantisation needs it)."""
    # Its CPU backend logs a warning at import when the optional `kernels` package is absent; the
    # fallback it then uses is the one we want, so keep the warning out of the user's terminal.
    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserError(
            "4-bit NF4 quantisation needs bitsandbytes: run `pip install bitsandbytes==0.50.2`"
        ) from None
    finally:
        logger.setLevel(level)
    return bnb


def compute_dtype_of(dtype: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` or ``torch.bfloat16`` -> ``torch.bfloat16``; only float32 and bfloat16 are allowed."""
    if isinstance(dtype, str) and dtype in COMPUTE_DTYPES:
        return COMPUTE_DTYPES[dtype]
    if dtype in COMPUTE_DTYPES.values():
        return dtype
    raise UserError(f"4-bit compute dtype {dtype!r} is not supported: use one of {', '.join(COMPUTE_DTYPES)}")


class NF4Linear(nn.Linear):
    """A frozen ``nn.Linear`` whose weight is held as packed NF4 with double-quantised block scales.

    It subclasses ``nn.Linear`` (as bitsandbytes' ``Linear4bit`` does) so that target selection
    (names, ``all-linear``) and the adapter file writer treat it as the linear layer it replaces,
    but it holds no float weight: ``weight`` dequantises on each access. The bias stays unquantised.

    Buffers (n = out * in weights; bitsandbytes' names for them in brackets):

    - ``weight_packed``: (n/2, 1) uint8, two 4-bit code indices a byte;
    - ``absmax``: (n/64,) uint8, the 8-bit quantised block scales c - mu;
    - ``nested_absmax``: (n/64/256,) float32, one scale s per 256 block scales;
    - ``nested_offset``: () float32, mu;
    - ``nested_code``: (256,) float32, the 8-bit dynamic code d;
    - ``code``: (16,) float32, the NF4 levels q.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, compute_dtype=torch.float32) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: that would allocate a float weight
        out_features, in_features = weight.shape
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype_of(compute_dtype)
        self.weight_dtype = weight.dtype  # before quantisation: what to_linear() restores by default

        weight = weight.detach()
        if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            weight = weight.float()
        packed, state = bitsandbytes().functional.quantize_4bit(
            weight, blocksize=BLOCK_SIZE, compress_statistics=True, quant_type="nf4"
        )
        self.register_buffer("weight_packed", packed)  # (n/2, 1) uint8
        self.register_buffer("absmax", state.absmax)  # (n/64,) uint8
        self.register_buffer("nested_absmax", state.state2.absmax)  # (n/64/256,) float32
        self.register_buffer("nested_offset", state.offset)  # () float32
        self.register_buffer("nested_code", state.state2.code)  # (256,) float32
        self.register_buffer("code", state.code)  # (16,) float32
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype=torch.float32) -> NF4Linear:
        return cls(linear.weight, linear.bias, compute_dtype).train(linear.training)

    def quant_state(self, dtype: torch.dtype | None = None):
        """bitsandbytes' ``QuantState`` over this layer's buffers; dequantising it gives ``dtype``."""
        functional = bitsandbytes().functional
        # .float(): bitsandbytes wants float32 statistics, also after a cast such as model.to(torch.bfloat16).
        scales = functional.QuantState(
            absmax=self.nested_absmax.float(), code=self.nested_code.float(), blocksize=SCALE_BLOCK_SIZE,
            dtype=torch.float32,
        )
        return functional.QuantState(
            absmax=self.absmax,
            shape=torch.Size((self.out_features * self.in_features,)),  # flat: see the module docstring
            code=self.code.float(),
            blocksize=BLOCK_SIZE,
            quant_type="nf4",
            dtype=dtype or self.compute_dtype,
            offset=self.nested_offset.float(),
            state2=scales,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W as stored: (out, in) in ``dtype`` (default: the compute dtype); c_k * q_i for every weight."""
        dtype = dtype or self.compute_dtype
        state_dtype = dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
        weight = bitsandbytes().functional.dequantize_4bit(self.weight_packed, self.quant_state(state_dtype))  # (n,)
        return weight.view(self.out_features, self.in_features).to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight (out, in) in the compute dtype: a new tensor each access (so writes are lost)."""
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (..., in) -> (..., out), computed in the compute dtype, returned in x's dtype.
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return _NF4Matmul.apply(x.to(self.compute_dtype), bias, self).to(x.dtype)

    @torch.no_grad()
    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain ``nn.Linear`` holding the dequantised weight, in ``dtype`` (default: the original dtype)."""
        dtype = dtype or self.weight_dtype
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=self.weight_packed.device,
            dtype=dtype,
        )
        linear.weight.copy_(self.dequantize(dtype))
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        linear.requires_grad_(False)
        return linear.train(self.training)

    def storage_bytes(self) -> dict[str, int]:
        """Bytes held by the 4-bit weight: the packed codes, the block scales, the code books."""
        nbytes = {name: t.numel() * t.element_size() for name, t in self.named_buffers(recurse=False)}
        return {
            "packed": nbytes["weight_packed"],
            "scales": nbytes["absmax"] + nbytes["nested_absmax"] + nbytes["nested_offset"],
            "codebooks": nbytes["code"] + nbytes["nested_code"],
        }

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"nf4 blocks={BLOCK_SIZE}, compute_dtype={str(self.compute_dtype).removeprefix('torch.')}"
        )


class _NF4Matmul(torch.autograd.Function):
    """y = x W^T + b with W = layer.dequantize(), dequantised again in backward instead of saved.

    A plain ``F.linear(x, layer.dequantize())`` would keep every dequantised W alive from the
    forward to the backward pass: as much memory as the unquantised model. W is frozen, so
    the gradients are dL/dx = dL/dy W and (if the bias trains) dL/db = sum of dL/dy.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, layer: NF4Linear) -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantize(), bias)  # (..., out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = grad_out @ ctx.layer.dequantize() if ctx.needs_input_grad[0] else None  # (..., in)
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None  # (out,)
        return grad_x, grad_bias, None
