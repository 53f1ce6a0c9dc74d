"""LoRA / rsLoRA / DoRA layers: maths, merging, training, dtypes and errors."""

from __future__ import annotations

import math

import peft
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from peftlab.errors import UserError
from peftlab.peft import (
    LoraConfig,
    LoraLinear,
    adapter_parameters,
    apply_lora,
    merge_adapters,
    merge_and_unload,
    parameter_report,
    unmerge_adapters,
)

TOL = 1e-5
VARIANTS = {"lora": {}, "rslora": {"rslora": True}, "dora": {"dora": True}}


def auto_class(model_dir):
    return AutoModelForSeq2SeqLM if "t5" in model_dir.name else AutoModelForCausalLM


def load(model_dir, dtype=torch.float32):
    return auto_class(model_dir).from_pretrained(model_dir, dtype=dtype).eval()


def batch(model) -> dict[str, torch.Tensor]:
    ids = torch.randint(4, 300, (2, 9), generator=torch.Generator().manual_seed(7))
    if model.config.is_encoder_decoder:
        return {"input_ids": ids, "decoder_input_ids": ids[:, :6], "labels": ids[:, 1:7].contiguous()}
    return {"input_ids": ids, "labels": ids}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in batch(model).items() if k != "labels"}).logits


@torch.no_grad()
def perturb(model, scale: float = 0.2, seed: int = 1) -> None:
    """Make B (zero at init) non-zero and everything else different from its init."""
    gen = torch.Generator().manual_seed(seed)
    for p in adapter_parameters(model).values():
        p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * scale)


def test_course_notes_example():
    """A 512x64 weight with r=8: A is 8x64 (512), B is 512x8 (4,096): 86% fewer than 32,768 — as in peft."""

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(64, 512, bias=False)  # W: (512, 64)

        def forward(self, x):
            return self.proj(x)

    ours = apply_lora(Tiny(), LoraConfig(rank=8, alpha=16, targets=["proj"]))
    assert ours.proj.lora_A.weight.shape == (8, 64) and ours.proj.lora_A.weight.numel() == 512
    assert ours.proj.lora_B.weight.shape == (512, 8) and ours.proj.lora_B.weight.numel() == 4_096
    report = parameter_report(ours)
    assert (report.trainable, report.total) == (4_608, 32_768 + 4_608)
    assert round(100 * (1 - report.trainable / 32_768)) == 86
    theirs = peft.get_peft_model(Tiny(), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["proj"]))
    assert theirs.get_nb_trainable_parameters() == (report.trainable, report.total)


