"""Load a model with its linear layers quantised to NF4 one at a time, as their weights are read.

``load_model`` followed by ``quantize_model`` holds the whole unquantised model first: for a
135M-parameter model in float32 that is 540 MB before the 4-bit copy (about 70 MB for the linear
layers) replaces it, and the allocator rarely gives that peak back. Here the model is built with
its parameters on the ``meta`` device (no storage; buffers such as rotary frequencies are computed
as usual), then the safetensors files are read tensor by tensor: a linear weight becomes an
:class:`~peftlab.peft.nf4.NF4Linear` at once and its float copy is dropped; every other tensor is
put in place as read. The peak is the 4-bit model plus one float layer.

The result equals ``quantize_model(load_model(...))`` bit for bit (the same weights reach the same
quantiser). Folders this cannot read this way (pickled ``.bin`` weights, checkpoint names that
differ from the model's own) return None, and the caller loads whole and quantises after.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from torch import nn

from peftlab.peft.core import replace_module
from peftlab.peft.nf4 import NF4Linear


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on ``meta`` (no memory); buffers are built as usual."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            meta = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            module._parameters[name] = meta

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _tensor_files(folder: Path) -> dict[str, Path] | None:
    """Checkpoint key -> the safetensors file holding it; None when the folder has no safetensors weights."""
    single = folder / "model.safetensors"
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {key: single for key in f.keys()}
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return {key: folder / name for key, name in weight_map.items()}
    return None


def load_quantized(model_class, config, folder: Path, dtype: torch.dtype, compute_dtype: torch.dtype,
                   device: torch.device) -> nn.Module | None:
    """``model_class`` built from ``config`` with the weights of ``folder``, every linear layer but the head in NF4.

    Returns None (nothing kept) when the folder's tensors do not map one to one onto the model's.
    """
    files = _tensor_files(folder)
    if files is None:
        return None
    with parameters_on_meta():
        model = model_class.from_config(config, dtype=dtype)
    head = model.get_output_embeddings()
    names = dict(model.named_parameters(remove_duplicate=False))
    linears = {
        path: module for path, module in model.named_modules()
        if type(module) is nn.Linear and module is not head and f"{path}.weight" in files
    }
    if any(key not in names for key in files):
        return None  # names from another version or architecture: let transformers map them
    keep_float32 = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())

    def read(key: str, target_dtype: torch.dtype) -> torch.Tensor:
        with safe_open(str(files[key]), framework="pt", device="cpu") as f:
            tensor = f.get_tensor(key)
        if tensor.is_floating_point():
            tensor = tensor.to(target_dtype)
        return tensor.to(device)

    for path, linear in linears.items():
        weight = read(f"{path}.weight", dtype)
        bias = read(f"{path}.bias", dtype) if linear.bias is not None else None
        replace_module(model, path, NF4Linear(weight, bias, compute_dtype).train(linear.training))
        del weight, bias  # one float layer at a time
    quantised = {f"{path}.{name}" for path in linears for name in ("weight", "bias")}
    for key in files:
        if key in quantised:
            continue
        module_path, _, name = key.rpartition(".")
        module = model.get_submodule(module_path)
        param = module._parameters[name]
        keep = any(part in keep_float32 for part in module_path.split("."))
        module._parameters[name] = nn.Parameter(read(key, torch.float32 if keep else dtype), requires_grad=param.requires_grad)
    model.tie_weights()
    if any(p.device.type == "meta" for p in model.parameters()):
        return None  # a tensor the folder lacks (and no tie supplies): the whole-model path reports it properly
    for buffer_owner in model.modules():  # buffers were built on the CPU
        for name, buffer in buffer_owner._buffers.items():
            if buffer is not None and buffer.device != device:
                buffer_owner._buffers[name] = buffer.to(device)
    return model
