"""Combine LoRA adapters into one new LoRA adapter, as HF peft's ``add_weighted_adapter`` does.

    peftlab merge-adapters --model M --adapter sum=runs/sum/final --adapter qa=runs/qa/final \\
        --combination cat --weights 0.7,0.3 --out runs/sum+qa

Adapter i holds, in each layer it adapts, A_i (r_i, in), B_i (out, r_i) and a scaling s_i (alpha_i / r_i,
or alpha_i / sqrt(r_i) for rsLoRA): its update is dW_i = s_i B_i A_i. Given weights w_i (negative ones
subtract a task), the new adapter has rank r and alpha = r, so its scaling is 1 and all of w_i s_i lives in
its A and B:

- ``cat``:    A = [w_1 s_1 A_1; w_2 s_2 A_2; ...] (rows), B = [B_1, B_2, ...] (columns); r = sum r_i and
  B A = sum w_i dW_i exactly.
- ``svd``:    dW = sum w_i dW_i = U S V^T, truncated to r = max r_i: B = U_r S_r, A = V_r^T, the best
  rank-r approximation (Eckart-Young).
- ``linear``: equal ranks r; with a_i = sign(w_i s_i) sqrt(|w_i s_i|) and b_i = sqrt(|w_i s_i|),
  A = sum a_i A_i and B = sum b_i B_i. Then B A = sum w_i dW_i + the cross terms b_i a_j B_i A_j (i != j):
  exact for one adapter, a rough approximation for more.

The three others merge A and B like ``linear`` (weights a_i for the A_i, b_i for the B_i), but first
sparsify each tensor T_i and resolve sign conflicts entry by entry (d is ``density``):

- ``ties`` (TIES, Yadav et al. 2023, https://arxiv.org/abs/2306.01708): trim each T_i to its
  floor(d * numel) entries largest in |value|; elect the sign sigma = sign(sum_i T_i) (+ where 0); keep the
  entries that agree with it: T = sum_i [sign T_i = sigma] c_i T_i / max(1, #{i: sign T_i = sigma}).
- ``dare_linear`` (DARE, Yu et al. 2023, https://arxiv.org/abs/2311.03099): drop each entry with probability
  1 - d and rescale the rest, T_i <- m_i * T_i / d with m_i ~ Bernoulli(d); then T = sum_i c_i T_i.
- ``dare_ties``: DARE's drop and rescale, then TIES's sign election and disjoint mean.

With d = 1 nothing is trimmed or dropped. peft's rules, followed here: ``linear`` and the sparsifying
ones need equal ranks; one adapter is always combined ``linear``; a layer only some adapters adapt
combines those; the new adapter_config.json is the first adapter's with r = lora_alpha = the new rank, the
targets united (names: their union; regexes: ``(re_1)|(re_2)``) and no rank or alpha patterns.

DARE's masks are random. peft, after ``torch.manual_seed(seed)``, first builds the new adapter in every
layer (in model order), which draws its discarded initial A and B (``nn.Linear``'s Kaiming-uniform init,
then the init of ``init_lora_weights``); then, layer by layer in model order, one Bernoulli mask for each
A_1 .. A_n, then for each B_1 .. B_n. :func:`combine_adapters` makes the same draws in the same order from
a generator seeded with ``seed``, so its masks are peft's.

Two differences from peft 0.21, both where peft's result is wrong (huggingface/peft#3761): DoRA adapters
are refused (peft drops their magnitudes), and the new adapter is plain LoRA even when the first one
used rsLoRA (peft 0.21 copies ``use_rslora``, which makes its scaling sqrt(r), not 1; fixed in
huggingface/peft#3449). Only the base model's structure is needed (layer names, order and shapes).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from peftlab.config import ADAPTER_COMBINATIONS, SPARSIFYING_COMBINATIONS
from peftlab.errors import UserError
from peftlab.peft.core import get_module, select_modules
from peftlab.peft.formats import (
    CONFIG_NAME,
    PEFT_PREFIX,
    SAFETENSORS_NAME,
    read_adapter_config,
    read_adapter_tensors,
)
from peftlab.peft.lora import LoraConfig, changes_base, lora_config_from_json

COMBINATIONS = ADAPTER_COMBINATIONS
SPARSIFYING = SPARSIFYING_COMBINATIONS
"""Combinations that use ``density``."""
SAME_RANK = ("linear", "ties", "dare_linear", "dare_ties")
"""Combinations that add the A_i (and the B_i) entry by entry, so the ranks must be equal."""


@dataclass
class LoraFile:
    """One LoRA adapter read from its folder, in float32."""

    name: str
    folder: Path
    config: dict[str, Any]
    """Its adapter_config.json."""
    lora: LoraConfig
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    """Module path -> (A (r, in), B (out, r))."""


@dataclass
class CombinedAdapter:
    config: dict[str, Any]
    """adapter_config.json of the new adapter."""
    tensors: dict[str, torch.Tensor]
    """adapter_model.safetensors of the new adapter (peft's keys)."""
    combination: str
    """As applied: ``linear`` for one adapter, whatever was asked."""
    rank: int


def read_lora(name: str, folder: str | Path, trust_pickle: bool = False) -> LoraFile:
    """Read a LoRA (or rsLoRA) adapter folder; refuse other methods and DoRA."""
    config = read_adapter_config(folder)
    if config["peft_type"] != "LORA":
        raise UserError(f"adapter {name} ({folder}) is {config['peft_type']}, not LoRA: merge-adapters combines LoRA "
                        "adapters only")
    if config.get("use_dora"):
        raise UserError(f"adapter {name} ({folder}) is a DoRA adapter: its magnitudes cannot be combined (peft drops "
                        "them); merge it into the base model with peftlab merge instead")
    lora = lora_config_from_json(config)
    if changes_base(lora.init):
        raise UserError(f"adapter {name} ({folder}) is an unconverted {lora.init} adapter, which needs its own residual "
                        "base: save it converted (peft: path_initial_model_for_weight_conversion; peftlab saves "
                        "converted) and merge that")
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in read_adapter_tensors(folder, trust_pickle).items():
        path, _, kind = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        if kind not in ("A.weight", "B.weight"):
            raise UserError(f"adapter {name} ({folder}) holds {key}, which is no LoRA A or B weight of a linear "
                            "layer: merge-adapters combines LoRA on linear layers only")
        factors.setdefault(path, {})[kind[0]] = tensor.float()
    pairs = {}
    for path, ab in factors.items():
        if set(ab) != {"A", "B"} or ab["A"].shape[0] != lora.rank or ab["B"].shape[1] != lora.rank:
            raise UserError(f"adapter {name} ({folder}): layer {path} lacks its lora_A or lora_B, or their rank is not "
                            f"r = {lora.rank}; re-save the adapter")
        pairs[path] = (ab["A"], ab["B"])
    return LoraFile(name, Path(folder), config, lora, pairs)


def combine_adapters(model: nn.Module, adapters: list[LoraFile], weights: list[float], combination: str,
                     density: float | None = None, seed: int = 42,
                     base_model_name_or_path: str | None = None) -> CombinedAdapter:
    """The new adapter combining ``adapters`` with ``weights`` (see the module docstring).

    ``model`` gives the layers' names, order and shapes; its weights are not used (the meta device will do).
    """
    if combination not in COMBINATIONS:
        raise UserError(f"unknown combination {combination!r}: use one of {', '.join(COMBINATIONS)}")
    if len(weights) != len(adapters):
        raise UserError(f"{len(weights)} weights for {len(adapters)} adapters: give one weight per adapter")
    if combination in SPARSIFYING and (density is None or not 0 < density <= 1):
        raise UserError(f"--combination {combination} needs --density in (0, 1], got {density}: e.g. --density 0.5")
    combination = "linear" if len(adapters) == 1 else combination
    ranks = [a.lora.rank for a in adapters]
    if combination in SAME_RANK and len(set(ranks)) > 1:
        raise UserError(f"--combination {combination} needs adapters of equal rank, got "
                        f"{', '.join(f'{a.name}: r={a.lora.rank}' for a in adapters)}; use cat or svd instead")
    rank = {"cat": sum(ranks), "svd": max(ranks)}.get(combination, ranks[0])
    config = _new_config(adapters, rank, base_model_name_or_path)
    paths = _check_layers(model, adapters, config)

    generator = torch.Generator().manual_seed(seed)
    if combination.startswith("dare"):
        _draw_peft_initialisation(generator, model, paths, rank, config.get("init_lora_weights", True))
    tensors = {}
    for path in paths:  # model order, as peft
        parts = [(a.factors[path], a.lora.scaling, w) for a, w in zip(adapters, weights) if path in a.factors]
        if combination == "cat":
            A, B = _cat(parts, rank)
        elif combination == "svd":
            A, B = _svd(parts, rank, path)
        else:
            A, B = _linear(parts, combination, density, generator)
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = A.contiguous()
        tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = B.contiguous()
    return CombinedAdapter(config, tensors, combination, rank)


def save_combined(combined: CombinedAdapter, folder: str | Path, record: dict[str, Any] | None = None) -> Path:
    """Write the adapter in peft's format (and ``record`` as merge.json beside it)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(combined.tensors, str(folder / SAFETENSORS_NAME), metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(combined.config, indent=2, sort_keys=True) + "\n")  # last: no config without weights
    if record is not None:
        (folder / "merge.json").write_text(json.dumps(record, indent=2) + "\n")
    return folder


# ---------------------------------------------------------------------------------------------
# The new config and its layers


def _new_config(adapters: list[LoraFile], rank: int, base_model_name_or_path: str | None) -> dict[str, Any]:
    """The first adapter's config with peft's replacements (rank, alpha, united targets), as plain LoRA."""
    targets = [a.config.get("target_modules") for a in adapters]
    if all(isinstance(t, str) for t in targets):  # regexes: one that matches what any of them does
        united: str | list[str] = "|".join(f"({t})" for t in targets)
    elif all(isinstance(t, list) for t in targets):
        united = sorted(set().union(*targets))
    else:
        raise UserError("the adapters give target_modules as a list of names in some and a regex in others, which peft "
                        f"cannot combine ({', '.join(f'{a.name}: {t!r}' for a, t in zip(adapters, targets))}); "
                        "re-save them with the same kind")
    return {**adapters[0].config, "r": rank, "lora_alpha": rank, "target_modules": united, "rank_pattern": {},
            "alpha_pattern": {}, "use_rslora": False, "use_dora": False, "inference_mode": True,
            "base_model_name_or_path": base_model_name_or_path}


def _check_layers(model: nn.Module, adapters: list[LoraFile], config: dict[str, Any]) -> list[str]:
    """The layers of the new adapter, in model order: those the adapters adapt, which its config must select."""
    for a in adapters:
        for path, (A, B) in a.factors.items():
            try:
                layer = get_module(model, path)
            except AttributeError:
                layer = None
            linear = isinstance(layer, nn.Linear)
            if not linear or (B.shape[0], A.shape[1]) != (layer.out_features, layer.in_features):
                found = f"a {layer.out_features} x {layer.in_features} one" if linear else "no linear layer"
                raise UserError(f"adapter {a.name} adapts {path} with a {B.shape[0]} x {A.shape[1]} update but the base "
                                f"model has {found} there: pass the --model the adapters were trained on")
    held = set().union(*(a.factors for a in adapters))
    new = lora_config_from_json(config)
    selected = select_modules(model, new.targets, new.exclude, new.layers, strict=False)
    if set(selected) != held:
        extra = sorted(set(selected) - held) or sorted(held - set(selected))
        raise UserError(f"the adapters' united targets ({config['target_modules']!r}, with the first adapter's "
                        f"layers and excludes) {'also select' if set(selected) - held else 'miss'} {extra[0]}"
                        f"{f' and {len(extra) - 1} more layers' if len(extra) > 1 else ''}, so peft cannot combine "
                        "them: combine adapters that target the same blocks")
    return selected


def _draw_peft_initialisation(generator: torch.Generator, model: nn.Module, paths: list[str], rank: int,
                              init: bool | str) -> None:
    """Draw (and drop) what peft draws building the new adapter's A (rank, in) and B (out, rank) in each layer."""
    for path in paths:
        layer = get_module(model, path)
        out_features, in_features = layer.out_features, layer.in_features
        nn.init.kaiming_uniform_(torch.empty(rank, in_features), a=math.sqrt(5), generator=generator)  # nn.Linear A
        nn.init.kaiming_uniform_(torch.empty(out_features, rank), a=math.sqrt(5), generator=generator)  # nn.Linear B
        if init is True:
            nn.init.kaiming_uniform_(torch.empty(rank, in_features), a=math.sqrt(5), generator=generator)
        elif init == "gaussian":
            nn.init.normal_(torch.empty(rank, in_features), std=1 / rank, generator=generator)
        elif init == "orthogonal" and rank % 2 == 0:
            torch.randn(rank, rank, generator=generator)
            torch.randn(in_features, rank // 2, generator=generator)
            torch.randn(rank // 2, out_features, generator=generator)
        # False and "eva" draw nothing


# ---------------------------------------------------------------------------------------------
# One layer: parts are ((A_i, B_i), s_i, w_i) of the adapters that adapt it


Part = tuple[tuple[torch.Tensor, torch.Tensor], float, float]


def _cat(parts: list[Part], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A = [w_i s_i A_i] stacked by rows, B = [B_i] by columns; zeros where an adapter lacks this layer."""
    A = torch.cat([a * w * s for (a, _), s, w in parts], dim=0)  # (sum r_i, in)
    B = torch.cat([b for (_, b), _, _ in parts], dim=1)  # (out, sum r_i)
    new_A, new_B = A.new_zeros(rank, A.shape[1]), B.new_zeros(B.shape[0], rank)
    new_A[: A.shape[0]], new_B[:, : B.shape[1]] = A, B
    return new_A, new_B


def _svd(parts: list[Part], rank: int, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-``rank`` truncated SVD of dW = sum w_i s_i B_i A_i: B = U_r S_r, A = V_r^T."""
    deltas = torch.stack([(b @ a) * s for (a, b), s, _ in parts])  # (n, out, in)
    weights = torch.tensor([w for _, _, w in parts])
    delta = (deltas * weights.view(-1, 1, 1)).sum(dim=0)  # (out, in)
    if rank > min(delta.shape):
        raise UserError(f"--combination svd: the new rank {rank} (the largest adapter rank) exceeds what layer "
                        f"{path} ({delta.shape[0]} x {delta.shape[1]}) holds; use cat, or adapters of rank "
                        f"{min(delta.shape)} or less")
    U, S, Vh = torch.linalg.svd(delta, full_matrices=True)  # U (out, out), S (min,), Vh (in, in)
    return Vh[:rank], U[:, :rank] @ torch.diag(S[:rank])


def _linear(parts: list[Part], combination: str, density: float | None,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A from the A_i with weights a_i = sign(w s) sqrt(|w s|), then B from the B_i with b_i = sqrt(|w s|)."""
    ws = [w * s for _, s, w in parts]
    a = torch.tensor([math.sqrt(abs(x)) * (1 if x >= 0 else -1) for x in ws])  # the sign on A only
    b = torch.tensor([math.sqrt(abs(x)) for x in ws])
    A = _merge_tensors([ab[0] for ab, _, _ in parts], a, combination, density, generator)
    B = _merge_tensors([ab[1] for ab, _, _ in parts], b, combination, density, generator)
    return A, B


def _merge_tensors(tensors: list[torch.Tensor], weights: torch.Tensor, combination: str, density: float | None,
                   generator: torch.Generator) -> torch.Tensor:
    """sum_i c_i T_i, after TIES's trim or DARE's drop, and with TIES's sign election (see the module docstring)."""
    if combination == "ties":
        tensors = [_trim(t, density) for t in tensors]
    elif combination in ("dare_linear", "dare_ties"):
        tensors = [_drop(t, density, generator) for t in tensors]  # one mask per tensor, in adapter order
    stacked = torch.stack(tensors)  # (n, *shape)
    weighted = stacked * weights.view(-1, *[1] * (stacked.dim() - 1))
    if combination in ("linear", "dare_linear"):
        return weighted.sum(dim=0)
    sign = torch.where(stacked.sum(dim=0) >= 0, 1, -1)  # elected per entry, from the unweighted tensors
    agree = stacked.sign() == sign  # (n, *shape); trimmed entries (0) never agree
    return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


def _trim(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """TIES's trim: keep the floor(density * numel) entries largest in |value|, zero the rest."""
    if density >= 1:
        return tensor
    keep = torch.zeros(tensor.numel(), dtype=tensor.dtype)
    keep[torch.topk(tensor.abs().flatten(), k=int(density * tensor.numel())).indices] = 1
    return tensor * keep.view(tensor.shape)


def _drop(tensor: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability density, and divide the kept ones by it (the mean is unchanged)."""
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density
