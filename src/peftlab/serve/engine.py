"""Continuous batching: requests join a running batch between decoding steps, whatever their adapter.

One thread owns the model. Each turn of its loop it drops cancelled rows, admits waiting requests
(up to ``max_batch`` rows), and runs one decoding step for every lane that has rows:

- the shared lane holds the base model with mixed LoRA layers: rows of the base, of any LoRA adapter
  and of any prompt-tuning adapter decode together (:mod:`peftlab.serve.mixed_lora`);
- an adapter that changes the layers themselves (DoRA, (IA)^3, ...) has its own lane and model
  (:mod:`peftlab.serve.adapters`).

Requests admitted together are prefilled together, padding-free: their prompts (each with its soft
prompt in front when it has one) end to end in one packed row, positions restarting at 0 for each and
attention confined to each (:mod:`peftlab.training.packing`), so a prompt's keys and values are those
of a forward over it alone, and every linear layer runs one large matmul instead of one per request.
(A model that cannot run packed rows prefills each request alone.) The new rows' KV caches join the
lane's, all left-padded to the longest; a finished or cancelled row is cut out of the cache. Each row keeps its
own position (its tokens so far, virtual ones included), so padding never shifts positions, as in
:func:`peftlab.eval.generate.generate`. Decoding is greedy (argmax) at temperature 0, else sampled
with temperature and nucleus (top-p) filtering from the row's own seeded generator.

    engine = Engine(load_model("smollm2-135m-instruct"), {"sum": Path("runs/sum/final")})
    engine.start()
    engine.submit(Request("sum", ids, Sampling(max_tokens=64), on_event=print))
"""

from __future__ import annotations

import random
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from peftlab.errors import UserError
from peftlab.eval.generate import RoomyLayer, decoder_cache, stop_ids
from peftlab.models import LoadedModel
from peftlab.serve.adapters import Adapter, AdapterBusy, AdapterSet, lora_rank
from peftlab.serve.mixed_lora import RowAdapters
from peftlab.serve.row_attention import row_attention, row_groups
from peftlab.training.packing import packed_attention, supports_packing

BASE = None  # the adapter name of a request for the base model
PACK_TOKENS = 4096  # at most this many prompt tokens in one packed prefill forward


@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # strings that end the completion (not included in it)


@dataclass(eq=False)
class Request:
    adapter: str | None  # an operator's adapter name, or BASE
    prompt_ids: list[int]
    sampling: Sampling
    on_event: Callable[[str, str | None], None]
    """Called from the engine thread with (new text, finish reason or None) when either changes.
    The finish reason is "stop", "length", "cancelled" or "error: MESSAGE"."""
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # the text sent so far
    finish_reason: str | None = None
    cancelled: bool = False


class QueueFull(Exception):
    """More requests wait than the queue holds."""


@dataclass(eq=False)
class _Row:
    request: Request
    adapter: Adapter | None
    length: int  # positions in the cache that are this row's (virtual tokens included)
    next_token: int
    generator: torch.Generator | None
    done: bool = False  # finished or cancelled; its cache rows wait for the next compaction


class _Lane:
    """Rows that decode together on one model, and their KV cache, left-padded to a common length.

    A row that finishes is marked done and stays in the cache (still computed, its tokens unused)
    until done rows are a quarter of the lane or new rows join: cutting a row out copies the whole
    cache, which costs more than decoding a few extra rows for some steps.
    """

    def __init__(self, model, shared: bool) -> None:
        self.model, self.shared = model, shared
        self.rows: list[_Row] = []  # longest first (join sorts them; every row then grows by one a step)
        self.cache = None
        # packed prefill and grouped decoding attention: models with transformers' attention interface
        # and a cache of full-attention layers
        self.ragged = supports_packing(model, False, 0) and all(type(layer) is RoomyLayer for layer in decoder_cache(model, 0).layers)

    @property
    def live(self) -> list[_Row]:
        return [row for row in self.rows if not row.done]

    @property
    def width(self) -> int:
        return 0 if self.cache is None else self.cache.get_seq_length()


