"""Batched greedy generation with the KV cache.

Prompts are formatted exactly as in training (chat template or not), left-padded for
decoder-only models, and decoded until EOS or ``max_new_tokens``.

Decoding is our own short greedy loop rather than transformers' ``generate``, for speed; it makes
the same model calls as ``generate`` does for greedy search, so the tokens are the same:

- decoder-only: position ids ``cumsum(mask) - 1`` (0 on padding), the attention mask dropped when
  a batch has no padding, the head applied to the last position only (``logits_to_keep=1``), then
  one token per step with the mask grown by one and the positions by one;
- encoder-decoder: the encoder once, then the decoder from ``decoder_start_token_id``;
- argmax of the last position's logits; a row that has produced a stop token is fed padding
  afterwards; the loop ends when every row has stopped or after ``max_new_tokens``.

Where the time goes in ``generate`` on a small model on CPU, and what the loop saves:
``DynamicCache`` concatenates every layer's keys and values at every step, copying the whole
cache (B, kv heads, T, head dim) each time, O(T^2) over a generation; our cache writes each step
into a buffer with room for the tokens to come (:class:`RoomyLayer`), so keys and values are
views of the filled part. ``generate`` also spends a few milliseconds a step in logits
processors, stopping criteria and input preparation.

A model whose generation config asks for more than plain greedy search (repetition penalty,
minimum length, suppressed or forced tokens, ...) or whose forward takes no ``cache`` is decoded
by transformers' ``generate``, which implements all of it.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, EncoderDecoderCache

from peftlab.data.encode import pad_prompts, prompt_ids
from peftlab.progress import ProgressFactory, silent


@dataclass
class Generation:
    texts: list[str]
    new_tokens: int  # generated tokens, all prompts together (EOS included, padding excluded)
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def stop_ids(model, tokenizer) -> list[int]:
    """The tokens that end a completion: the tokenizer's EOS and the model's configured ones."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return sorted(i for i in ids if i is not None)


def completion_tokens(row: list[int], stop: list[int]) -> list[int]:
    """A generated row up to and including its first stop token (the padding after it dropped)."""
    ended = next((k for k, t in enumerate(row) if t in stop), None)
    return row if ended is None else row[: ended + 1]


# Generation-config fields that make transformers' greedy search differ from a plain argmax loop,
# with the values that leave it plain (the logits processors and stopping criteria they add).
_PLAIN_GREEDY = {
    "guidance_scale": (None, 1, 1.0),
    "sequence_bias": (None,),
    "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "remove_invalid_values": (None, False),
    "exponential_decay_length_penalty": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "watermarking_config": (None,),
    "renormalize_logits": (None, False),
    "max_time": (None,),
    "stop_strings": (None,),
    "cache_implementation": (None, "dynamic"),
    "prefill_chunk_size": (None,),
    "token_healing": (None, False),
}


def plain_greedy(model) -> bool:
    """Whether our loop decodes ``model`` exactly as ``generate(do_sample=False, num_beams=1)`` does."""
    config = getattr(model, "generation_config", None)
    if config is None or "cache" not in _forward_parameters(model):
        return False
    if not getattr(model, "_supports_default_dynamic_cache", lambda: True)():  # e.g. state-space models
        return False
    return all(getattr(config, name, None) in plain for name, plain in _PLAIN_GREEDY.items())


def _forward_parameters(model) -> frozenset[str]:
    return frozenset(inspect.signature(model.forward).parameters)


class RoomyLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values sit in a buffer with ``room`` positions to spare.

    ``DynamicLayer.update`` is ``keys = cat([keys, new])``: every decoding step copies the layer's
    whole cache. Here an update writes the new positions into the buffer (growing it by the
    positions written plus ``room`` when full) and ``keys`` / ``values`` are views of the filled
    part, (B, heads, T, head dim): the same numbers attention saw before, without the copies.
    """

    def __init__(self, room: int) -> None:
        super().__init__()
        self.room = room
        self._key_buffer: torch.Tensor | None = None  # (B, heads, capacity, head dim)
        self._value_buffer: torch.Tensor | None = None
        self._length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self._length + key_states.shape[-2]
        if self._key_buffer is None or end > self._key_buffer.shape[-2]:
            self._key_buffer = self._grow(self._key_buffer, key_states, end)
            self._value_buffer = self._grow(self._value_buffer, value_states, end)
        self._key_buffer[:, :, self._length : end].copy_(key_states)
        self._value_buffer[:, :, self._length : end].copy_(value_states)
        self._length = end
        self.keys, self.values = self._key_buffer[:, :, :end], self._value_buffer[:, :, :end]
        return self.keys, self.values

    @classmethod
    def holding(cls, key_buffer: torch.Tensor, value_buffer: torch.Tensor, length: int, room: int) -> "RoomyLayer":
        """A layer whose cache is the first ``length`` positions of these buffers (B, heads, capacity, head dim),
        taken as they are (no copy); the rest of the capacity is the room for later positions."""
        layer = cls(room)
        layer.lazy_initialization(key_buffer, value_buffer)
        layer._key_buffer, layer._value_buffer, layer._length = key_buffer, value_buffer, length
        layer.keys, layer.values = key_buffer[:, :, :length], value_buffer[:, :, :length]
        return layer

    def select(self, index: torch.Tensor, trim: int) -> "RoomyLayer":
        """The rows ``index`` of this cache without its first ``trim`` positions, room kept: one copy."""
        keys = self._key_buffer[:, :, trim:].index_select(0, index)  # (len(index), heads, capacity - trim, dim)
        values = self._value_buffer[:, :, trim:].index_select(0, index)
        return RoomyLayer.holding(keys, values, self._length - trim, self.room)

    def _grow(self, buffer: torch.Tensor | None, states: torch.Tensor, end: int) -> torch.Tensor:
        """A buffer with room for ``end + room`` positions, holding what ``buffer`` held."""
        batch, heads, _, dim = states.shape
        grown = states.new_empty(batch, heads, end + self.room, dim)
        if buffer is not None:
            grown[:, :, : self._length].copy_(buffer[:, :, : self._length])
        return grown


def decoder_cache(model, room: int) -> DynamicCache:
    """The cache ``generate`` would make for the decoder, with :class:`RoomyLayer` for its full-attention layers."""
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    if cache.layers and all(type(layer) is DynamicLayer for layer in cache.layers):
        cache.layers = [RoomyLayer(room) for _ in cache.layers]
    return cache


def greedy_tokens(model, batch: dict[str, torch.Tensor], *, max_new_tokens: int, stop: list[int], pad: int,
                  until: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Greedy new tokens for a batch, (B, t) with t <= max_new_tokens; rows that stopped are padded.

    A row stops at a ``stop`` token, or when ``until(generated, rows)`` says so: called after each step
    with the tokens so far of the rows still decoding, (b, t), and their indices in the batch (b,),
    it returns which of them are done (b,) (e.g. a stop string appeared in the decoded text).
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]  # (B, T)
    rows = ids.shape[0]
    parameters = _forward_parameters(model)
    head = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
    if model.config.is_encoder_decoder:
        encoded = model.get_encoder()(input_ids=ids, attention_mask=mask, return_dict=True)
        cache = EncoderDecoderCache(decoder_cache(model, max_new_tokens), DynamicCache(config=model.config.get_text_config(decoder=True)))
        start = model.generation_config.decoder_start_token_id
        start = model.config.decoder_start_token_id if start is None else start
        inputs = {"encoder_outputs": encoded, "attention_mask": mask, "decoder_input_ids": torch.full((rows, 1), start, device=ids.device)}
        step_key = "decoder_input_ids"
    else:
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # (B, T): left padding does not shift positions
        if bool((mask == 1).all()):
            mask = None  # no padding: no mask, as in generate (attention takes its causal path)
        cache = decoder_cache(model, max_new_tokens)
        inputs = {"input_ids": ids, "attention_mask": mask}
        if "position_ids" in parameters:
            inputs["position_ids"] = positions
        step_key = "input_ids"
    stop_tensor = torch.tensor(stop, device=ids.device)
    # A decoder-only model with a RoomyLayer cache drops a row from the batch once it stops (its cache
    # rows cut out, and the left padding no remaining row needs); otherwise a stopped row keeps decoding
    # padding until every row stopped, as transformers' generate does.
    shrink = step_key == "input_ids" and all(type(layer) is RoomyLayer for layer in cache.layers)
    out = torch.full((rows, max_new_tokens), pad, dtype=torch.long, device=ids.device)  # (B, max_new_tokens)
    active = torch.arange(rows, device=ids.device)  # the batch rows still decoding, as rows of ``out``
    stopped = torch.zeros(rows, dtype=torch.bool, device=ids.device)
    steps = 0
    for step in range(max_new_tokens):
        logits = model(**inputs, cache=cache, use_cache=True, **head).logits[:, -1]  # (b, vocab)
        token = logits.argmax(-1).masked_fill(stopped, pad)  # (b,); a stopped row gets padding, as in generate
        out[active, step] = token
        steps = step + 1
        stopped |= torch.isin(token, stop_tensor)
        if until is not None:
            stopped |= until(out[active, :steps], active)
        if bool(stopped.all()):
            break
        inputs[step_key] = token[:, None]  # (b, 1)
        if shrink and bool(stopped.any()):
            keep = (~stopped).nonzero().squeeze(1)  # (b',)
            active, stopped, token = active[keep], stopped[keep], token[keep]
            inputs["input_ids"] = token[:, None]
            trim = 0
            if inputs["attention_mask"] is not None:
                mask = inputs["attention_mask"].index_select(0, keep)  # (b', T)
                trim = int(mask.any(0).long().argmax())  # leading columns that are padding in every kept row
                inputs["attention_mask"] = None if bool(mask[:, trim:].all()) else mask[:, trim:]
            cache.layers = [layer.select(keep, trim) for layer in cache.layers]
            if "position_ids" in inputs:
                inputs["position_ids"] = inputs["position_ids"].index_select(0, keep)
        if not model.config.is_encoder_decoder:
            if inputs["attention_mask"] is not None:
                inputs["attention_mask"] = torch.cat([inputs["attention_mask"], inputs["attention_mask"].new_ones(len(active), 1)], dim=1)
            if "position_ids" in inputs:
                inputs["position_ids"] = inputs["position_ids"][:, -1:] + 1
    return out[:, :steps]


def _reference_tokens(model, batch: dict[str, torch.Tensor], *, max_new_tokens: int, stop: list[int], pad: int) -> torch.Tensor:
    """transformers' greedy ``generate``: the new tokens, (B, t), a seq2seq start token dropped."""
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                         eos_token_id=stop, pad_token_id=pad)
    return out[:, 1:] if model.config.is_encoder_decoder else out[:, batch["input_ids"].shape[1] :]


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    is_seq2seq: bool,
    chat: bool,
    max_new_tokens: int = 96,
    max_length: int = 512,
    batch_size: int = 8,
    progress: ProgressFactory = silent,
) -> Generation:
    """Greedy completions of ``prompts`` (in order).

    Prompts are batched longest first (each batch then pads little: on DialogSum, random batches of 8
    are about half padding), and the texts returned in the order given.
    """
    model.eval()
    device = next(model.parameters()).device
    stop = stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    decode = greedy_tokens if plain_greedy(model) else _reference_tokens
    rows = [prompt_ids(tokenizer, p, is_seq2seq=is_seq2seq, chat=chat, max_length=max_length) for p in prompts]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # stable: equal lengths keep their order
    texts: list[str] = [""] * len(prompts)
    new_tokens = 0
    bar = progress("generating", len(prompts), "prompt")
    start = time.perf_counter()
    for i in range(0, len(order), batch_size):
        members = order[i : i + batch_size]
        batch = pad_prompts([rows[j] for j in members], tokenizer.pad_token_id, is_seq2seq=is_seq2seq)
        batch = {k: v.to(device) for k, v in batch.items()}
        generated = decode(model, batch, max_new_tokens=max_new_tokens, stop=stop, pad=pad)  # (B, T_new)
        for j, row in zip(members, generated.tolist()):
            row = completion_tokens(row, stop)
            new_tokens += len(row)
            texts[j] = tokenizer.decode(row, skip_special_tokens=True).strip()
        bar.update(len(generated), tok_per_s=f"{new_tokens / max(time.perf_counter() - start, 1e-9):.1f}")
    bar.close()
    return Generation(texts, new_tokens, time.perf_counter() - start)