@pytest.mark.parametrize("variant", VARIANTS)
def test_layer_maths(variant):
    """The layer against the formulas of its docstring, written out with plain tensors."""
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    layer = LoraLinear(base, rank=4, alpha=8, **VARIANTS[variant]).eval()
    W, b = base.weight.detach(), base.bias.detach()
    assert torch.equal(layer.lora_B.weight, torch.zeros(12, 4))
    bound = 1 / math.sqrt(16)  # kaiming_uniform(a=sqrt(5)) on fan_in 16
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.std() > bound / 3
    x = torch.randn(3, 5, 16)
    assert torch.allclose(layer(x), base(x), atol=1e-6)  # identity at init (DoRA too: m = ||W||_row)

    with torch.no_grad():
        layer.lora_B.weight.normal_()
        if variant == "dora":
            layer.lora_magnitude_vector.mul_(torch.rand(12) + 0.5)
    A, B = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    s = 8 / 2 if variant == "rslora" else 8 / 4
    assert layer.scaling == s
    if variant == "dora":
        m = layer.lora_magnitude_vector.detach()
        W_adapted = W + s * B @ A
        W_dora = m[:, None] * W_adapted / W_adapted.norm(dim=1, keepdim=True)
        expected = x @ W_dora.T + b
    else:
        expected = x @ W.T + b + s * (x @ A.T @ B.T)
    assert torch.allclose(layer(x), expected, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_merge_invariants(tiny_model_dir, variant, dtype, tmp_path):
    """Logits equal unmerged, merged, unmerged again, after merge_and_unload and after a save/reload.

    The tolerance is 1e-5 relative to the largest logit: the tiny T5's logits reach ~50, where
    float32 itself only resolves ~5e-6 (its float32 and float64 forwards already differ by 1e-5).
    In float64 the same invariants hold to 1e-10.
    """
    torch_dtype = getattr(torch, dtype)
    config = LoraConfig(rank=4, alpha=8, targets="all-linear", adapter_dtype=dtype, **VARIANTS[variant])
    model = apply_lora(load(tiny_model_dir, torch_dtype), config)
    perturb(model, scale=0.05)  # a large update on every layer would drive the tiny T5's logits into the hundreds
    unmerged = logits(model)
    assert (unmerged - logits(load(tiny_model_dir, torch_dtype))).abs().max() > 1e-2  # the adapter matters
    tol = (1e-5 if dtype == "float32" else 1e-10) * max(1.0, unmerged.abs().max().item())

    weights_before = {n: m.base_layer.weight.clone() for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    merge_adapters(model)
    assert all(m.merged for m in model.modules() if isinstance(m, LoraLinear))
    assert (logits(model) - unmerged).abs().max() <= tol
    unmerge_adapters(model)
    assert not any(m.merged for m in model.modules() if isinstance(m, LoraLinear))
    assert (logits(model) - unmerged).abs().max() <= tol
    for name, layer in ((n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear)):
        assert (layer.base_layer.weight - weights_before[name]).abs().max() <= tol, name

    merged = merge_and_unload(model)
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    assert all(type(m) is nn.Linear for n, m in merged.named_modules() if n.endswith(("q_proj", ".q")))
    assert (logits(merged) - unmerged).abs().max() <= tol
    merged.save_pretrained(tmp_path)
    reloaded = load(tmp_path, torch_dtype)
    assert (logits(reloaded) - unmerged).abs().max() <= tol


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_training_step_changes_only_adapters(tiny_model_dir, variant):
    model = apply_lora(load(tiny_model_dir), LoraConfig(rank=4, alpha=8, dropout=0.1, **VARIANTS[variant]))
    perturb(model)  # B != 0, so A gets a gradient too
    adapter = adapter_parameters(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # Give the optimizer every parameter: a frozen one must get no gradient, not merely be left out.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    loss = model(**batch(model)).loss
    loss.backward()
    optimizer.step()

    adapter_ids = {id(p) for p in adapter.values()}
    for name, param in model.named_parameters():
        if id(param) in adapter_ids:
            assert param.grad is not None and not torch.equal(param, before[name]), name
        else:
            assert param.grad is None and torch.equal(param, before[name]), name
    assert len(adapter_ids) == sum(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("variant", VARIANTS)
def test_bfloat16_base(tiny_model_dir, variant):
    config = LoraConfig(rank=4, targets="all-linear", **VARIANTS[variant])
    model = apply_lora(load(tiny_model_dir, torch.bfloat16), config)
    assert {p.dtype for p in adapter_parameters(model).values()} == {torch.float32}
    assert {m.base_layer.weight.dtype for m in model.modules() if isinstance(m, LoraLinear)} == {torch.bfloat16}
    perturb(model)
    out = logits(model)  # equality with peft on a bfloat16 base: test_peft_parity.py
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert not torch.equal(out, logits(load(tiny_model_dir, torch.bfloat16)))

    model.train()
    model(**batch(model)).loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in adapter_parameters(model).values())


def test_adapter_dtype_option(tiny_llama_dir):
    model = apply_lora(load(tiny_llama_dir), LoraConfig(rank=4, adapter_dtype="bfloat16"))
    assert {p.dtype for p in adapter_parameters(model).values()} == {torch.bfloat16}
    assert logits(model).dtype == torch.float32


def test_injection_keeps_train_or_eval_mode(tiny_llama_dir):
    model = apply_lora(load(tiny_llama_dir), LoraConfig(rank=4, dropout=0.5))
    assert not any(m.training for m in model.modules())
    assert (logits(model) - logits(model)).abs().max() == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 0}, "rank must be a positive integer"),
        ({"rank": -4}, "rank must be a positive integer"),
        ({"rank": 2.5}, "rank must be a positive integer"),
        ({"alpha": 0}, "alpha must be positive"),
        ({"dropout": 1.0}, "dropout must be in [0, 1)"),
        ({"adapter_dtype": "int8"}, "adapter_dtype 'int8'"),
        ({"layers": "3-1"}, "not a range spec"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        LoraConfig(**kwargs)


def test_rank_larger_than_layer(tiny_llama_dir):
    model = load(tiny_llama_dir)
    before = {n: type(m) for n, m in model.named_modules()}
    # k_proj is 32 x 64 in the tiny Llama (2 key/value heads of 16)
    with pytest.raises(UserError, match=r"rank 40 .*model\.layers\.0\.self_attn\.k_proj.* 32 x 64"):
        apply_lora(model, LoraConfig(rank=40, targets=["q_proj", "k_proj"]))
    assert {n: type(m) for n, m in model.named_modules()} == before  # nothing injected


def test_merge_and_unload_without_adapters(tiny_llama_dir):
    with pytest.raises(UserError, match="no LoRA layers"):
        merge_and_unload(load(tiny_llama_dir))


def test_targets_as_a_comma_separated_string(tiny_llama_dir):
    """The Python API reads ``targets`` and ``exclude`` as ``--targets q_proj,v_proj`` does: two patterns."""
    config = LoraConfig(rank=2, targets="q_proj,v_proj", exclude="model.layers.1.self_attn.v_proj")
    assert config.targets == ["q_proj", "v_proj"] and config.exclude == ["model.layers.1.self_attn.v_proj"]
    model = apply_lora(load(tiny_llama_dir), config)
    adapted = [n for n, m in model.named_modules() if isinstance(m, LoraLinear)]
    assert adapted == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                       "model.layers.1.self_attn.q_proj"]
