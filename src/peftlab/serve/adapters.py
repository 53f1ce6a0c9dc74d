"""The adapters a server may use: named by the operator, loaded on demand, evicted least recently used.

Every adapter is read from its peft-format folder with :mod:`peftlab.peft.formats` and goes where it
can share the batch:

- ``lora`` (LoRA, rsLoRA): its A and B fill a slot of the :class:`~peftlab.serve.mixed_lora.MixedLoraLinear`
  layers, so its rows share forward passes with every other adapter's and the base's;
- ``prompt`` (prompt tuning): its soft prompt (N, d) is prepended to the row's embedded prompt, in the
  same shared batch;
- ``own`` (DoRA, (IA)^3, bottleneck adapters, selective fine-tuning): these change the layers themselves,
  so the adapter is loaded into its own copy of the base model, whose rows form their own sub-batch.

Prefix tuning is refused: its prefixes live in the KV cache that the batch reshapes.

Names, never paths, come from requests: the operator maps names to folders (``--adapter NAME=DIR``),
and an admin load may add a folder only below ``--adapter-root``. At most ``max_adapters`` are held in
memory; a request for one that is not loaded loads it, evicting the least recently used adapter that
no running row uses.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from peftlab.errors import UserError
from peftlab.peft.core import get_module, replace_module
from peftlab.peft.formats import FORMATS, load_adapter, read_adapter_config, read_adapter_tensors
from peftlab.peft.lora import LoraConfig, changes_base
from peftlab.peft.prompt_tuning import FILE_KEY as PROMPT_KEY
from peftlab.serve.mixed_lora import MixedLoraLinear, RowAdapters


@dataclass
class Adapter:
    name: str
    path: Path
    kind: str  # "lora", "prompt" or "own"
    peft_type: str
    slot: int = -1  # lora: its slot in the mixed layers
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None  # lora: module path -> (A (r, in), B (out, r))
    prompt: torch.Tensor | None = None  # prompt: (N, d) float32
    scaling: float = 0.0  # lora: s = alpha / r (alpha / sqrt(r) for rsLoRA)
    model: nn.Module | None = None  # own: the base model with this adapter applied
    running: int = 0  # rows using it now; an adapter in use is never evicted

    @property
    def virtual_tokens(self) -> int:
        return 0 if self.prompt is None else self.prompt.shape[0]


class AdapterBusy(Exception):
    """Every slot holds an adapter that running rows use: the request waits for one to finish."""


def parse_adapter_specs(specs: list[str]) -> dict[str, Path]:
    """``["summarize=runs/sum/final", ...]`` -> {name: folder}; a bad spec or a missing folder is a UserError."""
    named: dict[str, Path] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        name = name.strip()
        if not sep or not name or not folder:
            raise UserError(f"--adapter {spec!r} is not NAME=DIR: e.g. --adapter summarize=runs/sum/final")
        check_name(name)
        if name in named:
            raise UserError(f"--adapter names {name!r} twice: give each adapter its own name")
        read_adapter_config(folder)  # raises if the folder is not an adapter
        named[name] = Path(folder)
    return named


def check_name(name: str) -> None:
    if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
        raise UserError(f"adapter name {name!r} must be 1-64 letters, digits, '-', '_' or '.'")


def lora_rank(folder: Path) -> int | None:
    """The rank of a LoRA adapter folder (None for other methods), for sizing the mixed layers."""
    data = read_adapter_config(folder)
    return int(data.get("r", 8)) if data["peft_type"] == "LORA" and not data.get("use_dora") else None


class AdapterSet:
    """The named adapters of one base model, at most ``max_adapters`` of them loaded at a time.

    Not thread-safe: the engine calls it between decoding steps, under its lock.
    """

    def __init__(self, model: nn.Module, named: dict[str, Path], rows: RowAdapters, *, max_adapters: int,
                 adapter_root: Path | None = None, trust_pickle: bool = False) -> None:
        self.model, self.rows = model, rows
        self.named = dict(named)  # the names requests may use -> their folders
        self.configured = dict(named)  # the operator's names, which an admin may serve again after removing them
        self.max_adapters = max_adapters
        self.adapter_root = adapter_root.resolve() if adapter_root is not None else None
        self.trust_pickle = trust_pickle
        self.loaded: OrderedDict[str, Adapter] = OrderedDict()  # least recently used first
        self.free_slots = list(range(rows.capacity))
        self.mixed: dict[str, MixedLoraLinear] = {}  # module path -> its mixed layer

    # -- what requests see --------------------------------------------------------------------

    def acquire(self, name: str) -> Adapter:
        """The adapter ``name``, loaded if needed, marked as used by one more row.

        Raises KeyError for a name that is not served and :class:`AdapterBusy` when nothing can be evicted.
        """
        if name not in self.named:
            raise KeyError(name)
        adapter = self.loaded.get(name)
        if adapter is None:
            adapter = self._load(name, self.named[name])
        self.loaded.move_to_end(name)
        adapter.running += 1
        return adapter

    def release(self, adapter: Adapter) -> None:
        adapter.running -= 1

    # -- admin ----------------------------------------------------------------------------------

    def add(self, name: str, folder: str | None) -> Adapter:
        """Serve ``name`` again (an operator-named adapter) or from ``folder``, relative to the adapter root."""
        check_name(name)
        if folder is None:
            path = self.named.get(name) or self.configured.get(name)
            if path is None:
                raise UserError(f"no adapter is named {name!r}: give a folder below the adapter root too")
        else:
            if self.adapter_root is None:
                raise UserError("loading a folder needs the server started with --adapter-root DIR")
            path = (self.adapter_root / folder).resolve()
            if Path(folder).is_absolute() or not path.is_relative_to(self.adapter_root):
                raise UserError(f"the folder must be a relative path below the adapter root, not {folder!r}")
        if name in self.loaded:  # a reload: the new files replace the old ones
            if self.loaded[name].running:
                raise AdapterBusy(name)
            self._evict(self.loaded[name])
        adapter = self._load(name, path)
        self.named[name] = path
        return adapter

    def remove(self, name: str) -> None:
        """Stop serving ``name`` and free its memory (refused while rows use it)."""
        if name not in self.named:
            raise KeyError(name)
        adapter = self.loaded.get(name)
        if adapter is not None:
            if adapter.running:
                raise AdapterBusy(name)
            self._evict(adapter)
        del self.named[name]

    # -- loading --------------------------------------------------------------------------------

    def _load(self, name: str, path: Path) -> Adapter:
        adapter = self._read(name, path)
        while len(self.loaded) >= self.max_adapters or (adapter.kind == "lora" and not self.free_slots):
            idle = next((a for a in self.loaded.values() if not a.running), None)
            if idle is None:
                raise AdapterBusy(name)
            self._evict(idle)
        if adapter.kind == "lora":
            adapter.slot = self.free_slots.pop(0)
            self.rows.scaling[adapter.slot] = adapter.scaling
            for path_, (a, b) in adapter.lora.items():
                self._mixed_layer(path_).fill(adapter.slot, a, b)
            self.rows.changed()
        elif adapter.kind == "own":
            adapter.model = load_adapter(plain_copy(self.model), path, trust_pickle=self.trust_pickle).eval()
        self.loaded[name] = adapter
        return adapter

    def _read(self, name: str, path: Path) -> Adapter:
        data = read_adapter_config(path)
        peft_type = data["peft_type"]
        if peft_type not in FORMATS:
            raise UserError(f"adapter type {peft_type!r} in {path} is not supported: peftlab reads {', '.join(FORMATS)}")
        if peft_type == "PREFIX_TUNING":
            raise UserError(f"{path} is a prefix-tuning adapter, which the server cannot batch yet: serve LoRA, "
                            "prompt tuning, DoRA, (IA)^3, bottleneck or selective adapters")
        fmt = FORMATS[peft_type]
        config = fmt.config_from_json(data)  # raises on settings peftlab does not support
        if peft_type == "PROMPT_TUNING":
            prompt = read_adapter_tensors(path, self.trust_pickle).get(PROMPT_KEY)
            width = self.model.get_input_embeddings().weight.shape[1]
            if prompt is None or prompt.dim() != 2 or prompt.shape[1] != width:
                raise UserError(f"{path} holds no ({config.num_virtual_tokens}, {width}) prompt_embeddings: "
                                "was it trained for another base model?")
            return Adapter(name, path, "prompt", peft_type, prompt=prompt[: config.num_virtual_tokens].float())
        if peft_type == "LORA" and isinstance(config, LoraConfig) and not config.dora and not changes_base(config.init):
            return Adapter(name, path, "lora", peft_type, lora=self._lora_tensors(path, config, fmt), scaling=config.scaling)
        return Adapter(name, path, "own", peft_type)

    def _lora_tensors(self, path: Path, config: LoraConfig, fmt) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """module path -> (A, B), checked against the base model's layers."""
        tensors = {fmt.from_file_key(k): v for k, v in read_adapter_tensors(path, self.trust_pickle).items()}
        pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for key in tensors:
            if not key.endswith(".lora_A.weight"):
                continue
            module = key.removesuffix(".lora_A.weight")
            a, b = tensors[key], tensors.get(f"{module}.lora_B.weight")
            try:
                layer = get_module(self.model, module)
            except AttributeError:
                layer = None
            if b is None or not isinstance(layer, (nn.Linear, MixedLoraLinear)):
                raise UserError(f"{path}: tensor {key} has no matching linear layer (or no lora_B) in the base model: "
                                "was this adapter trained for another base model?")
            if a.shape != (config.rank, layer.in_features) or b.shape != (layer.out_features, config.rank):
                raise UserError(f"{path}: {module} has A {tuple(a.shape)} and B {tuple(b.shape)}, which do not fit "
                                f"the base layer ({layer.out_features} x {layer.in_features}) at rank {config.rank}")
            if config.rank > self.rows.max_rank:
                raise UserError(f"{path} has rank {config.rank}, more than the server's --max-lora-rank "
                                f"{self.rows.max_rank}: restart it with --max-lora-rank {config.rank}")
            device = layer.weight.device
            pairs[module] = (a.float().to(device), b.float().to(device))
        if not pairs:
            raise UserError(f"{path} holds no LoRA tensors (lora_A / lora_B): re-save the adapter")
        return pairs

    def _mixed_layer(self, path: str) -> MixedLoraLinear:
        layer = self.mixed.get(path)
        if layer is None:
            layer = MixedLoraLinear(get_module(self.model, path), self.rows)
            replace_module(self.model, path, layer)
            self.mixed[path] = layer
        return layer

    def _evict(self, adapter: Adapter) -> None:
        if adapter.kind == "lora":
            for path in adapter.lora:
                self.mixed[path].fill(adapter.slot, None, None)
            self.free_slots.append(adapter.slot)
            self.rows.scaling[adapter.slot] = 0.0
            self.rows.changed()
        del self.loaded[adapter.name]


def plain_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its mixed LoRA layers replaced by the plain layers they wrap."""
    mixed = {p: m for p, m in model.named_modules() if isinstance(m, MixedLoraLinear)}
    saved = {p: (m.lora_A, m.lora_B) for p, m in mixed.items()}
    for m in mixed.values():  # do not copy the slot stacks
        m.lora_A = m.lora_B = m._stacks = None
    try:
        copied = copy.deepcopy(model)
    finally:
        for p, m in mixed.items():
            m.lora_A, m.lora_B = saved[p]
    for path in mixed:
        replace_module(copied, path, get_module(copied, path).base_layer)
    return copied
