"""Run folders and checkpoints.

A run folder holds ``run.json`` (resolved config, model, parameter report, status),
``metrics.jsonl``, ``checkpoints/step-NNNNNN/`` and ``final/``. A checkpoint holds what resuming
needs: the trainable weights (``weights.safetensors``: the whole model for full fine-tuning, the
adapter only for PEFT), ``optimizer.pt`` (AdamW moments), ``rng.pt`` (Python, torch, CUDA RNG
states) and ``state.json`` (step, data position, scheduler). Every folder is written under a
temporary name and renamed into place, so a killed run never leaves a half-written checkpoint.

The run folder itself (``RunFolder``: staging, ``--overwrite``, ``--resume``) is ``peftlab.outputs``'s.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from peftlab.outputs import write_json

def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: Path, step: int, weights: dict[str, torch.Tensor], optimizer, state: dict) -> Path:
    target = folder / f"step-{step:06d}"
    tmp = folder / f".step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # clone: tied weights share storage, which safetensors refuses; contiguous for transposed views
    save_file({k: v.detach().contiguous().clone() for k, v in weights.items()}, tmp / "weights.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    write_json(tmp / "state.json", state)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def latest_checkpoint(folder: Path) -> Path | None:
    done = sorted(p for p in folder.glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict, dict]:
    """(weights, optimizer state, rng state, trainer state) of a checkpoint folder."""
    weights = load_file(path / "weights.safetensors")
    optimizer = torch.load(path / "optimizer.pt", weights_only=True)
    rng = torch.load(path / "rng.pt", weights_only=False)  # our own file: Python's RNG state is a tuple
    state = json.loads((path / "state.json").read_text())
    return weights, optimizer, rng, state
