"""peftlab's greedy loop and its cache against transformers' ``generate`` (the texts must not change).

``peftlab.eval.generate`` decodes with its own loop and a cache that writes into a buffer instead
of concatenating; these tests hold it to transformers' greedy ``generate`` on the tiny Llama and
T5 models: plain, with LoRA unmerged and merged, with left padding, without padding, with rows
stopping at different steps, and with a generation config that needs ``generate`` itself.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, DynamicCache

from peftlab.data.encode import encode_prompts
from peftlab.eval.generate import RoomyLayer, generate, plain_greedy, stop_ids
from peftlab.peft import LoraConfig, adapter_parameters, apply_lora, merge_and_unload

PROMPTS = [
    "Summarize the following conversation.",
    "#Person1#: Hi Tom, are we still on for lunch tomorrow at noon? #Person2#: Sorry, I have to move it to Friday.",
    "Paris",
    "It is cold outside. The weather is nice today.",
    "Question: what is the capital of France? Answer:",
]


def load(model_dir):
    auto = AutoModelForSeq2SeqLM if "t5" in model_dir.name else AutoModelForCausalLM
    return auto.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


def with_lora(model, merged: bool):
    model = apply_lora(model, LoraConfig(rank=4, alpha=8, targets="q,k,v,o" if model.config.is_encoder_decoder else "q_proj,k_proj,v_proj,o_proj"))
    with torch.no_grad():
        gen = torch.Generator().manual_seed(3)
        for p in adapter_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)  # non-zero B: the adapter changes the outputs
    return merge_and_unload(model) if merged else model


@torch.no_grad()
def reference(model, tokenizer, prompts, max_new_tokens, batch_size):
    """What peftlab's generate did before its own loop: transformers' greedy generate, cut at the first stop."""
    is_seq2seq = model.config.is_encoder_decoder
    stop = stop_ids(model, tokenizer)
    texts, count = [], 0
    for i in range(0, len(prompts), batch_size):
        batch = encode_prompts(tokenizer, prompts[i : i + batch_size], is_seq2seq=is_seq2seq, chat=False, max_length=512)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                             eos_token_id=stop, pad_token_id=tokenizer.pad_token_id)
        for row in (out[:, 1:] if is_seq2seq else out[:, batch["input_ids"].shape[1] :]).tolist():
            ended = [j for j, t in enumerate(row) if t in stop]
            row = row[: ended[0] + 1] if ended else row
            count += len(row)
            texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts, count


def assert_same_as_generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=3):
    ours = generate(model, tokenizer, prompts, is_seq2seq=model.config.is_encoder_decoder, chat=False,
                    max_new_tokens=max_new_tokens, batch_size=batch_size)
    texts, count = reference(model, tokenizer, prompts, max_new_tokens, batch_size)
    assert ours.texts == texts
    assert ours.new_tokens == count
    return ours


@pytest.mark.parametrize("adapter", ["none", "lora", "lora-merged"])
def test_same_texts_as_transformers_generate(tiny_model_dir, adapter):
    model, tokenizer = load(tiny_model_dir)
    if adapter != "none":
        model = with_lora(model, merged=adapter == "lora-merged")
    assert plain_greedy(model)
    ours = assert_same_as_generate(model, tokenizer, PROMPTS)
    assert len(set(ours.texts)) > 1  # varied outputs, not one repeated string
    if adapter == "lora":
        plain = generate(load(tiny_model_dir)[0], tokenizer, PROMPTS, is_seq2seq=model.config.is_encoder_decoder,
                         chat=False, max_new_tokens=12, batch_size=3)
        assert plain.texts != ours.texts  # the adapter is on the path


def test_rows_stopping_at_different_steps(tiny_model_dir):
    """A stop token the model really produces: rows end early (one in the middle of a batch), the loop too."""
    model, tokenizer = load(tiny_model_dir)
    first = generate(model, tokenizer, PROMPTS, is_seq2seq=model.config.is_encoder_decoder, chat=False,
                     max_new_tokens=12, batch_size=3)
    is_seq2seq = model.config.is_encoder_decoder
    batch = encode_prompts(tokenizer, PROMPTS[:3], is_seq2seq=is_seq2seq, chat=False, max_length=512)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    third = int(out[1, (1 if is_seq2seq else batch["input_ids"].shape[1]) + 2])  # row 1's third new token
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, third]
    ours = assert_same_as_generate(model, tokenizer, PROMPTS)
    assert ours.new_tokens < first.new_tokens


def test_batch_without_padding(tiny_llama_dir):
    """One prompt per batch: no padding, so generate drops the attention mask; so must we."""
    model, tokenizer = load(tiny_llama_dir)
    assert_same_as_generate(with_lora(model, merged=False), tokenizer, PROMPTS[:3], batch_size=1)


def test_generation_config_beyond_plain_greedy_uses_generate(tiny_model_dir):
    model, tokenizer = load(tiny_model_dir)
    plain = generate(model, tokenizer, PROMPTS, is_seq2seq=model.config.is_encoder_decoder, chat=False, max_new_tokens=12)
    model.generation_config.repetition_penalty = 5.0
    assert not plain_greedy(model)
    ours = assert_same_as_generate(model, tokenizer, PROMPTS)
    assert ours.texts != plain.texts  # the penalty was applied


@torch.no_grad()
def test_roomy_cache_gives_the_same_logits_as_dynamic_cache(tiny_llama_dir):
    """Bit for bit, across buffer growth (room 2: the buffer grows every other step), with left padding."""
    model, tokenizer = load(tiny_llama_dir)
    batch = encode_prompts(tokenizer, PROMPTS[:3], is_seq2seq=False, chat=False, max_length=512)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    roomy = DynamicCache(config=model.config)
    roomy.layers = [RoomyLayer(room=2) for _ in roomy.layers]
    caches = {"dynamic": DynamicCache(config=model.config), "roomy": roomy}
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    inputs = {name: (ids, mask, positions) for name in caches}
    for _ in range(7):
        logits = {}
        for name, cache in caches.items():
            step_ids, step_mask, step_positions = inputs[name]
            logits[name] = model(input_ids=step_ids, attention_mask=step_mask, position_ids=step_positions, cache=cache).logits[:, -1]
            token = logits[name].argmax(-1, keepdim=True)  # (B, 1)
            inputs[name] = (token, torch.cat([step_mask, torch.ones_like(token)], 1), step_positions[:, -1:] + 1)
        assert torch.equal(logits["dynamic"], logits["roomy"])
    assert roomy.get_seq_length() == caches["dynamic"].get_seq_length() == ids.shape[1] + 6
