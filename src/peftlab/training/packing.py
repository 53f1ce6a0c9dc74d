"""Padding-free training: a micro-batch's examples end to end in one row, attention confined to each.

A padded batch of B examples costs B * max_len tokens of compute; on DialogSum (prompts of 118-768
tokens) random batches of 8 are about 60 % padding. Packing them into one row of sum(len_i) tokens
wastes nothing: every linear layer (nearly all the FLOPs) sees real tokens only.

What keeps a packed row equal to the examples run alone (tests/test_training_speed_paths.py):

    positions   ``position_ids`` restart at 0 for each example, so RoPE sees the same positions
    attention   token t of example i attends to tokens s <= t of example i only. transformers builds a
                block-diagonal (T, T) mask from restarting position ids for sdpa/eager, which costs
                O((sum len_i)^2); ``packed_sdpa`` (registered as the attention implementation
                ``peftlab_packed``) instead runs causal SDPA on each example's slice, O(sum len_i^2),
                using the example boundaries ``cu_seq_lens_q`` that transformers forwards to the
                attention function (the flash-attention varlen convention). Without boundaries it is sdpa.
    loss        the label of each example's first token is -100 (it never counts: nothing predicts it),
                so the last token of one example does not learn to predict the next example

Packing needs a decoder-only model whose attention goes through transformers' attention interface
(``_supports_attention_backend``) and no virtual tokens (prompt / prefix tuning prepend per row);
elsewhere the loop keeps padded batches.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

IMPLEMENTATION = "peftlab_packed"


def packed_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                **kwargs) -> tuple[torch.Tensor, None]:
    """Causal SDPA per example of a packed row; plain sdpa when no boundaries are given.

    query (1, H, T, D), key / value (1, H_kv, T, D); returns (1, T, H, D) as transformers' sdpa does.
    """
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    gqa = query.shape[1] != key.shape[1]  # grouped-query attention: SDPA repeats the kv heads itself
    cuts = bounds.tolist()
    out = [F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], dropout_p=dropout,
                                          scale=scaling, is_causal=True, enable_gqa=gqa)  # (1, H, len_i, D)
           for a, b in zip(cuts[:-1], cuts[1:])]
    return torch.cat(out, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register(IMPLEMENTATION, packed_sdpa)
ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, sdpa_mask)


def supports_packing(model: torch.nn.Module, is_seq2seq: bool, virtual_tokens: int) -> bool:
    """Whether ``model`` can train on packed rows (see the module docstring)."""
    config = getattr(model, "config", None)
    return (not is_seq2seq and virtual_tokens == 0 and config is not None
            and getattr(model, "_supports_attention_backend", False)
            and getattr(config, "_attn_implementation", None) in ("sdpa", "eager", IMPLEMENTATION))


@contextmanager
def packed_attention(model: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """Use ``packed_sdpa`` inside the block (the implementation is not saved with the model: restored after)."""
    config = model.config
    previous = config._attn_implementation
    if enabled:
        config._attn_implementation = IMPLEMENTATION
    try:
        yield
    finally:
        config._attn_implementation = previous
