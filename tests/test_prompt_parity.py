"""Prompt tuning, (IA)^3 and prefix tuning against HF peft (the reference), both ways through the files.

An adapter saved by peftlab loads in ``peft.PeftModel`` and one saved by peft loads in peftlab, and
both give the same logits (1e-5) on a padded batch. peft's decoder-only outputs include the N
virtual positions, so its logits are compared from position N on; padded positions are left out
(their outputs are never used, and the two place them differently).
"""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from tiny import build_llama, build_t5, build_tokenizer

from peftlab.peft import (
    IA3Config,
    IA3Linear,
    PrefixConfig,
    PromptTuningConfig,
    adapter_parameters,
    apply_ia3,
    apply_prefix,
    apply_prompt_tuning,
    load_adapter,
    parameter_report,
    save_adapter,
)

TOL = 1e-5
TOKENIZER = build_tokenizer()
TASK = {"llama": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM"}
N = 4


@pytest.fixture(params=["llama", "t5"])
def kind(request) -> str:
    return request.param


def base(kind: str):
    return {"llama": build_llama, "t5": build_t5}[kind](TOKENIZER)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(4, 300, (2, 9), generator=torch.Generator().manual_seed(123))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding on the second row
    return ids * mask, mask


@torch.no_grad()
def logits(model, kind: str, virtual: int = 0) -> torch.Tensor:
    """Logits at the real, attended positions: (tokens, V). ``virtual``: leading positions to drop (peft's)."""
    ids, mask = batch()
    if kind == "t5":
        return model(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :5]).logits.flatten(0, 1)
    return model(input_ids=ids, attention_mask=mask).logits[:, virtual:][mask.bool()]


def peft_warnings(records) -> list[str]:
    return [str(w.message) for w in records if not issubclass(w.category, (FutureWarning, DeprecationWarning))]


@torch.no_grad()
def perturb(params, seed: int = 1, scale: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(torch.randn(p.shape, generator=gen) * scale)


# ---------------------------------------------------------------------------------------------
# Prompt tuning


def test_prompt_tuning_peftlab_to_peft(kind, tmp_path):
    config = PromptTuningConfig(num_virtual_tokens=N, prompt_init="vocab")
    ours = apply_prompt_tuning(base(kind), config, TOKENIZER)
    save_adapter(ours, tmp_path, config)
    assert load_file(tmp_path / "adapter_model.safetensors").keys() == {"prompt_embeddings"}
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(base(kind), tmp_path).eval()
    assert peft_warnings(records) == []
    assert theirs.peft_config["default"].task_type == TASK[kind]
    virtual = N if kind == "llama" else 0
    assert (logits(ours, kind) - logits(theirs, kind, virtual)).abs().max() <= TOL
    assert (logits(ours, kind) - logits(base(kind), kind)).abs().max() > 1e-2  # the prompt matters


def test_prompt_tuning_peft_to_peftlab(kind, tmp_path):
    """peft's own defaults, including two prompt halves for T5 (num_transformer_submodules=2, one unused)."""
    theirs = peft.get_peft_model(base(kind), peft.PromptTuningConfig(task_type=TASK[kind], num_virtual_tokens=N))
    theirs.save_pretrained(tmp_path)
    rows = load_file(tmp_path / "adapter_model.safetensors")["prompt_embeddings"].shape[0]
    assert rows == (2 * N if kind == "t5" else N)
    ours = load_adapter(base(kind), tmp_path)
    assert parameter_report(ours).total == theirs.get_nb_trainable_parameters()[1]
    theirs.eval()
    virtual = N if kind == "llama" else 0
    assert (logits(ours, kind) - logits(theirs, kind, virtual)).abs().max() <= TOL


def test_prompt_tuning_parameter_count_matches_peft(kind):
    ours = apply_prompt_tuning(base(kind), PromptTuningConfig(num_virtual_tokens=N, num_transformer_submodules=1))
    theirs = peft.get_peft_model(
        base(kind), peft.PromptTuningConfig(task_type=TASK[kind], num_virtual_tokens=N, num_transformer_submodules=1)
    )
    report = parameter_report(ours)
    assert (report.trainable, report.total) == theirs.get_nb_trainable_parameters()


def test_prompt_tuning_text_init_matches_peft(tmp_path):
    """TEXT init: the text's token embeddings, repeated to N rows (our tokenizer adds no special tokens here)."""
    TOKENIZER.save_pretrained(tmp_path)
    text = "Summarize the dialogue"
    config = PromptTuningConfig(num_virtual_tokens=7, prompt_init="text", prompt_init_text=text)
    ours = apply_prompt_tuning(base("llama"), config, TOKENIZER)
    theirs = peft.get_peft_model(base("llama"), peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=7, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
        tokenizer_name_or_path=str(tmp_path)))
    assert torch.equal(ours.prompt_encoder.embedding.weight, theirs.prompt_encoder["default"].embedding.weight)


