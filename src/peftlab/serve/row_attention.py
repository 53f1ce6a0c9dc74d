"""Decoding attention that reads little of the padding in a batch of prompts of different lengths.

A lane's KV cache is left-padded to its longest row: (B, kv heads, W, dim). Rows of 114 and 392
tokens decoding side by side make attention read the padded width for every row, and at batch 32
attention reads as many bytes per step as the weights. The engine keeps its rows sorted longest
first, so rows of similar length are neighbours; a decoding step then runs attention per group of
``GROUP`` neighbouring rows, over the group's own width only (the last ``L_g`` positions, where
``L_g`` is its first row's length), masking the shorter rows' padding inside the group::

    out[a:b] = softmax(q[a:b] k[a:b, :, W-L_g:]^T * scale + mask_g) v[a:b, :, W-L_g:]

Grouped-query heads are folded into the query axis ((B, H, 1, d) -> (B, H_kv, H / H_kv, d)), as
transformers' sdpa does for one query token, so the cache is never repeated. The engine passes the
groups as ``row_groups`` (:func:`row_groups`) and each row's number of keys as ``row_lengths``;
without them this is transformers' sdpa.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

IMPLEMENTATION = "peftlab_rows"
GROUP = 8  # rows per attention call


def row_groups(lengths: list[int]) -> list[tuple[int, int, int, bool]]:
    """For rows sorted longest first (``lengths``: keys per row): runs of ``GROUP`` rows as (first row,
    end row, width = the first row's length, whether a shorter row needs a mask)."""
    groups = []
    for a in range(0, len(lengths), GROUP):
        b = min(a + GROUP, len(lengths))
        groups.append((a, b, lengths[a], lengths[b - 1] != lengths[a]))
    return groups


def row_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
             **kwargs) -> tuple[torch.Tensor, None]:
    """query (B, H, 1, d), key / value (B, H_kv, W, d) -> (B, 1, H, d), attention per group of rows."""
    groups, lengths = kwargs.get("row_groups"), kwargs.get("row_lengths")  # lengths: (B,) keys per row
    if groups is None or query.shape[2] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    batch, heads, _, dim = query.shape
    kv_heads, width = key.shape[1], key.shape[2]
    folded = query.reshape(batch, kv_heads, heads // kv_heads, dim)  # (B, H_kv, H / H_kv, d)
    out = []
    for a, b, span, masked in groups:
        keys, values = key[a:b, :, width - span :], value[a:b, :, width - span :]  # (n, H_kv, span, d)
        mask = None
        if masked:  # the shorter rows' padding
            mask = (torch.arange(span, device=key.device)[None] >= span - lengths[a:b, None])[:, None, None]  # (n, 1, 1, span)
        out.append(F.scaled_dot_product_attention(folded[a:b], keys, values, attn_mask=mask, scale=scaling))
    return torch.cat(out).reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None  # (B, 1, H, d)


@contextmanager
def row_attention(model: torch.nn.Module) -> Iterator[None]:
    """Use ``row_sdpa`` inside the block (restored after: the implementation is never saved with the model)."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = IMPLEMENTATION
    try:
        yield
    finally:
        config._attn_implementation = previous


AttentionInterface.register(IMPLEMENTATION, row_sdpa)
ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, sdpa_mask)
