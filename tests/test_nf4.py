"""NF4 storage: the code book, the block scales after double quantization, packing, the layer's maths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peftlab.errors import UserError
from peftlab.peft.nf4 import BLOCK_SIZE, SCALE_BLOCK_SIZE, NF4Linear

# The 16 NF4 levels as printed in the QLoRA paper (Dettmers et al. 2023, Appendix E) and bitsandbytes.
NF4_LEVELS = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip


def gaussian(shape, seed=0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """(n/2, 1) uint8 -> (n,) code indices; the first value of each pair sits in the high nibble."""
    packed = packed.reshape(-1).long()
    return torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)


def block_scales(layer: NF4Linear) -> torch.Tensor:
    """Undo the double quantization by hand: c_k = mu + s_(k // 256) * d[absmax_k], float32 (n/64,)."""
    k = torch.arange(layer.absmax.numel())
    return layer.nested_offset + layer.nested_absmax[k // SCALE_BLOCK_SIZE] * layer.nested_code[layer.absmax.long()]


def test_codebook_is_the_papers_and_the_normal_quantiles():
    layer = NF4Linear(gaussian((64, 64)))
    assert layer.code.tolist() == pytest.approx(NF4_LEVELS, abs=1e-7)
    # How the paper builds them: quantiles of N(0, 1) at evenly spaced probabilities from
    # 1 - offset to offset (offset = 0.9677), 8 positive and 7 negative, plus 0, scaled to [-1, 1].
    offset = 0.9677083
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([positive, negative, torch.zeros(1, dtype=torch.float64)]).sort().values
    assert (levels / levels.abs().max()).tolist() == pytest.approx(NF4_LEVELS, abs=1e-6)


def test_every_value_is_its_block_scale_times_a_level():
    # 384 x 160 = 61,440 weights: 960 blocks of 64, so 4 blocks of 256 scales (the last one partial).
    weight = gaussian((384, 160))
    layer = NF4Linear(weight)
    n = weight.numel()
    codes = unpack(layer.weight_packed)  # (n,)
    scales = block_scales(layer)  # (n/64,)
    assert codes.shape == (n,) and scales.shape == (n // BLOCK_SIZE,)
    assert layer.nested_absmax.shape == (4,)  # ceil(960 / 256)

    expected = scales.repeat_interleave(BLOCK_SIZE) * torch.tensor(NF4_LEVELS)[codes]  # (n,)
    dequantized = layer.dequantize(torch.float32).reshape(-1)
    torch.testing.assert_close(dequantized, expected, rtol=1e-6, atol=0)

    # The double-quantised scales approximate the true block absmax to 8 bits ...
    true_scales = weight.reshape(-1, BLOCK_SIZE).abs().amax(dim=1)
    assert ((scales - true_scales).abs() / true_scales).max() < 0.02
    # ... and each index is the level nearest to w / c, with c the block's true absmax.
    normalised = (weight.reshape(-1, BLOCK_SIZE) / true_scales[:, None]).reshape(-1, 1)  # (n, 1)
    distances = (normalised - torch.tensor(NF4_LEVELS)).abs()  # (n, 16)
    chosen = distances.gather(1, codes[:, None]).squeeze(1)
    assert (chosen <= distances.min(dim=1).values + 1e-6).all()

    rel_error = (dequantized - weight.reshape(-1)).norm() / weight.norm()
    assert 0.07 < rel_error < 0.10  # 0.092 for NF4 on a Gaussian


def test_two_values_per_byte():
    weight = gaussian((384, 160))
    layer = NF4Linear(weight)
    n = weight.numel()
    assert layer.weight_packed.dtype == torch.uint8 and layer.weight_packed.numel() == n // 2
    assert layer.weight_packed.untyped_storage().nbytes() == n // 2  # its own buffer, not a view of a larger one
    stored = layer.storage_bytes()
    assert stored["packed"] == n // 2
    assert stored["scales"] == n // BLOCK_SIZE + 4 * 4 + 4  # uint8 per block, float32 per 256 blocks, the offset
    assert stored["codebooks"] == (16 + 256) * 4
    assert stored["packed"] + stored["scales"] < 0.13 * n * 4  # 4.13 bits a weight (+ 1 KiB of code books a layer)


def test_blocks_run_across_rows():
    """Blocks of 64 run over the flattened weight: with 100 inputs a block spans two rows, the last is partial."""
    weight = gaussian((30, 100))  # 3,000 weights: 46 blocks of 64 and one of 56
    layer = NF4Linear(weight)
    scales = block_scales(layer).repeat_interleave(BLOCK_SIZE)[:3000]  # (3000,)
    expected = scales * torch.tensor(NF4_LEVELS)[unpack(layer.weight_packed)]
    torch.testing.assert_close(layer.dequantize().reshape(-1), expected, rtol=1e-6, atol=0)
    assert (layer.dequantize() - weight).norm() / weight.norm() < 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(128, 96), (100, 30)])
def test_forward_and_backward_use_the_dequantised_weight(dtype, shape):
    torch.manual_seed(0)
    linear = nn.Linear(*shape)
    layer = NF4Linear.from_linear(linear, compute_dtype=dtype)
    assert layer.bias is not linear.bias and torch.equal(layer.bias, linear.bias) and not layer.bias.requires_grad
    x = gaussian((3, 5, shape[0]), seed=1).requires_grad_(True)
    out = layer(x)
    assert out.dtype == x.dtype and out.shape == (3, 5, shape[1])

    x_ref = x.detach().to(dtype).requires_grad_(True)
    ref = F.linear(x_ref, layer.dequantize(dtype), linear.bias.to(dtype))
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(out, ref.float(), **tol)
    grad = gaussian(out.shape, seed=2)
    out.backward(grad)
    ref.backward(grad.to(dtype))
    torch.testing.assert_close(x.grad, x_ref.grad.float(), **tol)
    assert all(not t.requires_grad for t in layer.buffers())


def test_weight_property_and_to_linear():
    linear = nn.Linear(64, 128, dtype=torch.bfloat16)
    layer = NF4Linear.from_linear(linear, compute_dtype="float32")
    assert isinstance(layer, nn.Linear) and layer.weight.dtype == torch.float32
    torch.testing.assert_close(layer.weight, layer.dequantize(), rtol=0, atol=0)
    back = layer.to_linear()
    assert type(back) is nn.Linear and back.weight.dtype == torch.bfloat16  # the dtype before quantisation
    torch.testing.assert_close(back.weight, layer.dequantize(torch.bfloat16), rtol=0, atol=0)
    torch.testing.assert_close(back.bias, linear.bias, rtol=0, atol=0)
    rel = (back.weight.float() - linear.weight.float()).norm() / linear.weight.float().norm()
    assert rel < 0.12


def test_unsupported_compute_dtype():
    with pytest.raises(UserError, match="compute dtype"):
        NF4Linear(gaussian((64, 64)), compute_dtype="float16")
