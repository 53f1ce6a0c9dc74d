"""Data-parallel (DDP) and fully sharded (FSDP2) runs on torch.distributed, launched by torchrun.

    torchrun --nproc_per_node=4 -m peftlab train --model ... --data ... --out runs/x --parallel fsdp
    torchrun --nnodes=2 --node-rank=0 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        -m peftlab train ...                                 # the same command on every node

torchrun starts one process per device and gives each ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``;
this module is everything of peftlab that talks to ``torch.distributed`` (the loop calls its hooks):
the process group (NCCL on GPUs, gloo on CPUs), wrapping the model (``DistributedDataParallel``, or
``fully_shard`` per decoder layer and then the root), the sums a step needs across ranks, and full
state dicts gathered to rank 0 for checkpoints and ``final/``.

Why a distributed step equals one process with the same global batch: every rank walks the same
seeded data order; an optimizer step takes ``--grad-accum x world size`` micro-batches from it, and
rank r trains on the r-th block of ``--grad-accum`` of them, so the union over ranks is what one
process with ``--grad-accum x world size`` would see. Each rank divides its summed token losses by
the completion tokens of the *whole* global step (an all-reduce), and multiplies by the world size
because DDP and FSDP average gradients over ranks: the reduced gradient is then the sum over the
ranks' micro-batches of (token losses / global tokens), exactly the single-process gradient. The
global gradient norm is the one clipped: DDP gradients are already reduced, FSDP's are DTensors
whose norm ``clip_grad_norm_`` reduces over the shards.

Only rank 0 touches the run folder: it writes checkpoints, metrics, reports and ``final/``, and it
reads a checkpoint to resume and sends its contents to the others (``on_main``), so the ranks of
other nodes need no shared file system. A checkpoint has the same files and keys under one process,
DDP and FSDP (the trainable weights and the optimizer state gathered whole), so ``--resume`` may
change the world size.

Dropout draws from each rank's own generator (seeded by rank), so with dropout the runs of two
world sizes are equally good samples, not the same numbers; without it they match to float
rounding.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

from peftlab.errors import UserError

T = TypeVar("T")

MODES = ("ddp", "fsdp")


class OtherRankFailed(UserError):
    """Raised on ranks 1..N-1 when rank 0 stopped with an error of its own: rank 0 prints the one line."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def launched() -> bool:
    """Whether torchrun (or another launcher setting the env:// variables) started this process."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def env_rank() -> int:
    """This process's rank from the launcher's environment (0 when not launched): who prints."""
    return int(os.environ.get("RANK", "0")) if launched() else 0


@dataclass
class Distributed:
    """Who this process is in the run, and the collectives the loop needs (identities for one process)."""

    mode: str | None = None  # "ddp", "fsdp", "split" (evaluation: items split over ranks); None: one process
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device_type: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.mode is not None

    # --- the process group

    @classmethod
    def for_training(cls, parallel: str | None) -> Distributed:
        """``--parallel`` or, under torchrun with several processes, DDP; one process otherwise."""
        if not launched():
            if parallel:
                raise UserError(f"--parallel {parallel} needs one process per device, started by torchrun: "
                                f"torchrun --nproc_per_node=N -m peftlab train ... --parallel {parallel}")
            return cls()
        world = int(os.environ["WORLD_SIZE"])
        mode = parallel or ("ddp" if world > 1 else None)
        if mode is None:
            return cls()
        return cls(mode, int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))

    @classmethod
    def for_evaluation(cls) -> Distributed:
        """Under torchrun with several processes: the items of each task split over the ranks."""
        if not launched() or int(os.environ["WORLD_SIZE"]) == 1:
            return cls()
        return cls("split", int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))

    @classmethod
    def current(cls) -> Distributed:
        """The evaluation split of a command that started the process group (``peftlab harness`` / ``eval``
        under torchrun), read from torch.distributed; one process otherwise."""
        if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
            return cls()
        backend = dist.get_backend()
        return cls("split", dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                   "cuda" if backend == "nccl" else "cpu")

    def device(self, device: str) -> str:
        """The device of this rank: ``--device cuda`` (or auto on a GPU machine) means this process's GPU, LOCAL_RANK."""
        if not self.active:
            return device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise UserError(f"--device {device}: no CUDA device on this machine; use --device cpu")
            if torch.cuda.device_count() <= self.local_rank:
                raise UserError(f"this node has {torch.cuda.device_count()} GPUs but torchrun started local rank "
                                f"{self.local_rank}: use --nproc_per_node={torch.cuda.device_count()} or fewer")
            device = f"cuda:{self.local_rank}"
            torch.cuda.set_device(self.local_rank)
        self.device_type = torch.device(device).type
        return device

    def start(self, device: str) -> str:
        """Join the process group (NCCL on GPUs, gloo on CPUs); the device this rank computes on."""
        device = self.device(device)
        if self.active and not dist.is_initialized():
            backend = "nccl" if self.device_type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=timedelta(minutes=30),
                                    device_id=torch.device(device) if backend == "nccl" else None)
        return device

    def stop(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()

    @contextlib.contextmanager
    def session(self, device: str) -> Iterator[str]:
        """The process group for the duration of a command; yields this rank's device."""
        try:
            yield self.start(device)
        finally:
            self.stop()

    # --- collectives

    def _tensor(self, values: list[float]) -> torch.Tensor:
        # NCCL reduces CUDA tensors only; float64 keeps token counts exact far beyond a run's size
        device = torch.device("cuda", torch.cuda.current_device()) if self.device_type == "cuda" else torch.device("cpu")
        return torch.tensor(values, dtype=torch.float64, device=device)

    def all_sum(self, *values: float) -> list[float]:
        """Each value summed over the ranks (one all-reduce)."""
        if not self.active:
            return list(values)
        t = self._tensor(list(values))
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """Whether any rank says yes (a stop request reaches one rank before the others)."""
        if not self.active:
            return flag
        t = self._tensor([float(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def on_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` on rank 0 (the file system's side of the run), its result sent to every rank.

        An error of rank 0 reaches the others as ``OtherRankFailed`` (rank 0 prints the message), so no rank
        waits for a partner that left; the result travels pickled, so keep it to what the others need.
        """
        if not self.active:
            return fn()
        box: list[Any] = [None]
        error: BaseException | None = None
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except BaseException as e:  # noqa: BLE001  (re-raised below, after telling the others)
                error = e
                code = e.exit_code if isinstance(e, UserError) else 1
                box[0] = ("failed", (f"rank 0 stopped: {e}", code))
        dist.broadcast_object_list(box, src=0)
        if error is not None:
            raise error
        status, value = box[0]
        if status == "failed":
            raise OtherRankFailed(*value)
        return value

    # --- splitting work

    def shard(self, items: list[T]) -> list[T]:
        """This rank's share of ``items``: every world_size-th one from its rank on."""
        return items[self.rank :: self.world_size] if self.active else items

    def unshard(self, mine: list[T]) -> list[T]:
        """The inverse of ``shard``: every rank's items back in their original order."""
        if not self.active:
            return mine
        parts = self.gather(mine)
        total = sum(len(p) for p in parts)
        return [parts[i % self.world_size][i // self.world_size] for i in range(total)]

    def micro_share(self, micro: list[T], per_rank: int) -> list[T]:
        """This rank's block of a global step's ``per_rank x world_size`` micro-batches."""
        return micro[self.rank * per_rank : (self.rank + 1) * per_rank]

    def seed(self, seed: int) -> None:
        """Each rank its own stream for dropout (rank 0 keeps the one-process stream)."""
        if self.active and self.rank > 0:
            torch.manual_seed(seed * 1_000_003 + self.rank)

    # --- the model

    @property
    def grad_scale(self) -> float:
        """What a rank's loss is multiplied by so that the ranks' averaged gradients become their sum."""
        return float(self.world_size) if self.mode in MODES else 1.0

    def wrap(self, module: torch.nn.Module, *, shard_units: tuple[str, ...] = ()) -> torch.nn.Module:
        """DDP, or FSDP2: ``fully_shard`` on each decoder layer (``shard_units``: their class names), then the root.

        FSDP2 shards each parameter on its own (DTensor), so frozen bfloat16 weights and float32 adapters
        can share a unit; it needs one dtype among the *trainable* parameters of a unit, so a unit whose
        trainable parameters mix dtypes is split first into units per submodule (``_shard_uniform``).
        """
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.local_rank] if self.device_type == "cuda" else None
            # broadcast_buffers off: no buffer changes while training (rotary tables, NF4 codes), and the
            # validation pass then needs no collective
            return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)
        if self.mode == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(self.device_type, (self.world_size,))
            for unit in [m for m in module.modules() if type(m).__name__ in shard_units]:
                _shard_uniform(unit, mesh)
            _shard_uniform(module, mesh)
        return module

    @contextlib.contextmanager
    def accumulating(self, module: torch.nn.Module, sync: bool) -> Iterator[None]:
        """A micro-batch's forward and backward; gradients are reduced across ranks only when ``sync``
        (the step's last micro-batch): accumulation without communication."""
        if self.mode == "ddp" and not sync:
            with module.no_sync():
                yield
            return
        if self.mode == "fsdp":
            module.set_requires_gradient_sync(sync)
        yield

    # --- full state dicts (the same files under one process, DDP and FSDP)

    def trainable_state(self, module: torch.nn.Module, model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
        """The trainable weights of ``model`` (``module``'s submodule at ``prefix``) by their names in ``model``;
        under FSDP gathered whole onto rank 0's CPU (an empty dict elsewhere)."""
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        if self.mode != "fsdp":
            params = dict(model.named_parameters())
            return {n: params[n] for n in names}
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        full = get_model_state_dict(module, options=_full_options(ignore_frozen_params=True))
        return {n: full[prefix + n] for n in names} if self.is_main else {}

    def load_trainable_state(self, module: torch.nn.Module, prefix: str, weights: dict[str, torch.Tensor],
                             load: Callable[[dict[str, torch.Tensor]], None]) -> None:
        """Every rank holds ``weights`` whole; FSDP keeps its shard of each, the others ``load`` them as one process."""
        if self.mode != "fsdp":
            load(weights)
            return
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(module, {prefix + n: w for n, w in weights.items()}, options=_full_options(strict=False, cpu_offload=False))

    def optimizer_state(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """``optimizer.state_dict()`` as one process has it (parameters numbered in group order); under FSDP
        gathered whole onto rank 0 (an empty dict elsewhere)."""
        if self.mode != "fsdp":
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        full = get_optimizer_state_dict(module, optimizer, options=_full_options())
        if not self.is_main:
            return {}
        number = {name: i for i, name in enumerate(n for g in full["param_groups"] for n in g["params"])}
        return {"state": {number[name]: s for name, s in full["state"].items()},
                "param_groups": [{**g, "params": [number[n] for n in g["params"]]} for g in full["param_groups"]]}

    def load_optimizer_state(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """The inverse of ``optimizer_state``: every rank holds ``state`` whole."""
        if self.mode != "fsdp":
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        names = {id(p): n for n, p in module.named_parameters()}
        order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
        groups = state["param_groups"]
        if len(groups) != len(optimizer.param_groups) or sum(len(g["params"]) for g in groups) != len(order):
            raise ValueError("loaded state dict has a different number of parameter groups or parameters")
        named = {"state": {order[i]: s for i, s in state["state"].items()},
                 "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in groups]}
        set_optimizer_state_dict(module, optimizer, named, options=_full_options(cpu_offload=False))


    # --- sharded checkpoints (torch.distributed.checkpoint): each rank writes and reads its own shards

    def save_sharded(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> list[str]:
        """Write the trainable weights and the optimizer state of ``module`` (FSDP-wrapped) into ``path``,
        every rank its own shards; returns the names of trainable tensors with non-finite values (all ranks')."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
        from torch.distributed.tensor import DTensor

        weights, optim = get_state_dict(module, optimizer, options=StateDictOptions(ignore_frozen_params=True))
        local = [n for n, t in weights.items()
                 if not torch.isfinite(t.to_local() if isinstance(t, DTensor) else t).all()]
        bad = sorted({n for names in self.gather(local) for n in names})
        if not bad:  # nothing non-finite is ever saved
            dcp.save({"model": weights, "optim": optim}, checkpoint_id=str(path))
        return bad

    def load_sharded(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
        """The inverse of ``save_sharded`` (torch.distributed.checkpoint maps the saved shards onto this run's)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

        weights, optim = get_state_dict(module, optimizer, options=StateDictOptions(ignore_frozen_params=True))
        state = {"model": weights, "optim": optim}
        dcp.load(state, checkpoint_id=str(path))  # fails on a key the checkpoint lacks
        # not strict: the frozen weights are not in a checkpoint (they come from the base model)
        set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(ignore_frozen_params=True, strict=False))


def _full_options(**overrides: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**{"full_state_dict": True, "cpu_offload": True, **overrides})


def _trainable_dtypes(module: torch.nn.Module) -> set[torch.dtype]:
    """Dtypes of the trainable parameters ``fully_shard(module)`` would take (those of inner units are theirs)."""
    from torch.distributed.fsdp import FSDPModule

    dtypes, stack = set(), [module]
    while stack:
        m = stack.pop()
        dtypes |= {p.dtype for p in m.parameters(recurse=False) if p.requires_grad}
        stack.extend(c for c in m.children() if not isinstance(c, FSDPModule))
    return dtypes


def _shard_uniform(module: torch.nn.Module, mesh) -> None:
    """``fully_shard(module)``, after sharding its children on their own while its trainable dtypes are mixed."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(module, FSDPModule):
        return
    if len(_trainable_dtypes(module)) > 1:
        for child in module.children():
            if _trainable_dtypes(child):
                _shard_uniform(child, mesh)
        own = {p.dtype for p in module.parameters(recurse=False) if p.requires_grad}
        if len(own) > 1:
            raise UserError(f"--parallel fsdp: {type(module).__name__} holds trainable parameters of several dtypes "
                            f"({', '.join(sorted(map(str, own)))}), which FSDP cannot shard together; use --parallel ddp")
    fully_shard(module, mesh=mesh)


def to_float(value: torch.Tensor) -> float:
    """A reduced scalar as a float; FSDP's gradient norm is a DTensor (replicated after its reduction)."""
    from torch.distributed.tensor import DTensor

    return float(value.full_tensor() if isinstance(value, DTensor) else value)
