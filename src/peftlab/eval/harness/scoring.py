"""Score prompts with a model the way lm-evaluation-harness's ``HFLM`` does (v0.4).

Loglikelihoods: requests ``(context, continuation)`` are tokenised here, as ``HFLM._encode_pair``
does, and scored by :func:`peftlab.eval.loglikelihood.continuation_loglikelihoods` (HFLM's
truncation, batching and ``logits_cache``; also the scorer of forgetting reports).

Tokenisation: trailing spaces of the context move to the front of the continuation; a
decoder-only model encodes ``context + continuation`` whole and the continuation is what follows
the tokens of the context alone (so merges across the boundary are kept); an encoder-decoder (T5)
encodes the context for the encoder (with the tokenizer's special tokens, e.g. T5's ``</s>``) and
the continuation for the decoder without special tokens. Special tokens are whatever the
tokenizer adds by default (``add_bos_token`` unset, as in HFLM), except that text already starting
with the prefix token is encoded without them. An empty context is replaced by the prefix token
(BOS, else EOS).

Generation is greedy until any stop string appears in the decoded continuation (or EOS, or
``max_gen_toks``); the text is cut before the first stop string, stop strings taken in order
(HFLM's ``postprocess_generated_text``), with the EOS text added to them. A decoder-only model
decodes in peftlab's greedy loop (:func:`peftlab.eval.generate.greedy_tokens`: the tokens of
transformers' ``generate``, and a row that is done leaves the batch); others call ``generate``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from peftlab.errors import UserError
from peftlab.eval.generate import greedy_tokens, plain_greedy, stop_ids
from peftlab.eval.loglikelihood import Loglikelihood, continuation_loglikelihoods
from peftlab.progress import ProgressFactory, silent

_DEFAULT_MAX_LENGTH = 2048  # HFLM's fallback when neither config nor tokenizer says
_TOKENIZER_INFINITY = 1000000000000000019884624838656


@dataclass
class Generations:
    texts: list[str]
    """Continuations, cut before the first stop string, in request order."""
    new_tokens: list[int]
    """Tokens generated per request until it stopped (stop string, EOS or the limit)."""
    seconds: float


# -------------------------------------------------------------------------------------- tokenising


def prefix_token_id(tokenizer) -> int | None:
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode(tokenizer, text: str, add_special_tokens: bool | None = None) -> list[int]:
    """HFLM's ``tok_encode``: the tokenizer's default special tokens, unless the text starts with the prefix token."""
    if add_special_tokens is None:
        prefix = prefix_token_id(tokenizer)
        if prefix is not None and text.startswith(tokenizer.decode(prefix)):
            add_special_tokens = False
    kwargs = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
    return tokenizer.encode(text, **kwargs)


def encode_pair(tokenizer, context: str, continuation: str, is_seq2seq: bool) -> tuple[list[int], list[int]]:
    """Token ids of ``(context, continuation)`` as HFLM's ``loglikelihood`` makes them."""
    if context == "":
        cont = encode(tokenizer, continuation, add_special_tokens=False)
        prefix = prefix_token_id(tokenizer)
        if cont and prefix == cont[0]:
            return cont[:1], cont[1:]
        return [prefix], cont
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    ctx = encode(tokenizer, context)
    if is_seq2seq:
        return ctx, encode(tokenizer, continuation, add_special_tokens=False)
    whole = encode(tokenizer, context + continuation)
    return ctx, whole[len(ctx) :]


def max_length(model, tokenizer) -> int:
    """Input tokens that fit: the context length HFLM assumes (the config's positions, else the
    tokenizer's, else 2048), less the positions a soft prompt or prefix adapter puts in front."""
    from peftlab.peft.prompt_tuning import virtual_token_count

    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    found = [getattr(config, attr, None) for attr in ("n_positions", "max_position_embeddings", "n_ctx")]
    model_max = getattr(tokenizer, "model_max_length", None)
    if model_max is not None and model_max < _TOKENIZER_INFINITY:
        found.append(model_max)
    length = next((int(v) for v in found if v is not None), _DEFAULT_MAX_LENGTH)
    return length - virtual_token_count(model)


# ---------------------------------------------------------------------------------- loglikelihood


def loglikelihoods(
    model,
    tokenizer,
    requests: Sequence[tuple[str, str]],
    *,
    is_seq2seq: bool,
    batch_size: int = 8,
    share_prefix: bool = True,
    progress: ProgressFactory = silent,
) -> list[Loglikelihood]:
    """``log p(continuation | context)`` for each ``(context, continuation)``, in request order
    (``share_prefix``: see :func:`~peftlab.eval.loglikelihood.continuation_loglikelihoods`)."""
    limit = max_length(model, tokenizer)
    encoded = [encode_pair(tokenizer, ctx, cont, is_seq2seq) for ctx, cont in requests]
    for (ctx_text, cont_text), (_, cont) in zip(requests, encoded):
        if not cont:
            raise UserError(f"the continuation {cont_text!r} is empty after tokenisation (context ends {ctx_text[-40:]!r})")
        if len(cont) > limit:
            raise UserError(f"a continuation of {len(cont)} tokens is longer than the model's {limit} positions")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return continuation_loglikelihoods(model, encoded, is_seq2seq=is_seq2seq, max_length=limit, pad_id=pad,
                                       batch_size=batch_size, share_prefix=share_prefix, progress=progress)


