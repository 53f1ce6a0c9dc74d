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
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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
    progress: ProgressFactory = silent,
) -> list[Loglikelihood]:
    """``log p(continuation | context)`` of each pair, in order; ``max_length``: input tokens the model reads."""
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

    results: list[Loglikelihood | None] = [None] * len(pairs)
    step = _seq2seq_batch if is_seq2seq else _causal_batch
    bar = progress("loglikelihood", len(pairs), "request")
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            for index, result in step(model, pairs, batch, max_length, pad_id):
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


def _causal_batch(model, pairs: Sequence[TokenPair], batch: list[list[int]], limit: int, pad: int):
    # Input: (ctx + cont) without its last token, left-truncated to the model's positions.
    rows = [(pairs[m[0]][0] + pairs[m[0]][1])[-(limit + 1) :][:-1] for m in batch]
    ids, mask = _pad_right(rows, pad)  # (B, T)
    device = _device(model)
    width = ids.shape[1]
    longest = [max(len(pairs[i][1]) for i in members) for members in batch]
    kwargs = {}
    if _accepts(model, "logits_to_keep"):
        # Keep the last positions that any row's continuation needs (rows are right-padded).
        kwargs["logits_to_keep"] = max(width - len(r) + n for r, n in zip(rows, longest))
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs).logits  # (B, K, V)
    kept = logits.shape[1]
    for b, members in enumerate(batch):
        end = kept - (width - len(rows[b]))  # the row's last real position (prompt-tuning tokens sit in front)
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
