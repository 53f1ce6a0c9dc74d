"""Target selection, injection and bookkeeping shared by every PEFT method.

A PEFT method adds a few trainable tensors to a frozen HF model. The mechanism is HF peft's:
find the modules to adapt by name, wrap each one in an adapter layer that keeps the original as
``base_layer``, and ``setattr`` the wrapper on the parent, so the model's own ``forward`` runs
unchanged. What a method must provide is small (torchtune's ``AdapterModule`` idea): its layers
expose ``adapter_params() -> {name: nn.Parameter}``; everything here (freezing, the adapter-only
state dict, strict loading, the parameter report) works from that alone.

    paths = select_modules(model, ["q_proj", "v_proj"], layers="0-3")
    for path in paths:
        replace_module(model, path, MyAdapter(get_module(model, path)))
    freeze_all_but_adapters(model)
    print(parameter_report(model))  # trainable params: 8,192 || all params: ... || trainable%: ...

Target patterns (the same syntax for ``targets`` and ``exclude``):

- ``"q_proj"``: an exact module path or a suffix of one at a dot (``model.layers.0.self_attn.q_proj``);
- ``"re:.*layers\\.[01]\\..*proj"``: a regex that must match the whole module path;
- ``"all-linear"``: every ``nn.Linear`` except the output head (``model.get_output_embeddings()``).

Method configs take a list of patterns or one string split at commas, as ``--targets q_proj,v_proj``
is (:func:`split_patterns`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from peftlab.errors import UserError

ALL_LINEAR = "all-linear"
REGEX_PREFIX = "re:"

# Default targets when none are given, keyed by ``model.config.model_type``: the attention query
# and value projections, as in the LoRA paper (Hu et al. 2021, section 7.1) and HF peft's defaults.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("t5", "mt5", "umt5", "longt5", "switch_transformers"), ("q", "v")),
    **dict.fromkeys(
        (
            "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
            "gemma3_text", "phi", "olmo", "olmo2", "granite", "smollm3", "stablelm", "starcoder2", "cohere",
            "bart", "mbart", "opt", "whisper", "m2m_100", "marian",
        ),
        ("q_proj", "v_proj"),
    ),
    **dict.fromkeys(("gpt_neox", "bloom", "falcon"), ("query_key_value",)),
    "phi3": ("qkv_proj",),
    "gpt_bigcode": ("c_attn",),
}

# dtypes adapter weights may be kept in, by the names configs and adapter files use.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64,
}

# The block index of a module path: the first ``layers.N`` / ``block.N`` / ``h.N`` in it (as peft's layers_pattern).
LAYER_PATTERN = re.compile(r"(?:^|\.)(layers|block|h)\.(\d+)(?:\.|$)")


class WrappedLinear(nn.Module):
    """Base of adapter layers that stand in for the layer they wrap (kept as ``self.base_layer``).

    Model code that reads the layer's ``weight``, ``bias``, ``in_features`` or ``out_features``
    (HF T5 reads ``wo.weight.dtype``) sees the wrapped layer's.
    """

    base_layer: nn.Module

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features


def dtype_named(name: str, field: str = "adapter_dtype") -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``; a :class:`UserError` naming ``field`` for a name not in :data:`DTYPES`."""
    if name not in DTYPES:
        raise UserError(f"{field} {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


@runtime_checkable
class AdapterModule(Protocol):
    """What every adapter layer provides: its own trainable tensors, named relative to itself."""

    def adapter_params(self) -> dict[str, nn.Parameter]: ...


# ---------------------------------------------------------------------------------------------
# Selecting modules


def split_patterns(value: str | Sequence[str] | None) -> list[str] | None:
    """Target patterns as a list, read as the command line reads them: ``"q_proj,v_proj"`` -> two patterns.

    ``all-linear`` and ``re:REGEX`` (whose commas belong to the regex) stay one pattern; a list is
    taken as is; None (the method's default) stays None.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        return list(value)
    if value.startswith(REGEX_PREFIX) or value == ALL_LINEAR:
        return [value]
    return [part.strip() for part in value.split(",") if part.strip()]


def parse_layers(spec: str | int | Iterable[int] | None) -> frozenset[int] | None:
    """``"0-3,6"`` -> {0, 1, 2, 3, 6}; an int or a list of ints is taken as is; None means all layers."""
    if spec is None:
        return None
    if isinstance(spec, int):
        return frozenset({spec})
    if not isinstance(spec, str):
        return frozenset(int(i) for i in spec)
    layers: set[int] = set()
    for part in spec.replace(" ", "").split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if m is None or (m[2] is not None and int(m[2]) < int(m[1])):
            raise UserError(f"layers {spec!r} is not a range spec: write it like '0-3,6' (block indices from 0)")
        layers.update(range(int(m[1]), int(m[2] or m[1]) + 1))
    return frozenset(layers)


def layer_index(path: str) -> int | None:
    """The transformer-block index of a module path (``model.layers.3.mlp.up_proj`` -> 3), or None."""
    m = LAYER_PATTERN.search(path)
    return int(m[2]) if m else None


def matches(pattern: str, path: str) -> bool:
    """Whether one target pattern (exact name, dotted suffix or ``re:`` regex) selects ``path``."""
    if pattern.startswith(REGEX_PREFIX):
        return re.fullmatch(pattern[len(REGEX_PREFIX):], path) is not None
    return path == pattern or path.endswith("." + pattern)


def named_base_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()`` without the insides of adapter layers (their base layer, A, B...)."""
    stack: list[tuple[str, nn.Module]] = [("", model)]
    seen: set[int] = set()
    while stack:
        path, module = stack.pop()
        if id(module) in seen:  # a module shared by two parents is visited once, as in named_modules()
            continue
        seen.add(id(module))
        yield path, module
        if isinstance(module, AdapterModule):
            continue
        children = [(f"{path}.{n}" if path else n, c) for n, c in module.named_children()]
        stack.extend(reversed(children))


def default_targets(model: nn.Module) -> tuple[str, ...]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        raise UserError(
            f"no default target modules for model type {model_type!r}: pass targets explicitly "
            "(e.g. --targets q_proj,v_proj or --targets all-linear)"
        )
    return DEFAULT_TARGETS[model_type]


def select_modules(
    model: nn.Module,
    targets: str | Sequence[str] | None,
    exclude: str | Sequence[str] = (),
    layers: str | int | Iterable[int] | None = None,
    module_type: type[nn.Module] | tuple[type[nn.Module], ...] = nn.Linear,
    strict: bool = True,
) -> list[str]:
    """Module paths of ``model`` to adapt, in model order.

    ``targets`` is a pattern or a list of patterns (see the module docstring), or None for the
    per-architecture default. Each target must select at least one module of ``module_type``
    (a typo should fail loudly, not train fewer layers), unless ``strict=False`` (HF peft's rule,
    used for adapter files: some target matches); ``exclude`` patterns are then removed and
    ``layers`` (a spec like ``"0-3,6"``) keeps only modules inside those transformer blocks.
    Modules already inside an adapter layer are never selected.
    """
    targets = default_targets(model) if targets is None else targets
    targets = [targets] if isinstance(targets, str) else list(targets)
    exclude = [exclude] if isinstance(exclude, str) else list(exclude)
    keep_layers = parse_layers(layers)
    if not targets:
        raise UserError("no target modules given: name at least one (e.g. q_proj) or use all-linear")
    for pattern in targets + exclude:
        if pattern.startswith(REGEX_PREFIX):
            try:
                re.compile(pattern[len(REGEX_PREFIX):])
            except re.error as e:
                raise UserError(f"{pattern!r} is not a valid regular expression ({e}): fix or quote it") from None

    candidates = [(p, m) for p, m in named_base_modules(model) if p and isinstance(m, module_type)]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    selected: set[str] = set()
    for target in targets:
        if target == ALL_LINEAR:
            hits = {p for p, m in candidates if m is not head}
        else:
            hits = {p for p, _ in candidates if matches(target, p)}
        if not hits and strict:
            raise UserError(f"target {target!r} matches no layer: {_describe_candidates(model, candidates)}")
        selected |= hits

    selected = {p for p in selected if not any(matches(e, p) for e in exclude)}
    if keep_layers is not None:
        selected = {p for p in selected if layer_index(p) in keep_layers}
    if not selected:
        raise UserError(
            f"targets {targets} (exclude={exclude}, layers={layers!r}) select no layer of {type(model).__name__}: "
            f"{_describe_candidates(model, candidates)}"
        )
    return [p for p, _ in candidates if p in selected]


def _describe_candidates(model: nn.Module, candidates: list[tuple[str, nn.Module]]) -> str:
    kind = "|".join(sorted({type(m).__name__ for _, m in candidates})) or "matching"
    if not candidates:
        return f"{type(model).__name__} has no {kind} layers outside existing adapters"
    names = list(dict.fromkeys(p.rsplit(".", 1)[-1] for p, _ in candidates))
    return (
        f"the {kind} layers of {type(model).__name__} are named {', '.join(names[:20])}"
        f"{', ...' if len(names) > 20 else ''} (e.g. {candidates[0][0]}); target some of these"
    )


# ---------------------------------------------------------------------------------------------
# Injecting and freezing


def get_module(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


def replace_module(model: nn.Module, path: str, new_module: nn.Module) -> nn.Module:
    """Put ``new_module`` at ``path`` (``setattr`` on the parent); returns the module it replaced."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    old = getattr(parent, name)
    setattr(parent, name, new_module)
    return old


def adapter_modules(model: nn.Module) -> dict[str, AdapterModule]:
    """Every adapter layer of ``model``, by module path."""
    return {p: m for p, m in model.named_modules() if isinstance(m, AdapterModule)}


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter parameters by their ``model.state_dict()`` key (``...q_proj.lora_A.weight``)."""
    return {
        f"{path}.{name}" if path else name: param
        for path, module in adapter_modules(model).items()
        for name, param in module.adapter_params().items()
    }


def freeze_all_but_adapters(model: nn.Module) -> None:
    """Freeze every parameter, then unfreeze the adapter parameters."""
    for param in model.parameters():
        param.requires_grad_(False)
    for param in adapter_parameters(model).values():
        param.requires_grad_(True)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter-only state dict (detached tensors, no copy), keyed like ``model.state_dict()``."""
    return {key: param.detach() for key, param in adapter_parameters(model).items()}


@torch.no_grad()
def load_adapter_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy ``state_dict`` into the adapter parameters, strictly.

    Every tensor must have a home and every adapter parameter must be filled, with the same shape;
    otherwise a :class:`UserError` names the first offending tensor.
    """
    params = adapter_parameters(model)
    for key, tensor in state_dict.items():
        if key not in params:
            raise UserError(
                f"adapter tensor {key} has no matching adapter layer in the model "
                f"(its adapter parameters look like {next(iter(params), 'nothing')}): "
                "was this adapter trained for another base model?"
            )
        expected = tuple(params[key].shape)
        if tuple(tensor.shape) != expected:
            raise UserError(
                f"adapter tensor {key} has shape {tuple(tensor.shape)} but the model's layer expects {expected}: "
                "was this adapter trained for another base model?"
            )
    missing = [key for key in params if key not in state_dict]
    if missing:
        raise UserError(
            f"the adapter has no tensor for {missing[0]} ({len(missing)} missing): "
            "was it saved with other target modules or for another base model?"
        )
    for key, tensor in state_dict.items():
        params[key].copy_(tensor)


# ---------------------------------------------------------------------------------------------
# Counting


@dataclass(frozen=True)
class ParameterReport:
    """Trainable versus all parameters, counted as HF peft does (adapters included in ``total``)."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        # Exactly peft's ``print_trainable_parameters`` line.
        return f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || trainable%: {self.percent:.4f}"


def parameter_report(model: nn.Module) -> ParameterReport:
    """Count each distinct parameter once (tied weights once), like peft's ``get_nb_trainable_parameters``.

    A 4-bit layer keeps its weight as packed buffers, not a parameter; like peft (which counts a
    packed 4-bit tensor's elements twice), we count the weight's logical ``out x in`` elements.
    """
    params = list(model.parameters())
    packed = sum(m.in_features * m.out_features for m in model.modules() if hasattr(m, "weight_packed"))
    return ParameterReport(
        trainable=sum(p.numel() for p in params if p.requires_grad),
        total=sum(p.numel() for p in params) + packed,
    )
