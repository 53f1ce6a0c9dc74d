"""``peftlab export``: a merged adapter as a GGUF file that transformers' GGUF reader (as llama.cpp) reads back.

The reference is the model with its adapter merged by peftlab; the GGUF file is read back with
``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)``, which undoes the rotary permutation
of q/k and dequantises, so its logits must equal the reference's: to float tolerance for f32, within
the rounding bound of the type for f16 and q8_0.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from helpers import expect_error, write_dialogues
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftlab.cli import main
from peftlab.gguf_export import permute_rotary
from peftlab.models import load_for_inference, load_model
from peftlab.peft import (
    BottleneckConfig,
    IA3Config,
    LoraConfig,
    PromptTuningConfig,
    apply_bottleneck,
    apply_ia3,
    apply_lora,
    apply_prompt_tuning,
    merge_and_unload,
    save_adapter,
)
from peftlab.peft.core import adapter_parameters
from peftlab.peft.ia3 import merge_ia3_and_unload

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
TEXTS = ["Summarize the following conversation.", "#Person1#: Hi Tom, lunch at 12:30?\n#Person2#: Yes!",
         "  two spaces, café ☕ and <s> inside", "</s><pad>0123456789"]

# Bounds on max |logit difference| / max |logit| against the unrounded merged model, for the lossy types.
# Measured on the tiny model with the LoRA below (3 seeds): f16 4.0e-4 - 4.7e-4, q8_0 1.1e-2 - 1.4e-2; set about
# 4x above. f16 keeps 11 significant bits (relative rounding 2^-11 = 4.9e-4 per weight); q8_0 rounds each block
# of 32 weights to 255 levels of its largest magnitude (error up to max|w| / 254 per weight), hence ~25x wider.
# Beyond the bound, the logits must equal those of the merged model whose matrices went through exactly that
# rounding (gguf.quants) to float tolerance: nothing else (names, layout, permutation) may differ.
RELATIVE_BOUND = {"f16": 2e-3, "q8_0": 5e-2}


@pytest.fixture(scope="module")
def chat_llama_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama with a chat template, so the export has one to keep."""
    path = tmp_path_factory.mktemp("chat-llama") / "model"
    shutil.copytree(tiny_llama_dir, path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


def _perturb(model, seed=0, scale=0.05):
    """Move every adapter parameter away from its identity start, so merging changes the logits."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in adapter_parameters(model).values():
            param.add_(scale * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def lora_adapter(chat_llama_dir, tmp_path_factory):
    """A LoRA on every attention and MLP projection (q and k included: the permuted ones), B moved off zero."""
    config = LoraConfig(rank=4, alpha=8, targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    torch.manual_seed(0)  # lora_A's initialisation
    model = _perturb(apply_lora(load_model(str(chat_llama_dir)).model, config))
    return save_adapter(model, tmp_path_factory.mktemp("lora") / "adapter", config, base_model_name_or_path=str(chat_llama_dir))


def _logits(model, tokenizer):
    ids = tokenizer(TEXTS[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**ids).logits


def _read_back(path):
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _rounded(model, kind):
    """The model with each matrix rounded as an export of type ``kind`` stores it (norms stay float32)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    with torch.no_grad():
        for param in model.parameters():
            weight = param.numpy()
            if param.dim() == 2 and (kind == "f16" or weight.shape[-1] % 32):
                param.copy_(torch.from_numpy(weight.astype(np.float16).astype(np.float32)))
            elif param.dim() == 2 and kind == "q8_0":
                q8 = GGMLQuantizationType.Q8_0
                param.copy_(torch.from_numpy(dequantize(quantize(weight, q8), q8).reshape(weight.shape)))
    return model


def _merged_reference(model_dir, adapter):
    loaded = load_for_inference(str(model_dir), str(adapter), "float32", "cpu")
    return merge_and_unload(loaded.model), loaded.tokenizer


def test_permutation_is_what_transformers_reverses():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.randn(2 * 8, 5).numpy()  # 2 heads of size 8
    back = LlamaTensorProcessor()._reverse_permute_weights(permute_rotary(w, 2), 2, 2)
    assert (back == w).all() and not (permute_rotary(w, 2) == w).all()


@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0"])
def test_lora_export_loads_with_the_merged_logits(kind, chat_llama_dir, lora_adapter, tmp_path, capsys):
    out = tmp_path / f"model-{kind}.gguf"
    assert main(["export", "--model", str(chat_llama_dir), "--adapter", str(lora_adapter), "--out", str(out), "--type", kind]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith(f"LORA adapter {lora_adapter} merged; 21 tensors ({kind})") and summary.endswith(str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temporary file left

    reference, tokenizer = _merged_reference(chat_llama_dir, lora_adapter)
    base = _logits(load_model(str(chat_llama_dir)).model, tokenizer)
    model, _ = _read_back(out)
    expected, got = _logits(reference, tokenizer), _logits(model, tokenizer)
    assert (expected - base).abs().max() > 0.01  # the adapter matters: a lost merge would fail below
    assert not model.config.tie_word_embeddings
    if kind == "f32":
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    else:
        relative = (got - expected).abs().max().item() / expected.abs().max().item()
        assert relative < RELATIVE_BOUND[kind], relative
        torch.testing.assert_close(got, _logits(_rounded(reference, kind), tokenizer), rtol=1e-5, atol=1e-5)


def test_tokenizer_and_chat_template_round_trip(chat_llama_dir, tmp_path):
    out = tmp_path / "model.gguf"
    assert main(["export", "--model", str(chat_llama_dir), "--out", str(out), "--type", "f32"]) == 0
    original = AutoTokenizer.from_pretrained(chat_llama_dir)
    _, tokenizer = _read_back(out)
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == original(text)["input_ids"], text
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.chat_template == CHAT_TEMPLATE
    messages = [{"role": "user", "content": "Hi Tom, lunch at noon?"}]
    assert (tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            == original.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (2, 1, 0)


def test_ia3_merges_and_exports(chat_llama_dir, tmp_path):
    """(IA)^3 folds into the weights (rows of k/v, columns of down_proj): the GGUF logits equal the unmerged adapter's."""
    model = _perturb(apply_ia3(load_model(str(chat_llama_dir)).model, IA3Config()), scale=0.3)
    adapter = save_adapter(model, tmp_path / "ia3", IA3Config())
    loaded = load_for_inference(str(chat_llama_dir), str(adapter), "float32", "cpu")
    unmerged = _logits(loaded.model, loaded.tokenizer)
    torch.testing.assert_close(_logits(merge_ia3_and_unload(loaded.model), loaded.tokenizer), unmerged, rtol=1e-5, atol=1e-5)

    out = tmp_path / "ia3.gguf"
    assert main(["export", "--model", str(chat_llama_dir), "--adapter", str(adapter), "--out", str(out), "--type", "f32"]) == 0
    torch.testing.assert_close(_logits(_read_back(out)[0], loaded.tokenizer), unmerged, rtol=1e-5, atol=1e-5)


def test_exported_file_is_a_peftlab_model_too(chat_llama_dir, tmp_path):
    """peftlab loads its own export (--model FILE.gguf) with the same logits, and will not overwrite its input."""
    out = tmp_path / "model.gguf"
    assert main(["export", "--model", str(chat_llama_dir), "--out", str(out), "--type", "f32"]) == 0
    original = load_model(str(chat_llama_dir))
    torch.testing.assert_close(_logits(load_model(str(out)).model, original.tokenizer),
                               _logits(original.model, original.tokenizer), rtol=1e-5, atol=1e-5)


def _save_other(kind, model_dir, path):
    model = load_model(str(model_dir)).model
    if kind == "bottleneck":
        config = BottleneckConfig(reduction_factor=8)
        model = apply_bottleneck(model, config)
    else:
        config = PromptTuningConfig(num_virtual_tokens=4)
        model = apply_prompt_tuning(model, config)
    return save_adapter(model, path, config)


@pytest.mark.parametrize("kind, peft_type", [("bottleneck", "BOTTLENECK"), ("prompt", "PROMPT_TUNING")])
def test_unmergeable_adapters_are_refused(kind, peft_type, chat_llama_dir, tmp_path, capsys):
    adapter = _save_other(kind, chat_llama_dir, tmp_path / kind)
    out = tmp_path / "model.gguf"
    message = expect_error(["export", "--model", str(chat_llama_dir), "--adapter", str(adapter), "--out", str(out)], capsys)
    assert f"cannot export a {peft_type} adapter to GGUF" in message and "LoRA/DoRA and (IA)^3" in message
    assert not out.exists()


def test_refusals(chat_llama_dir, tiny_t5_dir, tmp_path, capsys):
    out = tmp_path / "model.gguf"
    message = expect_error(["export", "--model", str(tiny_t5_dir), "--out", str(out)], capsys)
    assert "Llama-architecture" in message and "t5" in message
    assert not out.exists()

    out.write_bytes(b"old")
    message = expect_error(["export", "--model", str(chat_llama_dir), "--out", str(out)], capsys)
    assert "already exists" in message and "--overwrite" in message
    assert out.read_bytes() == b"old"

    message = expect_error(["export", "--model", str(out), "--out", str(out), "--overwrite"], capsys)
    assert "is one of the inputs" in message

    message = expect_error(["export", "--model", str(chat_llama_dir), "--out", str(tmp_path / "model.bin")], capsys)
    assert "must be a .gguf file name" in message
    message = expect_error(["export", "--model", str(chat_llama_dir), "--out", str(out), "type=q4_0"], capsys)
    assert "q4_0" in message

    assert main(["export", "--model", str(chat_llama_dir), "--out", str(out), "--overwrite", "--type", "f16"]) == 0
    assert out.read_bytes()[:4] == b"GGUF"


@pytest.mark.slow
def test_embedded_model_with_a_trained_lora_exports_f16(embedded_model_dir, tmp_path, capsys):
    import peftlab

    data = write_dialogues(tmp_path / "dialogues.jsonl", n=16)
    result = peftlab.train(model=str(embedded_model_dir), data=str(data), out=str(tmp_path / "run"), method="lora",
                           targets="q_proj,k_proj,v_proj,o_proj", max_steps=2, lr=5e-3, batch_size=2, limit=8,
                           max_length=96, max_target_length=32, device="cpu", warmup_ratio=0.0)
    out = tmp_path / "sum.gguf"
    assert main(["export", "--model", str(embedded_model_dir), "--adapter", str(result.final_dir), "--out", str(out),
                 "--type", "f16"]) == 0
    reference, tokenizer = _merged_reference(embedded_model_dir, result.final_dir)
    model, gguf_tokenizer = _read_back(out)
    assert model.config.tie_word_embeddings and model.config.num_hidden_layers == 30
    for text in TEXTS:
        assert gguf_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"], text
    assert gguf_tokenizer.chat_template == tokenizer.chat_template
    expected, got = _logits(reference, tokenizer), _logits(model, tokenizer)
    assert (got - expected).abs().max().item() / expected.abs().max().item() < RELATIVE_BOUND["f16"]
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.95
