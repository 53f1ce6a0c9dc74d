"""Tiny random models and a locally trained tokenizer, so the test suite needs no download.

``build_tokenizer()`` trains a byte-level BPE (a few hundred tokens) on a fixed English corpus,
so any text round-trips. ``build_llama`` / ``build_t5`` make 2-layer models of width 64 whose
shapes mirror Llama (q/k/v/o_proj, gate/up/down_proj, RMSNorm) and FLAN-T5 (q/k/v/o, gated-GELU
wi_0/wi_1/wo). ``save_tiny(kind, path)`` writes an HF model folder (weights + tokenizer) that
``peftlab ... --model PATH`` and ``from_pretrained`` load.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

SPECIAL_TOKENS = ["<pad>", "</s>", "<s>", "<unk>"]  # ids 0, 1, 2, 3

_CORPUS = [
    "Summarize the following conversation.",
    "Briefly summarize this dialogue.",
    "What was going on in this conversation?",
    "#Person1#: Hi Tom, are we still on for lunch tomorrow at noon?",
    "#Person2#: Sorry, I have to move it to Friday. Is that fine with you?",
    "Tom and Anna move their lunch from Thursday to Friday at the cafe near the station.",
    "It is cold outside. It is very cold outside. The weather is nice today.",
    "I am very happy to say that I am drinking a warm cup of tea.",
    "The customer asks about the price of a ticket to London and books two seats.",
    "She wants to return the shoes because they are too small; he offers a refund.",
    "positive negative neutral great terrible okay 1 2 3 4 5 stars review rating",
    "def add(a, b): return a + b  # translate into Python print(x * 2)",
    "Question: what is the capital of France? Answer: Paris.",
    "0123456789 , . ! ? ; : ' \" ( ) [ ] { } - + * / = < > @ # $ % & _ \n",
]


def build_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in memory; deterministic."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        bos_token="<s>",
        unk_token="<unk>",
        model_max_length=512,
    )


def build_llama(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def build_t5(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return T5ForConditionalGeneration(config).eval()


def save_tiny(kind: str, path: str | Path, seed: int = 0) -> Path:
    """Write a tiny ``llama`` or ``t5`` model folder (weights + tokenizer) to ``path``."""
    path = Path(path)
    tokenizer = build_tokenizer()
    model = {"llama": build_llama, "t5": build_t5}[kind](tokenizer, seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