# ---------------------------------------------------------------------------------------------
# (IA)^3


def test_ia3_peftlab_to_peft(kind, tmp_path):
    ours = apply_ia3(base(kind), IA3Config())
    perturb(adapter_parameters(ours).values())
    save_adapter(ours, tmp_path, IA3Config())
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(base(kind), tmp_path).eval()
    assert peft_warnings(records) == []
    assert (logits(ours, kind) - logits(theirs, kind)).abs().max() <= TOL
    assert (logits(ours, kind) - logits(base(kind), kind)).abs().max() > 1e-2  # the vectors matter
    theirs_paths = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "ia3_l")}
    assert {n for n, m in ours.named_modules() if isinstance(m, IA3Linear)} == theirs_paths


def test_ia3_peft_to_peftlab(kind, tmp_path):
    theirs = peft.get_peft_model(base(kind), peft.IA3Config(task_type=TASK[kind]))
    perturb(p for n, p in theirs.named_parameters() if "ia3_l" in n)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(base(kind), tmp_path)
    theirs.eval()
    assert (logits(ours, kind) - logits(theirs, kind)).abs().max() <= TOL
    report = parameter_report(apply_ia3(base(kind), IA3Config()))
    assert (report.trainable, report.total) == theirs.get_nb_trainable_parameters()


def test_ia3_config_matches_peft(kind, tmp_path):
    save_adapter(apply_ia3(base(kind), IA3Config()), tmp_path / "ours", IA3Config())
    peft.get_peft_model(base(kind), peft.IA3Config(task_type=TASK[kind])).save_pretrained(tmp_path / "theirs")
    ours, theirs = (json.loads((tmp_path / w / "adapter_config.json").read_text()) for w in ("ours", "theirs"))
    assert sorted(ours["target_modules"]) == sorted(theirs["target_modules"])
    assert sorted(ours["feedforward_modules"]) == sorted(theirs["feedforward_modules"])
    shapes = {k: v.shape for k, v in load_file(tmp_path / "ours" / "adapter_model.safetensors").items()}
    assert shapes == {k: v.shape for k, v in load_file(tmp_path / "theirs" / "adapter_model.safetensors").items()}


def test_ia3_custom_targets_round_trip(tmp_path):
    """A feed-forward set that is not the default, and an exclusion peft's name lists cannot express."""
    config = IA3Config(targets=["q", "v", "wi_0", "wo"], feedforward=["wo", "wi_0"], exclude="decoder.block.1.layer.0.SelfAttention.v")
    ours = apply_ia3(base("t5"), config)
    perturb(adapter_parameters(ours).values())
    save_adapter(ours, tmp_path, config)
    theirs = peft.PeftModel.from_pretrained(base("t5"), tmp_path).eval()
    assert (logits(ours, "t5") - logits(theirs, "t5")).abs().max() <= TOL
    reloaded = load_adapter(base("t5"), tmp_path)
    assert (logits(ours, "t5") - logits(reloaded, "t5")).abs().max() <= TOL


# ---------------------------------------------------------------------------------------------
# Prefix tuning (decoder-only)


def test_prefix_peftlab_to_peft(tmp_path):
    config = PrefixConfig(num_virtual_tokens=N, projection_hidden=32)  # trained through its MLP, saved folded
    ours = apply_prefix(base("llama"), config)
    perturb(adapter_parameters(ours).values(), scale=0.1)
    save_adapter(ours, tmp_path, config)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in saved.items()} == {"prompt_embeddings": (N, 2 * 2 * 32)}  # L * 2 * kv_dim
    assert json.loads((tmp_path / "adapter_config.json").read_text())["prefix_projection"] is False
    theirs = peft.PeftModel.from_pretrained(base("llama"), tmp_path).eval()
    assert (logits(ours, "llama") - logits(theirs, "llama")).abs().max() <= TOL


def test_prefix_peft_to_peftlab(tmp_path):
    theirs = peft.get_peft_model(
        base("llama"), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, prefix_projection=True)
    )
    perturb((p for n, p in theirs.named_parameters() if p.requires_grad), scale=0.1)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(base("llama"), tmp_path)
    theirs.eval()
    assert (logits(ours, "llama") - logits(theirs, "llama")).abs().max() <= TOL
    assert (logits(ours, "llama") - logits(base("llama"), "llama")).abs().max() > 1e-3