class Engine:
    """The model, its adapters and the running batches; ``submit`` and ``cancel`` are thread-safe."""

    def __init__(self, loaded: LoadedModel, adapters: dict[str, Path], *, max_adapters: int = 8, max_batch: int = 32,
                 max_queue: int = 256, max_lora_rank: int | None = None, adapter_root: Path | None = None,
                 trust_pickle: bool = False) -> None:
        if loaded.is_seq2seq:
            raise UserError("peftlab serve and chat need a decoder-only model; this one is encoder-decoder")
        if max_adapters < len(adapters):
            raise UserError(f"--max-adapters {max_adapters} is less than the {len(adapters)} adapters given: raise it")
        self.model, self.tokenizer = loaded.model.eval(), loaded.tokenizer
        self.context_length = loaded.context_length
        ranks = [r for r in map(lora_rank, adapters.values()) if r is not None]
        rows = RowAdapters(capacity=max_adapters, max_rank=max_lora_rank or max(ranks, default=8))
        self.adapters = AdapterSet(self.model, adapters, rows, max_adapters=max_adapters, adapter_root=adapter_root,
                                   trust_pickle=trust_pickle)
        for name in adapters:  # load them now: a bad adapter fails at start, not at the first request
            self.adapters.release(self.adapters.acquire(name))
        self.rows = rows
        self.device = next(self.model.parameters()).device
        self.stop_ids = set(stop_ids(self.model, self.tokenizer))
        self.max_batch, self.max_queue = max_batch, max_queue
        self.shared = _Lane(self.model, shared=True)
        self.own: dict[str, _Lane] = {}
        self.waiting: deque[Request] = deque()
        self.lock = threading.RLock()  # held for a step, an admission, or an admin change
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- the outside --------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="peftlab-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    def submit(self, request: Request) -> None:
        with self._wake:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull
            self.waiting.append(request)
            self._wake.notify()

    def cancel(self, request: Request) -> None:
        """Free the request's place: dropped from the queue or the batch before the next step."""
        with self._wake:
            request.cancelled = True
            self._wake.notify()

    def served(self) -> list[str]:
        with self.lock:
            return list(self.adapters.named)

    def virtual_tokens(self, name: str | None) -> int:
        """Positions a soft prompt adds in front of this adapter's prompts (0 when it cannot be loaded now)."""
        if name is None:
            return 0
        with self.lock:
            adapter = self.adapters.loaded.get(name)
            if adapter is None and name in self.adapters.named:
                try:
                    adapter = self.adapters.acquire(name)  # load it, to know
                except (AdapterBusy, UserError):
                    return 0
                self.adapters.release(adapter)
            return adapter.virtual_tokens if adapter else 0

    def add_adapter(self, name: str, folder: str | None) -> Adapter:
        """Serve ``name`` (see :meth:`AdapterSet.add`), between two steps."""
        with self.lock:
            return self.adapters.add(name, folder)

    def remove_adapter(self, name: str) -> None:
        with self.lock:
            self.adapters.remove(name)

    # -- the loop -------------------------------------------------------------------------------

    def _busy(self) -> bool:
        return bool(self.waiting) or bool(self.shared.rows) or any(lane.rows for lane in self.own.values())

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._busy():
                    self._wake.wait()
                if self._stopping:
                    return
            with self.lock, torch.no_grad():  # not inference_mode: adapters loaded later update these tensors in place
                try:
                    self._drop_cancelled()
                    self._admit()
                    for lane in [self.shared, *self.own.values()]:
                        if lane.rows:
                            self._step(lane)
                except Exception as e:  # a bug or an out-of-memory: fail the running requests, keep serving
                    self._fail_all(f"error: {type(e).__name__}: {e}")

    def _fail_all(self, reason: str) -> None:
        for lane in [self.shared, *self.own.values()]:
            for row in lane.live:
                self._finish(row.request, reason)
                if row.adapter is not None:
                    self.adapters.release(row.adapter)
            lane.rows, lane.cache = [], None

    def _drop_cancelled(self) -> None:
        with self._wake:
            kept = [r for r in self.waiting if not r.cancelled]
            self.waiting = deque(kept)
        for lane in [self.shared, *self.own.values()]:
            cancelled = [row for row in lane.live if row.request.cancelled]
            for row in cancelled:
                if row.request.finish_reason is None:
                    self._finish(row.request, "cancelled")
            if cancelled:
                self._retire(lane, cancelled)

    def _running(self) -> int:
        return len(self.shared.live) + sum(len(lane.live) for lane in self.own.values())

    def _admit(self) -> None:
        """Take waiting requests while there is room (one whose adapter has no free slot waits), prefill
        them together per lane, then add them to their lanes, one cache rebuild per lane."""
        postponed, joining = [], {}
        while self._running() + sum(len(items) for _, items in joining.values()) < self.max_batch:
            with self._wake:
                if not self.waiting:
                    break
                request = self.waiting.popleft()
            try:
                adapter = None if request.adapter is BASE else self.adapters.acquire(request.adapter)
            except AdapterBusy:
                postponed.append(request)
                continue
            except KeyError:
                self._finish(request, f"error: the model {request.adapter!r} is no longer served")
                continue
            except UserError as e:
                self._finish(request, f"error: {e}")
                continue
            lane = self._lane(adapter)
            joining.setdefault(id(lane), (lane, []))[1].append((request, adapter))
        with self._wake:
            self.waiting.extendleft(reversed(postponed))
        for lane, items in joining.values():
            rows, states, logits = self._prefill(lane, items)
            self._join(lane, rows, states)
            self._advance(lane, rows, logits)

    def _lane(self, adapter: Adapter | None) -> _Lane:
        if adapter is None or adapter.kind != "own":
            return self.shared
        if adapter.name not in self.own:
            self.own[adapter.name] = _Lane(adapter.model, shared=False)
        return self.own[adapter.name]

    # -- the model calls ------------------------------------------------------------------------

    def _forward(self, lane: _Lane, slots: list[int], lengths: list[int] | None = None, **inputs) -> torch.Tensor:
        if lane.shared:
            self.rows.set_rows(slots, self.device, lengths)
        return lane.model(**inputs, use_cache=True).logits  # (B, kept positions, vocab)

    def _prefill(self, lane: _Lane, items: list[tuple[Request, Adapter | None]]):
        """Forwards over the requests' prompts: their rows, each row's keys and values per layer
        [(keys, values)] of shape (1, heads, length, dim), and their next-token logits (n, vocab)."""
        packed = lane.ragged
        rows, states, logits = [], [], []
        group: list[tuple[Request, Adapter | None]] = []
        for i, item in enumerate(items):
            group.append(item)
            size = sum(len(request.prompt_ids) for request, _ in group)
            if not packed or size >= PACK_TOKENS or i == len(items) - 1:
                got = self._prefill_packed(lane, group) if packed else self._prefill_alone(lane, *item)
                rows += got[0]
                states += got[1]
                logits.append(got[2])
                group = []
        return rows, states, torch.cat(logits)

    def _prompt_inputs(self, lane: _Lane, items: list[tuple[Request, Adapter | None]]) -> tuple[dict, list[int]]:
        """The prompts end to end as one row, (1, T) ids or (1, T, d) embeddings when a soft prompt leads one
        of them, and each one's length (virtual tokens included)."""
        ids = torch.tensor([[t for request, _ in items for t in request.prompt_ids]], device=self.device)  # (1, T)
        lengths = [len(request.prompt_ids) + (adapter.virtual_tokens if adapter else 0) for request, adapter in items]
        if not any(adapter is not None and adapter.kind == "prompt" for _, adapter in items):
            return {"input_ids": ids}, lengths
        embeds = lane.model.get_input_embeddings()(ids)[0]  # (T, d)
        parts, start = [], 0
        for request, adapter in items:
            end = start + len(request.prompt_ids)
            if adapter is not None and adapter.kind == "prompt":
                parts.append(adapter.prompt.to(device=embeds.device, dtype=embeds.dtype))  # (N, d)
            parts.append(embeds[start:end])
            start = end
        return {"inputs_embeds": torch.cat(parts)[None]}, lengths  # (1, N + T, d)

    def _prefill_packed(self, lane: _Lane, items: list[tuple[Request, Adapter | None]]):
        inputs, lengths = self._prompt_inputs(lane, items)
        bounds = torch.tensor([0, *lengths], device=self.device).cumsum(0).to(torch.int32)  # (n + 1,)
        positions = torch.cat([torch.arange(n, device=self.device) for n in lengths])[None]  # (1, T)
        cache = decoder_cache(lane.model, 0)
        with packed_attention(lane.model):
            logits = self._forward(lane, [_slot(adapter) for _, adapter in items], lengths if len(items) > 1 else None,
                                   **inputs, position_ids=positions, cache=cache, cu_seq_lens_q=bounds,
                                   cu_seq_lens_k=bounds, max_length_q=max(lengths), max_length_k=max(lengths),
                                   logits_to_keep=bounds[1:].long() - 1)[0]  # (n, vocab): each prompt's last position
        cuts = bounds.tolist()
        states = [[(layer.keys[:, :, a:b], layer.values[:, :, a:b]) for layer in cache.layers]
                  for a, b in zip(cuts[:-1], cuts[1:])]
        rows = [self._row(request, adapter, n) for (request, adapter), n in zip(items, lengths)]
        return rows, states, logits

    def _prefill_alone(self, lane: _Lane, request: Request, adapter: Adapter | None):
        """One forward over one prompt, as ``peftlab generate`` makes it (models that cannot run packed rows)."""
        inputs, (length,) = self._prompt_inputs(lane, [(request, adapter)])
        cache = decoder_cache(lane.model, request.sampling.max_tokens)
        positions = torch.arange(length, device=self.device)[None]  # (1, N + T)
        logits = self._forward(lane, [_slot(adapter)], **inputs, position_ids=positions, cache=cache,
                               logits_to_keep=1)[:, -1]  # (1, vocab)
        states = [(layer.keys, layer.values) for layer in cache.layers]
        return [self._row(request, adapter, length)], [states], logits

    def _row(self, request: Request, adapter: Adapter | None, length: int) -> _Row:
        generator = None
        if request.sampling.temperature > 0:
            seed = request.sampling.seed if request.sampling.seed is not None else random.getrandbits(63)
            generator = torch.Generator(device=self.device).manual_seed(seed)
        return _Row(request, adapter, length, -1, generator)

    def _step(self, lane: _Lane) -> None:
        """One token for every row of ``lane`` (a done row's is computed and dropped)."""
        rows, width = lane.rows, lane.width
        live = [b for b, row in enumerate(rows) if not row.done]
        filler = _slot(rows[live[0]].adapter)  # a done row's adapter may be gone: it takes a live row's slot
        ids = torch.tensor([[row.next_token] for row in rows], device=self.device)  # (B, 1)
        lengths = torch.tensor([row.length for row in rows], device=self.device)  # (B,)
        slots = [filler if row.done else _slot(row.adapter) for row in rows]
        step = {"input_ids": ids, "position_ids": lengths[:, None], "cache": lane.cache, "logits_to_keep": 1}
        if lane.ragged:  # attention per group of rows of similar length, over their own width
            with row_attention(lane.model):
                logits = self._forward(lane, slots, **step, row_groups=row_groups([row.length + 1 for row in rows]),
                                       row_lengths=lengths + 1)[:, -1]  # (B, vocab)
        else:
            mask = None  # no padding: no mask, as peftlab generate (attention takes its causal path)
            if bool((lengths != width).any()):  # each row's left padding masked
                mask = (torch.arange(width + 1, device=self.device)[None] >= (width - lengths)[:, None]).long()  # (B, T + 1)
            logits = self._forward(lane, slots, **step, attention_mask=mask)[:, -1]  # (B, vocab)
        for row in rows:
            row.length += 1
        self._advance(lane, [rows[b] for b in live], logits[live])

    def _advance(self, lane: _Lane, rows: list[_Row], logits: torch.Tensor) -> None:
        """Pick each row's next token from its logits (B, vocab); finished rows leave the lane."""
        finished = []
        for b, row in enumerate(rows):
            token = self._choose(logits[b], row)
            request = row.request
            request.tokens.append(token)
            row.next_token = token
            reason = "stop" if token in self.stop_ids else None
            if reason is None and len(request.tokens) >= request.sampling.max_tokens:
                reason = "length"
            reason = self._emit(request, reason)
            if reason is not None:
                finished.append(row)
        if finished:
            self._retire(lane, finished)

    def _choose(self, logits: torch.Tensor, row: _Row) -> int:
        """argmax at temperature 0; else a draw from the temperature-scaled, top-p-filtered distribution."""
        sampling = row.request.sampling
        if sampling.temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)  # (vocab,)
        if sampling.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(0) - sorted_probs >= sampling.top_p  # keep the smallest set reaching top_p
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=row.generator))

    # -- text -----------------------------------------------------------------------------------

    def _emit(self, request: Request, reason: str | None) -> str | None:
        """Send the text that can no longer change; returns the finish reason (a stop string ends it too).

        The text is ``peftlab generate``'s: the tokens decoded without special tokens, stripped. While
        decoding, trailing whitespace, an unfinished character and a possible start of a stop string
        are held back, so the pieces sent add up to the final text.
        """
        full = self.tokenizer.decode(request.tokens, skip_special_tokens=True).lstrip()
        for stop in request.sampling.stop:
            at = full.find(stop)
            if at >= 0:
                full, reason = full[:at], "stop"
        if reason is not None:
            text = full.rstrip()
        else:
            held = max((n for stop in request.sampling.stop for n in range(1, len(stop)) if full.endswith(stop[:n])),
                       default=0)
            text = full[: len(full) - held].rstrip().rstrip("\ufffd").rstrip()
        delta = text[len(request.text):] if text.startswith(request.text) else ""
        if delta:
            request.text += delta
        if reason is not None:
            self._finish(request, reason, delta)
        elif delta:
            request.on_event(delta, None)
        return reason

    def _finish(self, request: Request, reason: str, delta: str = "") -> None:
        request.finish_reason = reason
        request.on_event(delta, reason)

    # -- the cache ------------------------------------------------------------------------------

    def _join(self, lane: _Lane, rows: list[_Row], states: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
        """Add prefilled rows (``states``: per row, (keys, values) per layer): every row left-padded to the
        longest, stacked on the batch axis longest first, written once into the new cache's buffers."""
        if any(row.done for row in lane.rows):
            self._compact(lane)
        if lane.rows:  # each running row's own positions (its padding left out)
            width = lane.width
            running = [[(layer.keys[b : b + 1, :, width - row.length :], layer.values[b : b + 1, :, width - row.length :])
                        for layer in lane.cache.layers] for b, row in enumerate(lane.rows)]
            rows, states = [*lane.rows, *rows], [*running, *states]
        order = sorted(range(len(rows)), key=lambda i: -rows[i].length)  # stable
        rows, states = [rows[i] for i in order], [states[i] for i in order]
        width = rows[0].length
        lane.rows = rows
        room = self._room(lane)
        cache = decoder_cache(lane.model, room)
        for i, layer in enumerate(cache.layers):
            parts = [layers[i] for layers in states]
            if type(layer) is not RoomyLayer:  # a cache of another kind: its own update
                layer.update(torch.cat([_pad_left(k, width) for k, _ in parts]), torch.cat([_pad_left(v, width) for _, v in parts]))
                continue
            keys, values = parts[0]
            shape = (len(parts), keys.shape[1], width + room, keys.shape[3])
            key_buffer, value_buffer = keys.new_zeros(shape), values.new_zeros(shape)  # (B, heads, width + room, dim)
            for b, (k, v) in enumerate(parts):
                key_buffer[b, :, width - k.shape[2] : width] = k[0]  # left-padded with zeros
                value_buffer[b, :, width - v.shape[2] : width] = v[0]
            cache.layers[i] = RoomyLayer.holding(key_buffer, value_buffer, width, room)
        lane.cache = cache

    def _retire(self, lane: _Lane, rows: list[_Row]) -> None:
        """Mark finished or cancelled rows done and free their adapters; compact the lane when done rows
        are a quarter of it (an empty lane is dropped)."""
        for row in rows:
            row.done = True
            if row.adapter is not None:
                self.adapters.release(row.adapter)
        done = sum(row.done for row in lane.rows)
        if done == len(lane.rows):
            lane.rows, lane.cache = [], None
            if not lane.shared:
                self.own = {name: other for name, other in self.own.items() if other is not lane}
        elif 4 * done >= len(lane.rows):
            self._compact(lane)

    def _compact(self, lane: _Lane) -> None:
        """Cut the done rows out of the lane's cache, and the padding no remaining row needs."""
        live = lane.live
        index = torch.tensor([lane.rows.index(row) for row in live], device=self.device)
        trim = lane.width - max(row.length for row in live)  # columns of padding in every kept row
        lane.rows = live
        if all(type(layer) is RoomyLayer for layer in lane.cache.layers):
            lane.cache.layers = [layer.select(index, trim) for layer in lane.cache.layers]
            return
        layers = [(layer.keys.index_select(0, index)[:, :, trim:], layer.values.index_select(0, index)[:, :, trim:])
                  for layer in lane.cache.layers]
        lane.cache = decoder_cache(lane.model, self._room(lane))
        for layer, (keys, values) in zip(lane.cache.layers, layers):
            layer.update(keys, values)

    def _room(self, lane: _Lane) -> int:
        """Positions the lane's cache may still need: the most tokens a row has left to generate."""
        return max(row.request.sampling.max_tokens - len(row.request.tokens) for row in lane.live) + 1


def _slot(adapter: Adapter | None) -> int:
    """The mixed-LoRA slot of a row (-1: the base, or an adapter that is not served through the slots)."""
    return adapter.slot if adapter is not None and adapter.kind == "lora" else -1


def _pad_left(states: torch.Tensor, width: int) -> torch.Tensor:
    """(B, heads, T, dim) -> (B, heads, width, dim), zeros in front."""
    missing = width - states.shape[2]
    if missing == 0:
        return states
    return torch.cat([states.new_zeros(*states.shape[:2], missing, states.shape[3]), states], dim=2)