# -------------------------------------------------------------------------------------- generation


class _StopStrings(StoppingCriteria):
    """Marks a row done once any stop string appears in its decoded continuation (special tokens kept)."""

    def __init__(self, tokenizer, stops: list[str], start: int, batch: int) -> None:
        self.tokenizer, self.stops, self.start = tokenizer, [s for s in stops if s], start
        self.stopped_at: list[int | None] = [None] * batch

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        """transformers' ``generate``: the whole batch, prompts included, (B, T + t)."""
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return self.mark(input_ids[:, self.start :], rows)

    def mark(self, generated: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` (b,) of the batch have generated ``generated`` (b, t): which of them are done (b,)."""
        done = []
        for i, text in zip(rows.tolist(), self.tokenizer.batch_decode(generated)):
            if self.stopped_at[i] is None and any(s in text for s in self.stops):
                self.stopped_at[i] = generated.shape[1]
            done.append(self.stopped_at[i] is not None)
        return torch.tensor(done, dtype=torch.bool, device=generated.device)


def stop_sequences(tokenizer, until: Sequence[str]) -> list[str]:
    """The task's stop strings plus the EOS text (HFLM's ``handle_stop_sequences``)."""
    stops = list(until)
    if tokenizer.eos_token_id is not None:
        eos = tokenizer.decode(tokenizer.eos_token_id, skip_special_tokens=False)
        if eos not in stops:
            stops.append(eos)
    return stops


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    for stop in stops:
        if stop:
            text = text.split(stop)[0]
    return text


@torch.inference_mode()
def generate_until(
    model,
    tokenizer,
    contexts: Sequence[str],
    *,
    is_seq2seq: bool,
    until: Sequence[str],
    max_gen_toks: int,
    batch_size: int = 8,
    progress: ProgressFactory = silent,
) -> Generations:
    """Greedy continuations of ``contexts``, each cut before the first of ``until`` (or EOS)."""
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    if max_gen_toks < 1:
        raise UserError(f"max_gen_toks must be >= 1, got {max_gen_toks}")
    model.eval()
    device = next(model.parameters()).device
    stops = stop_sequences(tokenizer, until)
    limit = max_length(model, tokenizer)
    max_ctx = limit if is_seq2seq else limit - max_gen_toks
    if max_ctx <= 0:
        raise UserError(f"max_gen_toks {max_gen_toks} leaves no room for a prompt in the model's {limit} positions")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    ours = not is_seq2seq and plain_greedy(model)  # else transformers' generate
    stop = stop_ids(model, tokenizer)

    # Longest prompt first (HFLM's order), so a batch holds prompts of similar length.
    order = sorted(range(len(contexts)), key=lambda i: (-len(encode(tokenizer, contexts[i])), contexts[i]))
    texts: list[str] = [""] * len(contexts)
    counts: list[int] = [0] * len(contexts)
    bar = progress("generating", len(contexts), "prompt")
    begin = time.perf_counter()
    saved_side = tokenizer.padding_side
    try:
        tokenizer.padding_side = "left"
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            prompts = [contexts[i] for i in batch]
            special = {}
            if not is_seq2seq and tokenizer.bos_token and prompts[0].startswith(tokenizer.bos_token):
                special = {"add_special_tokens": False}
            enc = tokenizer(prompts, padding="longest", return_tensors="pt", **special)
            ids, mask = enc["input_ids"][:, -max_ctx:], enc["attention_mask"][:, -max_ctx:]  # (B, T), left-truncated
            start_len = 1 if is_seq2seq else ids.shape[1]  # generated tokens begin after this many
            criteria = _StopStrings(tokenizer, stops, start_len, len(batch))
            if ours:  # the same greedy tokens; a row leaves the batch as soon as it is done
                generated = greedy_tokens(model, {"input_ids": ids.to(device), "attention_mask": mask.to(device)},
                                          max_new_tokens=max_gen_toks, stop=stop, pad=pad, until=criteria.mark)  # (B, t)
            else:
                out = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    max_new_tokens=max_gen_toks,
                    do_sample=False,
                    num_beams=1,
                    stopping_criteria=StoppingCriteriaList([criteria]),
                    pad_token_id=pad,
                    use_cache=True,
                )
                generated = out[:, start_len:] if not is_seq2seq else out  # (B, t); seq2seq keeps its start token
            for row, (i, tokens) in enumerate(zip(batch, generated.tolist())):
                texts[i] = cut_at_stops(tokenizer.decode(tokens, skip_special_tokens=True), stops)
                body = tokens[1:] if is_seq2seq else tokens
                n = len(body)
                if eos is not None and eos in body:
                    n = min(n, body.index(eos) + 1)
                if criteria.stopped_at[row] is not None:
                    n = min(n, criteria.stopped_at[row])
                counts[i] = n
            bar.update(len(batch))
    finally:
        tokenizer.padding_side = saved_side
        bar.close()
    return Generations(texts, counts, time.perf_counter() - begin)
