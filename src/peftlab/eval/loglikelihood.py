"""The one loglikelihood scorer: ``peftlab harness`` and ``peftlab forgetting`` both score with it.

Loglikelihood of a continuation given a context, both already token ids::

    log p(cont | ctx) = Σ_j log softmax(logits_j)[cont_j]      over the continuation tokens cont_j

Callers tokenise: the harness as lm-evaluation-harness's ``HFLM`` does
(:func:`peftlab.eval.harness.scoring.encode_pair`), forgetting reports as training does
(:func:`peftlab.experiment.forgetting.choice_loglikelihoods`). The scoring follows ``HFLM`` (v0.4):

- decoder-only: the model reads ``(ctx + cont)[:-1]``, cut from the left to its last ``max_length``
  tokens (HFLM's ``(ctx + cont)[-(max_length + 1):][:-1]``); the logits at the last ``len(cont)``
  positions predict ``cont``. Requests with the same input share one forward row (HFLM's
  ``logits_cache``): four one-token answers after the same prompt cost one row.
- encoder-decoder: the context (its last ``max_length`` tokens) is the encoder input; the
  continuation is teacher-forced after the decoder start token.

Rows are sorted longest first (HFLM's order), ``batch_size`` rows per forward, right-padded; only the
last positions are turned into logits when the model takes ``logits_to_keep``.

Shared prefix (decoder-only, ``share_prefix``): the token ids every row starts with (an MMLU
subject's description, and with first_n few-shot sampling its five examples too) run through the
model once; their keys and values are expanded to each batch, which then runs only its rows' own
tokens on top (positions continue after the prefix). Causal attention makes this the same
computation: a prefix position never sees what follows it. Only the order of floating-point
sums changes (matmul shapes differ), so log-likelihoods agree with the plain computation to
float rounding (about 1e-6 in float32). The prefix stops before the first position whose logits
any row needs, so every needed logit comes from the batch forward. Not used with soft prompts or
prefixes (virtual tokens sit in front of the input) or models without a KV cache argument.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from peftlab.errors import UserError
from peftlab.progress import ProgressFactory, silent

TokenPair = tuple[list[int], list[int]]
"""``(context ids, continuation ids)``; the continuation is not empty."""


@dataclass
class Loglikelihood:
    logprob: float
    """Σ log p of the continuation tokens."""
    is_greedy: bool
    """True when every continuation token is the argmax at its position."""
    num_tokens: int


@torch.inference_mode()
def continuation_loglikelihoods(
    model,
    pairs: Sequence[TokenPair],
    *,
    is_seq2seq: bool,
    max_length: int,
    pad_id: int,
    batch_size: int = 8,
    share_prefix: bool = True,
    progress: ProgressFactory = silent,
) -> list[Loglikelihood]:
    """``log p(continuation | context)`` of each pair, in order; ``max_length``: input tokens the model reads;
    ``share_prefix``: run the token prefix all rows share once (see the module's docstring)."""
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    model.eval()
    # One forward row per distinct model input; decoder-only pairs sharing ctx + cont[:-1] share a row.
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, cont) in enumerate(pairs):
        key = tuple(ctx + cont[:-1]) if not is_seq2seq else (i,)
        groups.setdefault(key, []).append(i)
    order = sorted(groups.values(), key=lambda members: (-len(pairs[members[0]][0] + pairs[members[0]][1]),
                                                        tuple(pairs[members[0]][0] + pairs[members[0]][1])))

    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    if is_seq2seq:
        steps = (_seq2seq_batch(model, pairs, batch, max_length, pad_id) for batch in batches)
    else:
        # Input: (ctx + cont) without its last token, left-truncated to the model's positions.
        rows = {tuple(m): (pairs[m[0]][0] + pairs[m[0]][1])[-(max_length + 1) :][:-1] for m in order}
        shared = _shared_prefix(model, pairs, rows) if share_prefix else None
        steps = (_causal_batch(model, pairs, [(m, rows[tuple(m)]) for m in batch], pad_id, shared) for batch in batches)
    results: list[Loglikelihood | None] = [None] * len(pairs)
    bar = progress("loglikelihood", len(pairs), "request")
    try:
        for batch, step in zip(batches, steps):
            for index, result in step:
                results[index] = result
            bar.update(sum(len(members) for members in batch))
    finally:
        bar.close()
    return results  # type: ignore[return-value]


