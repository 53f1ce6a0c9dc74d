"""peftlab's LoRA / rsLoRA / DoRA against HF peft (the reference), on tiny Llama- and T5-style models.

Adapters cross the boundary both ways through the on-disk format and must give the same logits
(eval mode, and train mode with adapter dropout under the same seed), the same merged weights and
the same parameter counts.
"""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from peftlab.peft import (
    LoraConfig,
    LoraLinear,
    adapter_parameters,
    apply_lora,
    load_adapter,
    merge_and_unload,
    parameter_report,
    save_adapter,
    select_modules,
)

TOL = 1e-5
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "t5": ["q", "v", "wo"]}
VARIANTS = {"lora": {}, "rslora": {"rslora": True}, "dora": {"dora": True}}
TASK = {"llama": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM"}


def load_base(kind: str, tiny_llama_dir, tiny_t5_dir, dtype=torch.float32):
    if kind == "llama":
        return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=dtype).eval()
    return AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir, dtype=dtype).eval()


def forward(model, kind: str, seed: int = 0):
    ids = torch.randint(4, 300, (2, 9), generator=torch.Generator().manual_seed(123))
    extra = {"decoder_input_ids": ids[:, :6]} if kind == "t5" else {}
    torch.manual_seed(seed)  # same dropout masks on both sides in train mode
    return model(input_ids=ids, **extra).logits


def logits(model, kind: str, seed: int = 0) -> torch.Tensor:
    with torch.no_grad():
        return forward(model, kind, seed)


def peft_adapter_grads(model) -> dict[str, torch.Tensor]:
    """peft's adapter gradients under peftlab's names (``...lora_A.default.weight`` -> ``...lora_A.weight``)."""
    names = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            name = name.removeprefix("base_model.model.").replace(".default", "")
            names[name.removesuffix(".weight") if "lora_magnitude_vector" in name else name] = param.grad
    return names


@torch.no_grad()
def perturb(params, seed: int = 1) -> None:
    """Make B (zero at init) and everything else non-trivial, so equal logits mean equal maths."""
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(torch.randn(p.shape, generator=gen) * 0.2)


def peft_warnings(records) -> list[str]:
    """Warnings except transformers' own deprecation notices."""
    return [str(w.message) for w in records if not issubclass(w.category, (FutureWarning, DeprecationWarning))]


@pytest.fixture(params=["llama", "t5"])
def kind(request) -> str:
    return request.param


@pytest.fixture
def base(kind, tiny_llama_dir, tiny_t5_dir):
    return lambda dtype=torch.float32: load_base(kind, tiny_llama_dir, tiny_t5_dir, dtype)


@pytest.mark.parametrize("variant", VARIANTS)
def test_peftlab_adapter_loads_in_peft(kind, base, variant, tmp_path):
    config = LoraConfig(rank=4, alpha=8, dropout=0.1, targets=TARGETS[kind], **VARIANTS[variant])
    ours = apply_lora(base(), config)
    perturb(adapter_parameters(ours).values())
    save_adapter(ours, tmp_path, config)

    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(base(), tmp_path, is_trainable=True).eval()
    assert peft_warnings(records) == []
    assert theirs.peft_config["default"].task_type == TASK[kind]

    assert (logits(ours, kind) - logits(theirs, kind)).abs().max() <= TOL
    ours.train(), theirs.train()  # adapter dropout (and T5's own) active, same masks under the same seed
    assert (logits(ours, kind) - logits(ours, kind, seed=1)).abs().max() > 1e-3  # dropout really is on
    ours_out, theirs_out = forward(ours, kind), forward(theirs, kind)
    assert (ours_out - theirs_out).abs().max() <= TOL
    # Same gradients, too (DoRA's detached norm included).
    ours_out.square().mean().backward()
    theirs_out.square().mean().backward()
    theirs_grads = peft_adapter_grads(theirs)
    ours_grads = {k: p.grad for k, p in adapter_parameters(ours).items()}
    assert ours_grads.keys() == theirs_grads.keys()
    for key, grad in ours_grads.items():
        assert (grad - theirs_grads[key]).abs().max() <= TOL * max(1.0, grad.abs().max().item()), key


@pytest.mark.parametrize("variant", VARIANTS)
def test_peft_adapter_loads_in_peftlab(kind, base, variant, tmp_path):
    theirs = peft.get_peft_model(
        base(),
        peft.LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=0.1,
            target_modules=TARGETS[kind],
            use_rslora=VARIANTS[variant].get("rslora", False),
            use_dora=VARIANTS[variant].get("dora", False),
            task_type=TASK[kind],
        ),
    )
    perturb(p for n, p in theirs.named_parameters() if "lora_" in n)
    theirs.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    if variant == "dora":
        assert any(k.endswith(".lora_magnitude_vector") for k in saved)

    ours = load_adapter(base(), tmp_path)
    assert sum(isinstance(m, LoraLinear) for m in ours.modules()) == len(saved) // (3 if variant == "dora" else 2)
    assert all(not p.requires_grad for p in ours.parameters())  # loaded for inference
    theirs.eval()
    assert (logits(ours, kind) - logits(theirs, kind)).abs().max() <= TOL
    ours.train(), theirs.train()
    assert (logits(ours, kind) - logits(theirs, kind)).abs().max() <= TOL


@pytest.mark.parametrize("variant", VARIANTS)
def test_merged_weights_match_peft(kind, base, variant, tmp_path):
    config = LoraConfig(rank=4, alpha=8, targets=TARGETS[kind], **VARIANTS[variant])
    ours = apply_lora(base(), config)
    perturb(adapter_parameters(ours).values())
    save_adapter(ours, tmp_path, config)
    theirs = peft.PeftModel.from_pretrained(base(), tmp_path).merge_and_unload()
    ours = merge_and_unload(ours)
    theirs_sd = theirs.state_dict()
    assert ours.state_dict().keys() == theirs_sd.keys()
    for key, tensor in ours.state_dict().items():
        assert (tensor - theirs_sd[key]).abs().max() <= TOL, key


@pytest.mark.parametrize("variant", VARIANTS)
def test_parameter_report_matches_peft(kind, base, variant, capsys):
    ours = apply_lora(base(), LoraConfig(rank=4, alpha=8, targets=TARGETS[kind], **VARIANTS[variant]))
    theirs = peft.get_peft_model(
        base(),
        peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=TARGETS[kind],
            use_rslora=VARIANTS[variant].get("rslora", False),
            use_dora=VARIANTS[variant].get("dora", False),
        ),
    )
    report = parameter_report(ours)
    assert (report.trainable, report.total) == theirs.get_nb_trainable_parameters()
    theirs.print_trainable_parameters()
    assert capsys.readouterr().out.strip() == str(report)


def test_default_targets_match_peft(kind, base, tmp_path):
    """No targets: peftlab and peft pick the same layers (the architecture's default) and save alike."""
    ours = apply_lora(base(), LoraConfig(rank=4, alpha=8))
    theirs = peft.get_peft_model(base(), peft.LoraConfig(r=4, lora_alpha=8))
    ours_paths = {n for n, m in ours.named_modules() if isinstance(m, LoraLinear)}
    theirs_paths = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "lora_A")}
    assert ours_paths == theirs_paths and ours_paths
    save_adapter(ours, tmp_path / "ours", LoraConfig(rank=4, alpha=8))
    theirs.save_pretrained(tmp_path / "theirs")
    ours_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs_cfg = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert sorted(ours_cfg["target_modules"]) == sorted(theirs_cfg["target_modules"])
    assert load_file(tmp_path / "ours" / "adapter_model.safetensors").keys() == load_file(
        tmp_path / "theirs" / "adapter_model.safetensors"
    ).keys()


