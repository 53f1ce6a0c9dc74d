"""Adapters on disk in HF peft's format, both ways.

A peft adapter folder holds ``adapter_config.json`` (the method and its settings, ``peft_type``
first) and ``adapter_model.safetensors`` (only the adapter tensors, keyed by their module path
under ``base_model.model.``, e.g. ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``).
Folders written here load with ``peft.PeftModel.from_pretrained`` and folders written by peft's
``save_pretrained`` load here.

    save_adapter(model, "runs/x/adapter", lora_config, base_model_name_or_path="HuggingFaceTB/SmolLM2-135M")
    model = load_adapter(AutoModelForCausalLM.from_pretrained(...), "runs/x/adapter")

Each method registers an :class:`AdapterFormat` under its ``peft_type`` at the end of its own
module (``"LORA"`` in :mod:`peftlab.peft.lora`); :func:`load_adapter` dispatches on the
``peft_type`` of the file. The helpers at the end read and write peft's ``target_modules``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from peftlab.errors import UserError
from peftlab.peft.core import (
    REGEX_PREFIX,
    adapter_parameters,
    adapter_state_dict,
    load_adapter_state_dict,
    select_modules,
)

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."  # peft's key prefix for tuners that wrap layers (LoRA, IA3, ...)


def _add_peft_prefix(key: str) -> str:
    return PEFT_PREFIX + key


def _strip_peft_prefix(key: str) -> str:
    return key.removeprefix(PEFT_PREFIX)


def rename_key(old: str, new: str) -> Callable[[str], str]:
    """A key mapping that renames ``old`` to ``new`` and keeps every other key (for one tensor saved under peft's name)."""
    return lambda key: new if key == old else key


@dataclass(frozen=True)
class AdapterFormat:
    """How one PEFT method speaks peft's on-disk format."""

    config_type: type
    """Our config class for the method (``save_adapter`` finds the format from it)."""
    config_from_json: Callable[[dict[str, Any]], Any]
    """adapter_config.json (a dict) -> our config; raises UserError on settings we do not support."""
    config_to_json: Callable[[Any, nn.Module], dict[str, Any]]
    """Our config and the adapted model -> the method's fields of adapter_config.json."""
    apply: Callable[[nn.Module, Any], nn.Module]
    """Inject the (untrained) adapter into a base model, as the method's ``apply_*`` does.

    Files from peft may name targets absent from this architecture: accept them if some target matches."""
    to_file_key: Callable[[str], str] = _add_peft_prefix
    """``model.state_dict()`` key of an adapter tensor -> its key in adapter_model.safetensors."""
    from_file_key: Callable[[str], str] = _strip_peft_prefix
    state_dict: Callable[[nn.Module], dict[str, torch.Tensor]] = adapter_state_dict
    """The tensors to write, keyed like ``model.state_dict()``: the adapter parameters, unless the method
    saves something computed from them (prefix tuning folds its reparameterising MLP into plain prefixes)."""


FORMATS: dict[str, AdapterFormat] = {}


def register_format(peft_type: str, fmt: AdapterFormat) -> None:
    """Make ``peft_type`` (``"LORA"``, ``"IA3"``, ``"PROMPT_TUNING"``, or one of ours) saveable and loadable."""
    FORMATS[peft_type] = fmt


def _format_for_config(config: Any) -> tuple[str, AdapterFormat]:
    for peft_type, fmt in FORMATS.items():
        if isinstance(config, fmt.config_type):
            return peft_type, fmt
    raise UserError(f"no adapter file format is registered for {type(config).__name__}")


def default_task_type(model: nn.Module) -> str:
    is_seq2seq = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    return "SEQ_2_SEQ_LM" if is_seq2seq else "CAUSAL_LM"


def save_adapter(
    model: nn.Module,
    out_dir: str | Path,
    config: Any,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` for the adapter in ``model``."""
    peft_type, fmt = _format_for_config(config)
    tensors = {fmt.to_file_key(k): t.contiguous() for k, t in fmt.state_dict(model).items()}
    if not tensors:
        raise UserError("the model holds no adapter to save: apply or load one first")
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(model, "name_or_path", None) or None
    fields = {
        "peft_type": peft_type,
        "task_type": task_type or default_task_type(model),
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "auto_mapping": None,
        **fmt.config_to_json(config, model),
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_NAME).write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(out_dir / SAFETENSORS_NAME), metadata={"format": "pt"})
    return out_dir


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise UserError(f"adapter folder {adapter_dir} does not exist: pass the folder holding adapter_config.json")
    path = adapter_dir / CONFIG_NAME
    if not path.is_file():
        raise UserError(
            f"{adapter_dir} has no {CONFIG_NAME}: pass a folder written by peftlab or by peft's save_pretrained"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}): re-save the adapter") from None
    if not isinstance(data, dict) or "peft_type" not in data:
        raise UserError(f"{path} has no peft_type: it is not a peft adapter config")
    return data


def read_adapter_tensors(adapter_dir: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    adapter_dir = Path(adapter_dir)
    if (adapter_dir / SAFETENSORS_NAME).is_file():
        try:
            return load_file(str(adapter_dir / SAFETENSORS_NAME), device="cpu")
        except SafetensorError as e:
            raise UserError(f"{adapter_dir / SAFETENSORS_NAME} is damaged ({str(e).strip()}); copy it again or retrain the adapter") from None
    if (adapter_dir / PICKLE_NAME).is_file():
        if not trust_pickle:
            raise UserError(
                f"{adapter_dir} holds a pickle ({PICKLE_NAME}), which can run code when loaded: "
                "pass --trust-pickle if you trust its source, or convert it to safetensors"
            )
        try:  # even when trusted, only tensors are unpickled
            return torch.load(adapter_dir / PICKLE_NAME, map_location="cpu", weights_only=True)
        except Exception as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot read {adapter_dir / PICKLE_NAME}: {first_line}") from None
    raise UserError(f"{adapter_dir} has no {SAFETENSORS_NAME}: the adapter weights are missing")


def load_adapter(
    model: nn.Module, adapter_dir: str | Path, trust_pickle: bool = False, trainable: bool = False
) -> nn.Module:
    """Inject the adapter described in ``adapter_dir`` into ``model`` and load its weights (strictly).

    The adapter parameters are frozen unless ``trainable`` (e.g. to continue training).
    """
    data = read_adapter_config(adapter_dir)
    peft_type = data["peft_type"]
    if peft_type not in FORMATS:
        raise UserError(
            f"adapter type {peft_type!r} in {adapter_dir} is not supported: peftlab reads {', '.join(FORMATS)}"
        )
    fmt = FORMATS[peft_type]
    config = fmt.config_from_json(data)
    tensors = read_adapter_tensors(adapter_dir, trust_pickle)
    model = fmt.apply(model, config)
    load_adapter_state_dict(model, {fmt.from_file_key(k): v for k, v in tensors.items()})
    for param in adapter_parameters(model).values():
        param.requires_grad_(trainable)
    return model


# ---------------------------------------------------------------------------------------------
# peft's target_modules: a list of names/suffixes, or one string that is a full-match regex


def patterns_from_json(value: str | list[str] | None) -> list[str] | None:
    """peft's ``target_modules`` (or ``exclude_modules``, ``feedforward_modules``) as our target patterns."""
    if value is None:
        return None
    return [REGEX_PREFIX + value] if isinstance(value, str) else list(value)


def target_names(
    model: nn.Module, paths: list[str], adapter_type: type[nn.Module], layers: set[int] | None = None
) -> list[str] | None:
    """The sorted names of the adapter layers at ``paths`` (``["q_proj", "v_proj"]``), as peft writes
    ``target_modules`` when it can: if, inside blocks ``layers`` (None: all), they select exactly those
    layers; else None (write :func:`paths_regex` instead)."""
    names = sorted({p.rsplit(".", 1)[-1] for p in paths})
    selected = select_modules(model, names, layers=layers, module_type=(nn.Linear, adapter_type))
    return names if set(selected) == set(paths) else None


def paths_regex(paths: list[str]) -> str:
    """A ``target_modules`` regex that matches exactly these module paths."""
    return "|".join(re.escape(p) for p in paths)