def _score(logits: torch.Tensor, cont: list[int]) -> Loglikelihood:
    """``logits``: (len(cont), V) at the positions that predict ``cont``."""
    logprobs = F.log_softmax(logits.float(), dim=-1)  # (C, V)
    target = torch.tensor(cont, device=logits.device)
    picked = logprobs.gather(1, target[:, None]).squeeze(1)  # (C,)
    return Loglikelihood(float(picked.sum()), bool((logprobs.argmax(-1) == target).all()), len(cont))


@dataclass
class _SharedPrefix:
    length: int
    """Tokens every row starts with, already run through the model."""
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    """Per layer (keys, values), each (1, kv_heads, length, head_dim)."""
    cache_arg: str
    """The forward's keyword for a KV cache (``cache`` in transformers 5, ``past_key_values`` before)."""

    def cache(self, model, rows: int) -> DynamicCache:
        """A fresh cache holding the prefix for ``rows`` rows (the forward appends to it, never to ours)."""
        data = [(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in self.layers]
        return DynamicCache(data, config=model.config)


def _shared_prefix(model, pairs: Sequence[TokenPair], rows: dict[tuple[int, ...], list[int]]) -> _SharedPrefix | None:
    """Run the ids all ``rows`` (members -> model input) start with once, up to the first position whose
    logits a row needs."""
    from peftlab.peft.prompt_tuning import virtual_token_count

    cache_arg = next((a for a in ("cache", "past_key_values") if _accepts(model, a)), None)
    if len(rows) < 2 or cache_arg is None or virtual_token_count(model) > 0:
        return None
    first = next(iter(rows.values()))
    length = min(len(row) - max(len(pairs[i][1]) for i in m) for m, row in rows.items())  # before any needed logit
    for row in rows.values():
        length = next((j for j in range(length) if row[j] != first[j]), length)
    if length < 1:
        return None
    cache = DynamicCache(config=model.config)
    ids = torch.tensor([first[:length]], device=_device(model))  # (1, P)
    keep = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **{cache_arg: cache}, **keep)
    return _SharedPrefix(length, [(layer.keys, layer.values) for layer in cache.layers], cache_arg)


def _causal_batch(model, pairs: Sequence[TokenPair], batch: list[tuple[list[int], list[int]]], pad: int,
                  shared: _SharedPrefix | None):
    """``batch``: (members, model input) per row; members share the row, their continuations end it."""
    skip = shared.length if shared is not None else 0
    own = [row[skip:] for _, row in batch]  # each row's tokens after the shared prefix
    ids, mask = _pad_right(own, pad)  # (B, T)
    device = _device(model)
    width = ids.shape[1]
    longest = [max(len(pairs[i][1]) for i in members) for members, _ in batch]
    kwargs = {}
    if shared is not None:
        mask = torch.cat([torch.ones(len(batch), skip, dtype=mask.dtype), mask], dim=1)  # (B, P + T)
        kwargs = {shared.cache_arg: shared.cache(model, len(batch)), "use_cache": True}
    if _accepts(model, "logits_to_keep"):
        # Keep the last positions that any row's continuation needs (rows are right-padded).
        kwargs["logits_to_keep"] = max(width - len(r) + n for r, n in zip(own, longest))
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs).logits  # (B, K, V)
    kept = logits.shape[1]
    for b, (members, _) in enumerate(batch):
        end = kept - (width - len(own[b]))  # the row's last real position (prompt-tuning tokens sit in front)
        for i in members:
            cont = pairs[i][1]
            yield i, _score(logits[b, end - len(cont) : end], cont)


def _seq2seq_batch(model, pairs: Sequence[TokenPair], batch: list[list[int]], limit: int, pad: int):
    start_id = getattr(model.config, "decoder_start_token_id", None)
    start_id = pad if start_id is None else start_id
    device = _device(model)
    enc_ids, enc_mask = _pad_right([pairs[m[0]][0][-limit:] for m in batch], pad)  # (B, S)
    conts = [pairs[m[0]][1][-limit:] for m in batch]
    dec_ids, _ = _pad_right([[start_id] + c[:-1] for c in conts], pad)  # (B, C): teacher forcing
    logits = model(input_ids=enc_ids.to(device), attention_mask=enc_mask.to(device),
                   decoder_input_ids=dec_ids.to(device)).logits  # (B, C, V)
    for b, members in enumerate(batch):
        yield members[0], _score(logits[b, : len(conts[b])], conts[b])


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _accepts(model, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _pad_right(rows: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask
