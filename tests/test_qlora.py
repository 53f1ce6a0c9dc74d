"""QLoRA: a 4-bit NF4 base with LoRA adapters: logits, training, adapter files, merging, memory."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from peftlab.errors import UserError
from peftlab.models import load_model
from peftlab.peft import (
    LoraConfig,
    LoraLinear,
    adapter_parameters,
    apply_lora,
    load_adapter,
    merge_and_unload,
    save_adapter,
)
from peftlab.peft.nf4 import NF4Linear
from peftlab.peft.qlora import apply_qlora, dequantize_model, quantize_model, weight_storage

VARIANTS = {"lora": {}, "dora": {"dora": True}}


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)  # LoRA's A is drawn from the global generator


def load(model_dir, dtype=torch.float32):
    auto = AutoModelForSeq2SeqLM if "t5" in model_dir.name else AutoModelForCausalLM
    return auto.from_pretrained(model_dir, dtype=dtype).eval()


def batch(model) -> dict[str, torch.Tensor]:
    ids = torch.randint(4, 300, (2, 9), generator=torch.Generator().manual_seed(7))
    if model.config.is_encoder_decoder:
        return {"input_ids": ids, "decoder_input_ids": ids[:, :6], "labels": ids[:, 1:7].contiguous()}
    return {"input_ids": ids, "labels": ids}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in batch(model).items() if k != "labels"}).logits.float()


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


@torch.no_grad()
def perturb(model, scale: float = 0.2, seed: int = 1) -> None:
    """Make B (zero at init) non-zero, so that the adapter changes the output."""
    gen = torch.Generator().manual_seed(seed)
    for p in adapter_parameters(model).values():
        p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * scale)


def nf4_layers(model) -> dict[str, NF4Linear]:
    return {p: m for p, m in model.named_modules() if isinstance(m, NF4Linear)}


def test_every_linear_but_the_head_is_4bit_and_logits_stay_close(tiny_model_dir):
    base = load(tiny_model_dir)
    linear_paths = {p for p, m in base.named_modules() if isinstance(m, nn.Linear)} - {"lm_head"}
    model = quantize_model(load(tiny_model_dir), compute_dtype="float32")
    assert set(nf4_layers(model)) == linear_paths
    assert type(model.get_output_embeddings()) is nn.Linear
    assert torch.equal(model.get_input_embeddings().weight, base.get_input_embeddings().weight)
    assert not any(p.requires_grad for p in model.parameters())

    # The forward pass is exactly the float model holding the dequantised weights ...
    reference = load(tiny_model_dir)
    with torch.no_grad():
        for path, layer in nf4_layers(model).items():
            reference.get_submodule(path).weight.copy_(layer.dequantize(torch.float32))
    out = logits(model)
    torch.testing.assert_close(out, logits(reference), rtol=1e-5, atol=1e-5)
    # ... which is close to the float32 model (4-bit weights: ~9% relative error each).
    error = rel_error(out, logits(base))
    print(f"{tiny_model_dir.name}: NF4 (float32 compute) vs float32 logits, relative error {error:.3f}")
    assert 0 < error < 0.3

    bf16 = quantize_model(load(tiny_model_dir), compute_dtype="bfloat16")
    assert rel_error(logits(bf16), logits(reference)) < 0.03  # bfloat16 rounding on top of the same weights


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_step_changes_only_lora_weights(tiny_model_dir, variant):
    config = LoraConfig(rank=4, alpha=8, targets="all-linear", **VARIANTS[variant])
    model = apply_qlora(load(tiny_model_dir), config, compute_dtype="float32")
    assert all(isinstance(m.base_layer, NF4Linear) for m in model.modules() if isinstance(m, LoraLinear))
    perturb(model)  # B != 0, so A gets a gradient too
    adapter = adapter_parameters(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(k.endswith("base_layer.weight_packed") for k in before)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    model(**batch(model)).loss.backward()
    optimizer.step()

    assert sum(p.requires_grad for p in model.parameters()) == len(adapter)
    for key, tensor in model.state_dict().items():
        if key in adapter:
            assert adapter[key].grad is not None and not torch.equal(tensor, before[key]), key
        else:  # NF4 codes, scales, code books, embeddings, norms: bit-identical
            assert torch.equal(tensor, before[key]), key


def test_adapter_is_a_plain_lora_adapter(tiny_model_dir, tmp_path):
    config = LoraConfig(rank=4, alpha=8, layers="0")  # default targets, first block only: the file must say so
    model = apply_qlora(load(tiny_model_dir), config, compute_dtype="float32")
    perturb(model)
    trained = {k: v.clone() for k, v in adapter_parameters(model).items()}
    save_adapter(model, tmp_path, config)
    fields = json.loads((tmp_path / "adapter_config.json").read_text())
    assert fields["peft_type"] == "LORA" and fields["layers_to_transform"] == [0]

    # On the float32 base, with our loader and with peft's.
    ours = load_adapter(load(tiny_model_dir), tmp_path)
    for key, tensor in adapter_parameters(ours).items():
        assert torch.equal(tensor, trained[key]), key
    theirs = peft.PeftModel.from_pretrained(load(tiny_model_dir), tmp_path).eval()
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)
    error = rel_error(logits(model), logits(ours))
    print(f"{tiny_model_dir.name}: NF4+LoRA vs float32+LoRA logits, relative error {error:.3f}")
    assert 0 < error < 0.5  # the base's quantisation error (the tiny random T5 amplifies it most: 0.33)

    # On a fresh 4-bit base: the trained model again (quantisation is deterministic).
    again = load_adapter(quantize_model(load(tiny_model_dir), "float32"), tmp_path)
    torch.testing.assert_close(logits(again), logits(model), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_then_merge(tiny_model_dir, variant, dtype):
    config = LoraConfig(rank=4, alpha=8, targets="all-linear", **VARIANTS[variant])
    model = apply_qlora(load(tiny_model_dir, dtype), config, compute_dtype=dtype)
    perturb(model, scale=0.05)  # larger updates drive the tiny T5's logits into the hundreds
    unmerged = logits(model)
    with pytest.raises(UserError, match="dequantise"):
        merge_and_unload(model)

    dequantize_model(model)
    assert not nf4_layers(model)
    # bfloat16: merging rounds W + s B A to bfloat16; plain LoRA's bfloat16 merge differs as much (~1e-2).
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert rel_error(logits(model), unmerged) < tol
    merged = merge_and_unload(model)
    linears = [m for m in merged.modules() if isinstance(m, nn.Linear)]
    assert all(type(m) is nn.Linear and m.weight.dtype == dtype for m in linears)
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    assert rel_error(logits(merged), unmerged) < tol


def test_quantise_before_adapters_and_supported_dtypes(tiny_llama_dir):
    with pytest.raises(UserError, match="quantise the base model first"):
        quantize_model(apply_lora(load(tiny_llama_dir), LoraConfig(rank=4)))
    with pytest.raises(UserError, match="compute dtype"):
        quantize_model(load(tiny_llama_dir), compute_dtype="float16")


def test_weight_storage(tiny_llama_dir):
    base = load(tiny_llama_dir)
    float32_bytes = sum(t.numel() * 4 for t in [*base.parameters(), *base.buffers()])
    model = apply_qlora(load(tiny_llama_dir), LoraConfig(rank=4, targets="all-linear"), compute_dtype="float32")
    adapter_bytes = sum(p.numel() * 4 for p in adapter_parameters(model).values())
    report = weight_storage(model)

    layers = nf4_layers(model)
    weights = sum(m.in_features * m.out_features for m in layers.values())
    blocks = [m.in_features * m.out_features // 64 for m in layers.values()]
    assert report.quantized.layers == len(layers) == 14
    assert report.quantized.packed == weights // 2
    assert report.quantized.scales == sum(b + 4 * -(-b // 256) + 4 for b in blocks)
    assert report.quantized.codebooks == len(layers) * (16 + 256) * 4
    assert report.quantized.unquantized == weights * 4
    assert set(report.groups) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert sum(row.layers for row in report.groups.values()) == 14
    # Everything else (embeddings, head, norms, rotary buffers, adapters) is held as is.
    assert report.total_unquantized == float32_bytes + adapter_bytes
    assert report.total == report.quantized.held + float32_bytes + adapter_bytes - weights * 4
    assert "quantised" in str(report)


EMBEDDED_TEXT = (
    "#Person1#: Hi Tom, are we still on for lunch tomorrow at noon?\n"
    "#Person2#: Sorry, I have to move it to Friday. Is that fine with you?\n"
    "#Person1#: Sure, Friday works. Same cafe near the station?"
)


@pytest.mark.slow
def test_embedded_model_in_4bit(embedded_model_dir):
    loaded = load_model(str(embedded_model_dir))
    model, ids = loaded.model, loaded.tokenizer(EMBEDDED_TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    quantize_model(model, compute_dtype="float32")
    report = weight_storage(model)
    assert report.quantized.layers == 7 * model.config.num_hidden_layers
    assert report.quantized.ratio <= 0.3  # measured 0.130
    with torch.no_grad():
        out = model(input_ids=ids).logits
    error, agree = rel_error(out, reference), (out.argmax(-1) == reference.argmax(-1)).float().mean().item()
    print(f"embedded model: storage ratio {report.quantized.ratio:.3f}, logits relative error {error:.3f}, "
          f"top-1 agreement {agree:.2f} over {ids.shape[1]} tokens")
    assert error < 0.4 and agree > 0.7


def test_parameter_report_counts_the_4bit_weights_as_peft_does(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from peftlab.peft import LoraConfig, apply_qlora, parameter_report

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    before = sum(p.numel() for p in base.parameters())
    model = apply_qlora(base, LoraConfig(rank=4), compute_dtype="float32")
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    report = parameter_report(model)
    assert report.trainable == lora and report.total == before + lora


# ---------------------------------------------------------------------------------------------
# Quantising as the weights load (peftlab.peft.nf4_loading)


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_quantised_loading_equals_quantising_after(tiny_model_dir, compute_dtype):
    """load_model(quantize="nf4") reads one layer at a time yet gives quantize_model(load_model(...)) bit for bit."""
    streamed = load_model(str(tiny_model_dir), quantize="nf4", compute_dtype=compute_dtype).model
    after = quantize_model(load_model(str(tiny_model_dir)).model, compute_dtype)
    assert set(nf4_layers(streamed)) == set(nf4_layers(after)) and nf4_layers(streamed)
    ours, ref = streamed.state_dict(), after.state_dict()
    assert ours.keys() == ref.keys()
    for key in ref:
        assert ours[key].dtype == ref[key].dtype and torch.equal(ours[key], ref[key]), key
    # non-persistent buffers (rotary frequencies, ...) are computed, not left on the meta device
    assert all(b.device.type == "cpu" for b in streamed.buffers())
    torch.testing.assert_close(logits(streamed), logits(after), rtol=0, atol=0)


def test_quantised_loading_ties_the_head(tmp_path):
    """A tied output head is not in the checkpoint: it is tied to the loaded embeddings, never left on meta."""
    from tiny import build_llama, build_tokenizer

    tokenizer = build_tokenizer()
    model = build_llama(tokenizer)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    streamed = load_model(str(tmp_path), quantize="nf4", compute_dtype="float32").model
    assert streamed.get_output_embeddings().weight is streamed.get_input_embeddings().weight
    after = quantize_model(load_model(str(tmp_path)).model, "float32")
    torch.testing.assert_close(logits(streamed), logits(after), rtol=0, atol=0)


def test_quantised_loading_falls_back_for_pickled_weights(tmp_path, tiny_llama_dir):
    """A folder without safetensors weights (pytorch_model.bin) loads whole and is quantised after: same model."""
    import shutil

    from peftlab.peft.nf4_loading import load_quantized

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_llama_dir, folder)
    torch.save(load(tiny_llama_dir).state_dict(), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    config = load(tiny_llama_dir).config
    assert load_quantized(AutoModelForCausalLM, config, folder, torch.float32, torch.float32, torch.device("cpu")) is None
    streamed = load_model(str(folder), quantize="nf4", compute_dtype="float32").model
    after = quantize_model(load_model(str(tiny_llama_dir)).model, "float32")
    torch.testing.assert_close(logits(streamed), logits(after), rtol=0, atol=0)


@pytest.mark.parametrize("method,extra", [("qlora", []), ("dora", ["--quantize", "nf4"])])
def test_training_on_a_base_quantised_as_it_loads(method, extra, tiny_llama_dir, tmp_path, monkeypatch):
    """train --method qlora (or --quantize nf4) loads the base through the streaming NF4 loader, never whole."""
    from helpers import losses, write_dialogues

    from peftlab.cli import main
    from peftlab.peft import nf4_loading

    calls = []
    real = nf4_loading.load_quantized
    monkeypatch.setattr(nf4_loading, "load_quantized", lambda *a, **k: calls.append(a) or real(*a, **k))
    monkeypatch.setattr(NF4Linear, "from_linear",
                        classmethod(lambda cls, *a, **k: pytest.fail("a float layer was quantised after loading")))
    data = write_dialogues(tmp_path / "d.jsonl", n=8)
    run = tmp_path / "run"
    assert main(["train", "--model", str(tiny_llama_dir), "--data", str(data), "--out", str(run), "--method", method,
                 "--max-steps", "2", "--batch-size", "4", "--compute-dtype", "float32", "--device", "cpu", *extra]) == 0
    assert len(calls) == 1 and len(losses(run)) == 2
    assert (run / "final" / "adapter_config.json").is_file()