def test_all_linear_matches_peft(kind, base):
    ours = apply_lora(base(), LoraConfig(rank=4, alpha=8, targets="all-linear"))
    theirs = peft.get_peft_model(base(), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    ours_paths = {n for n, m in ours.named_modules() if isinstance(m, LoraLinear)}
    theirs_paths = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "lora_A")}
    assert ours_paths == theirs_paths
    assert not any(p.endswith("lm_head") for p in ours_paths)


def test_layers_and_exclude_round_trip_through_peft(kind, base, tmp_path):
    """``layers`` is saved as peft's layers_to_transform; an ``exclude`` peft's list cannot express, as a regex."""
    pattern = "layers" if kind == "llama" else "block"
    ours_configs = {
        "layers": LoraConfig(rank=4, alpha=8, targets="all-linear", layers="1", dora=True),
        # all targeted layers but the last one: no list of names, with or without layer indices, says that
        "exclude": LoraConfig(
            rank=4, alpha=8, targets=TARGETS[kind], exclude=select_modules(base(), TARGETS[kind])[-1]
        ),
    }
    expected_fields = {
        "layers": lambda f: isinstance(f["target_modules"], list)
        and (f["layers_to_transform"], f["layers_pattern"]) == ([1], pattern),
        "exclude": lambda f: isinstance(f["target_modules"], str) and f["layers_to_transform"] is None,
    }
    for name, config in ours_configs.items():
        ours = apply_lora(base(), config)
        perturb(adapter_parameters(ours).values())
        save_adapter(ours, tmp_path / name, config)
        assert expected_fields[name](json.loads((tmp_path / name / "adapter_config.json").read_text())), name
        theirs = peft.PeftModel.from_pretrained(base(), tmp_path / name).eval()
        assert (logits(ours, kind) - logits(theirs, kind)).abs().max() <= TOL, name
        assert {n for n, m in ours.named_modules() if isinstance(m, LoraLinear)} == {
            n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "lora_A")
        }, name

    # And the other way. peft accepts targets absent from the architecture (here the other model's
    # names) as long as some match, so peftlab must too when it reads a peft file.
    peft_configs = {
        "list": peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q", "v", "wi_0", "wi_1", "q_proj", "v_proj", "up_proj", "gate_proj"],
            exclude_modules=["wi_1", "gate_proj"],
            layers_to_transform=[0],
            layers_pattern=pattern,
        ),
        "regex": peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=r".*\.(q|v|q_proj|v_proj)",
            exclude_modules=r".*(layers|block)\.0\..*",
            use_dora=True,
        ),
    }
    for name, peft_config in peft_configs.items():
        theirs = peft.get_peft_model(base(), peft_config)
        perturb(p for n, p in theirs.named_parameters() if "lora_" in n)
        theirs.save_pretrained(tmp_path / f"peft-{name}")
        ours = load_adapter(base(), tmp_path / f"peft-{name}")
        theirs.eval()
        assert (logits(ours, kind) - logits(theirs, kind)).abs().max() <= TOL, name
        assert {n for n, m in ours.named_modules() if isinstance(m, LoraLinear)} == {
            n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "lora_A")
        }, name


@pytest.mark.parametrize("variant", VARIANTS)
def test_bfloat16_base_matches_peft(kind, base, variant, tmp_path):
    """On a bfloat16 base, both keep float32 adapters and compute the same bfloat16 logits."""
    config = LoraConfig(rank=4, alpha=8, targets=TARGETS[kind], **VARIANTS[variant])
    ours = apply_lora(base(torch.bfloat16), config)
    perturb(adapter_parameters(ours).values())
    save_adapter(ours, tmp_path, config)
    theirs = peft.PeftModel.from_pretrained(base(torch.bfloat16), tmp_path).eval()
    assert {p.dtype for n, p in theirs.named_parameters() if "lora_" in n} == {torch.float32}
    ours_logits, theirs_logits = logits(ours, kind), logits(theirs, kind)
    assert ours_logits.dtype == theirs_logits.dtype == torch.bfloat16
    assert torch.equal(ours_logits, theirs_logits)
