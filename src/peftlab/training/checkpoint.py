"""Run folders and checkpoints.

A run folder holds ``run.json`` (resolved config, versions, model, parameter report, status),
``metrics.jsonl``, ``checkpoints/step-NNNNNN/`` and ``final/``. A checkpoint holds what resuming
needs: the trainable weights (``weights.safetensors``: the whole model for full fine-tuning, the
adapter only for PEFT), ``optimizer.pt`` (AdamW moments), ``rng.pt`` (Python, torch, CUDA RNG
states; under torchrun rank 0's, with every rank's under ``"ranks"``) and ``state.json`` (step, data
position, scheduler). The files are the same whether one process or several (DDP, FSDP) trained.
With ``--sharded-checkpoints`` (FSDP, for models whose state would not fit one process) a ``sharded/``
folder of torch.distributed.checkpoint files, each process writing its own shards, replaces
``weights.safetensors`` and ``optimizer.pt``; it resumes under FSDP.

A checkpoint is written into a hidden ``.step-NNNNNN.tmp`` folder, fsynced (files, then the
folder) and renamed into place, and the rename is fsynced: a ``step-*`` folder is complete, even
after a power cut. Only then are the checkpoints beyond the newest ``--keep-checkpoints`` deleted,
each renamed to a hidden ``.deleting`` folder first, so a kill during deletion never leaves a
half-deleted ``step-*`` folder. Hidden leftovers of a killed process are removed on resume and by the next save.

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

from peftlab.errors import UserError
from peftlab.outputs import fsync, fsync_tree, write_json

FILES = ("weights.safetensors", "optimizer.pt", "rng.pt", "state.json")
SHARDED = "sharded"  # --sharded-checkpoints: weights and optimizer state as torch.distributed.checkpoint shards
SHARDED_FILES = (f"{SHARDED}/.metadata", "rng.pt", "state.json")  # instead of FILES


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


def ranks_rng_state(states: list[dict]) -> dict:
    """What ``rng.pt`` holds: rank 0's state (all a one-process run has), and with several ranks each one's."""
    return states[0] if len(states) == 1 else {**states[0], "ranks": states}


def rank_rng_state(state: dict, rank: int) -> dict | None:
    """The RNG state rank ``rank`` resumes with: its own; None when the checkpoint had fewer ranks (the rank
    keeps its own seeded stream: dropout then draws other masks than an uninterrupted run would)."""
    ranks = [{k: v for k, v in s.items() if k != "ranks"} for s in (state.get("ranks") or [state])]
    return ranks[rank] if rank < len(ranks) else None


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def save_checkpoint(folder: Path, step: int, weights: dict[str, torch.Tensor], optimizer, state: dict, keep: int,
                    rng: dict | None = None) -> Path:
    """Write ``step-NNNNNN`` whole, then delete all but the newest ``keep`` complete checkpoints.

    ``optimizer``: the optimizer or its state dict; ``rng``: the RNG states (default: this process's)."""
    tmp = begin_checkpoint(folder, step)
    # clone: tied weights share storage, which safetensors refuses; contiguous for transposed views
    save_file({k: v.detach().contiguous().clone() for k, v in weights.items()}, tmp / "weights.safetensors")
    torch.save(optimizer if isinstance(optimizer, dict) else optimizer.state_dict(), tmp / "optimizer.pt")
    return commit_checkpoint(folder, step, state, keep, rng)


def begin_checkpoint(folder: Path, step: int) -> Path:
    """The hidden folder checkpoint ``step`` is written into (``--sharded-checkpoints``: every process writes
    its shards there, then rank 0 calls :func:`commit_checkpoint`)."""
    folder.mkdir(parents=True, exist_ok=True)
    remove_leftovers(folder)
    tmp = folder / f".{checkpoint_name(step)}.tmp"
    tmp.mkdir()
    return tmp


def commit_checkpoint(folder: Path, step: int, state: dict, keep: int, rng: dict | None = None) -> Path:
    """Add the RNG and trainer state to the hidden folder of ``step``, fsync it and rename it into place."""
    target = folder / checkpoint_name(step)
    tmp = folder / f".{target.name}.tmp"
    torch.save(rng if rng is not None else rng_state(), tmp / "rng.pt")
    write_json(tmp / "state.json", state)
    fsync_tree(tmp)
    if target.exists():  # the same step again (a resumed run re-saving it): the old one goes only now
        _delete(target)
    os.replace(tmp, target)
    fsync(folder)
    prune(folder, keep)
    return target


def is_sharded(checkpoint: Path) -> bool:
    return (checkpoint / SHARDED).is_dir()


def prune(folder: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints."""
    for old in complete_checkpoints(folder)[:-keep]:
        _delete(old)


def _delete(checkpoint: Path) -> None:
    """Rename out of sight first: a kill midway leaves a hidden folder, never a half-deleted checkpoint."""
    doomed = checkpoint.with_name(f".{checkpoint.name}.deleting")
    os.replace(checkpoint, doomed)
    fsync(checkpoint.parent)
    shutil.rmtree(doomed)


def remove_leftovers(folder: Path) -> None:
    """What a killed process left: unfinished ``.tmp`` checkpoints and half-deleted ``.deleting`` ones."""
    for leftover in folder.glob(".step-*"):
        shutil.rmtree(leftover)


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-", 1)[1])


def complete_checkpoints(folder: Path) -> list[Path]:
    """The ``step-*`` folders holding every checkpoint file, oldest first."""
    found = [p for p in folder.glob("step-*") if p.name[5:].isdigit()
             and (all((p / f).is_file() for f in FILES) or all((p / f).is_file() for f in SHARDED_FILES))]
    return sorted(found, key=_step)


def latest_checkpoint(folder: Path) -> Path | None:
    done = complete_checkpoints(folder)
    return done[-1] if done else None


def drop_after(folder: Path, step: int) -> list[str]:
    """Delete the checkpoints past ``step`` (a run resumed from an earlier one writes them again); their names."""
    later = [p for p in folder.glob("step-*") if p.name[5:].isdigit() and _step(p) > step]
    for checkpoint in later:
        _delete(checkpoint)
    return sorted(p.name for p in later)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor] | None, dict | None, dict, dict]:
    """(weights, optimizer state, rng state, trainer state) of a checkpoint folder (weights and optimizer None
    in a sharded one); an unreadable file is a ``UserError`` that names it and an older checkpoint to resume from."""
    names = SHARDED_FILES if is_sharded(path) else FILES
    missing = [name for name in names if not (path / name).is_file()]
    if missing:
        raise UserError(f"{path} is not a complete checkpoint (no {', '.join(missing)}); {_fallback(path)}")
    readers = {
        "weights.safetensors": load_file,
        "optimizer.pt": lambda f: torch.load(f, weights_only=True),
        "rng.pt": lambda f: torch.load(f, weights_only=False),  # our own file: Python's RNG state is a tuple
        "state.json": lambda f: json.loads(Path(f).read_text()),
    }
    loaded = [None, None] if is_sharded(path) else []  # sharded weights and optimizer: every process reads its own
    for name in FILES if not loaded else FILES[2:]:
        try:
            loaded.append(readers[name](path / name))
        except Exception as e:  # truncated or corrupt: safetensors, pickle, zip and JSON each fail their own way
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
            raise UserError(f"checkpoint file {path / name} is unreadable ({reason}); {_fallback(path)}") from None
    weights, optimizer, rng, state = loaded
    return weights, optimizer, rng, state


def _fallback(path: Path) -> str:
    older = [p for p in complete_checkpoints(path.parent) if _step(p) < _step(path)] if path.name[5:].isdigit() else []
    if older:
        return f"resume from an older checkpoint with --resume {older[-1]}, or start over with --overwrite"
    return "start over with --overwrite (no older checkpoint to resume from)"
