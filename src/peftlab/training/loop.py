"""The training loop: one loop for full fine-tuning and every PEFT method.

    peftlab train --model smollm2-135m-instruct --data demo:dialogsum --out runs/sum --max-steps 30

A run is a sequence of named phases, read top to bottom in ``_train``:

    prepare_data       render and split the data (before the model: data errors should not wait for a load)
    prepare_model      load the model; the method decides which parameters train
    Encoder, Batches   tokenise the examples, collate micro-batches onto the device
    build_regularizer  L2-SP / EWC anchors at the pre-trained weights (before a checkpoint is loaded)
    build_optimizer    AdamW (weight decay on matrices only) with linear warm-up and a cosine (or
                       linear, or constant) schedule
    restore            with ``--resume``: weights, optimizer, schedule, RNG states and data position
    train_loop         ``train_step`` per optimizer step; metrics, a validation loss and a checkpoint every N steps
                       and at the last step
    finish             the final model (or adapter) in ``final/``, ``run.json``

The loop never branches on the method: ``methods`` decides what trains and what ``final/`` holds.

The loss is the mean cross-entropy over the completion tokens of an optimizer step (all its
micro-batches together), so accumulation gives the same gradient as one big batch.

The data order is a seeded permutation per epoch; the position in it (epoch, micro-batch) is part
of every checkpoint, so ``--resume`` continues exactly where the run stopped: same weights,
optimizer moments, schedule, RNG states and next batch. It refuses settings that would change
the result (``_RESUME_FREE`` lists the ones it accepts), cuts ``metrics.jsonl`` back to what the
checkpoint had seen (the re-run steps are logged once), and says so when a run already finished.

What can end a run, and what it leaves:

    SIGINT / SIGTERM   ``StopRequests``: a checkpoint at the end of the current step, then ``Interrupted``
                       (exit 130 / 143 in the CLI) saying how to resume; a second signal exits at once
    NaN / inf          a step whose loss or gradient norm is not finite is never applied: the run stops
                       (``NonFiniteStep``, naming the step; checkpoints and ``final/`` hold finite weights
                       only) or, with ``--skip-nonfinite-steps``, skips it and counts it in ``run.json``
    out of memory      one line naming the options that need less memory
    a kill             the newest complete checkpoint (``checkpoint`` writes them whole) and ``--resume``

Under torchrun (``--parallel ddp|fsdp``) every process runs this loop; ``training.distributed`` holds
what differs: the wrapped model, each rank's share of a step's micro-batches, the sums over ranks,
and rank 0 alone reading and writing the run folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import transformers

from peftlab import __version__, method_table
from peftlab.config import TrainConfig, to_dict
from peftlab.data.encode import Encoded, collate, encode_example, pack, real_tokens, uses_chat_template
from peftlab.data.pipeline import Example, prepare, prepare_mixture
from peftlab.errors import UserError
from peftlab.memory import peak_memory
from peftlab.model_card import write_model_card
from peftlab.models import LoadedModel, load_model
from peftlab.outputs import (
    RUN_MARKER,
    RunFolder,
    fsync,
    fsync_tree,
    write_atomic,
    write_json,
)
from peftlab.peft import virtual_token_count
from peftlab.peft.core import ParameterReport
from peftlab.progress import ProgressFactory, silent
from peftlab.tracking import Trackers, parse_report_to
from peftlab.training import checkpoint as ckpt
from peftlab.training import methods
from peftlab.training.distributed import Distributed, OtherRankFailed, to_float
from peftlab.training.loss import CompletionLoss, plain_linear_head, target_count
from peftlab.training.lean_mlp import lean_gated_mlps
from peftlab.training.packing import packed_attention, supports_packing
from peftlab.training.regularize import Regularizer, make_regularizer

# The settings ``--resume`` may change: they do not change the trained weights. Every other one would
# (learning rate, schedule, steps, data, method options ...): resuming with it changed is refused.
_RESUME_FREE = ("out", "resume", "resume_from", "overwrite", "device", "log_every", "eval_every", "eval_limit",
                "save_every", "keep_checkpoints", "skip_nonfinite_steps", "report_to", "tracking_dir", "experiment", "run_name",
                "gradient_checkpointing", "parallel", "sharded_checkpoints")


@dataclass
class TrainResult:
    run_dir: Path
    final_dir: Path
    steps: int
    train_loss: float | None  # mean loss of the last logged steps
    eval_loss: float | None
    seconds: float
    tokens_per_second: float
    parameters: dict


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


MEGA_BATCH = 50  # --group-by-length sorts within this many micro-batches (transformers' LengthGroupedSampler)


def micro_batches(n: int, batch_size: int, seed: int, epoch: int, start: int,
                  lengths: list[int] | None = None) -> Iterator[tuple[int, list[int]]]:
    """(micro-batch index, example indices) of one epoch, from ``start`` on; the order is seeded by (seed, epoch).

    With ``lengths`` (``--group-by-length``) the seeded order is cut into mega-batches of ``MEGA_BATCH``
    micro-batches, each sorted longest first and cut into micro-batches of similar lengths, whose order
    is then shuffled with the same generator: little padding, and long and short steps still mixed.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if lengths is not None:
        mega = batch_size * MEGA_BATCH
        order = [j for i in range(0, n, mega) for j in sorted(order[i : i + mega], key=lambda j: -lengths[j])]
        cut = [order[i : i + batch_size] for i in range(0, n, batch_size)]
        batches = [cut[k] for k in torch.randperm(len(cut), generator=generator).tolist()]
    for i in range(start, len(batches)):
        yield i, batches[i]


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def validation_loss(model, examples: list[Encoded], batch_size: int, collate_fn: Callable[[list[Encoded]], dict],
                    device) -> float | None:
    """Mean loss per completion token; ``model`` is a ``CompletionLoss`` (possibly wrapped by DDP or FSDP:
    every rank computes the whole validation loss, so FSDP's ranks run the same forward passes)."""
    if not examples:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        loss, n = model(to_device(collate_fn(examples[i : i + batch_size]), device))
        total, count = total + loss.item(), count + n
    model.train(was_training)
    return total / max(count, 1)


class Interrupted(UserError):
    """SIGINT or SIGTERM stopped the run cleanly; the exit code is the shell's for that signal (130, 143)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class NonFiniteStep(UserError):
    """A step's loss or gradient norm was NaN or infinite (the weights were not updated with it)."""


def train(config: TrainConfig, progress: ProgressFactory = silent, log: Callable[[str], None] = lambda _: None) -> TrainResult:
    """Fine-tune ``config.model`` on ``config.data``; see the module docstring. Under torchrun every process
    calls this; only rank 0 logs, shows progress and writes the run folder."""
    dist = Distributed.for_training(config.parallel)
    if not dist.is_main:
        progress, log = silent, lambda _: None
    with dist.session(config.device) as device:
        config = dataclasses.replace(config, device=device) if device != config.device else config
        run = dist.on_main(lambda: _open_run(config, dist, log))
        try:
            result = _train(config, run, dist, progress, log)
        except (torch.OutOfMemoryError, MemoryError):
            if dist.is_main:
                run.abandon()
            again = " (--overwrite to start this run again)" if run.final.is_dir() else ""
            raise UserError(f"out of memory while training {config.model} on {config.device}: use a smaller --batch-size "
                            f"(with a larger --grad-accum to keep the batch), a shorter --max-length, a PEFT method "
                            f"(--method lora), --dtype bfloat16, or --quantize nf4{again}") from None
        except BaseException:
            if dist.is_main:
                run.abandon()
            raise
        dist.on_main(run.commit)
    result.run_dir = run.final
    result.final_dir = run.final / "final"
    return result


def _open_run(config: TrainConfig, dist: Distributed, log: Callable[[str], None]) -> RunFolder:
    check_parallel(config, dist)
    run = RunFolder.prepare(config.out, overwrite=config.overwrite, resume=config.resume)
    if config.resume:
        check_resume(run, config, log, dist.world_size)
    return run


def check_parallel(config: TrainConfig, dist: Distributed) -> None:
    """What ``--parallel fsdp`` cannot do, said before anything loads."""
    if dist.mode == "fsdp" and config.regularize:
        raise UserError(f"--regularize {config.regularize} anchors whole weights, which FSDP shards: use --parallel ddp")
    if config.sharded_checkpoints and dist.mode != "fsdp":
        raise UserError("--sharded-checkpoints writes FSDP's shards: launch with torchrun and --parallel fsdp, "
                        "or leave it out")


def check_resume(run: RunFolder, config: TrainConfig, log: Callable[[str], None], world_size: int = 1) -> None:
    """Refuse to resume a finished run, or with settings that change the result; warn about other versions."""
    marker = run.final / RUN_MARKER
    if not marker.exists():
        return  # an empty folder: the run stopped before it wrote anything
    try:
        info = json.loads(marker.read_text())
        stored = info["config"]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{marker} is corrupt ({type(e).__name__}: {str(e)[:80]}), so the run cannot be checked "
                        f"for resuming: restore the file, or start over with --overwrite") from None
    if info.get("status") == "finished":
        steps = (info.get("result") or {}).get("steps")
        raise UserError(f"the run in {run.final} already finished ({steps} steps, model in {run.final / 'final'}); "
                        f"nothing to resume: use --overwrite to train it again, or a new --out")
    ours = _result_settings(to_dict(config), world_size)
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    theirs = _result_settings({**defaults, **stored}, (info.get("distributed") or {}).get("world_size", 1))
    changed = sorted(k for k in ours.keys() & theirs.keys() if ours[k] != theirs[k])
    if changed:
        diffs = ", ".join(f"--{k.replace('_', '-')} {theirs[k]!r} -> {ours[k]!r}" for k in changed)
        raise UserError(f"--resume would change what the run in {run.final} trains: {diffs}; resume with the original "
                        f"settings, or start a new run (--overwrite or another --out)")
    old, new = info.get("versions", {}), versions()
    differ = [f"{name} {old[name]} -> {new[name]}" for name in new if name in old and old[name] != new[name]]
    if differ:
        log(f"warning: resuming with other versions than the run started with ({', '.join(differ)}): "
            f"the continued run may not match an uninterrupted one bit for bit")


def _result_settings(config: dict, world_size: int = 1) -> dict:
    """The settings that change the trained weights, the learning rate resolved (no --lr: the method's default).

    A step's micro-batches are ``--grad-accum`` x the processes: a resume may change the world size as
    long as that product stays (2 processes with --grad-accum 2 resume as 4 with 1, or 1 with 4)."""
    settings = {k: v for k, v in config.items() if k not in _RESUME_FREE}
    if settings.get("lr") is None and settings.get("method") in method_table.METHODS:
        settings["lr"] = method_table.get(settings["method"]).default_lr
    if "grad_accum" in settings:
        settings["grad_accum x processes"] = settings.pop("grad_accum") * world_size
    return settings


def versions() -> dict[str, str]:
    """What run.json records, so that a resume on other versions can say so."""
    return {"peftlab": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def _train(config: TrainConfig, run: RunFolder, dist: Distributed, progress: ProgressFactory,
           log: Callable[[str], None]) -> TrainResult:
    torch.manual_seed(config.seed)
    examples = prepare_data(config, log)
    setup = prepare_model(config, progress, log)
    encode = Encoder.for_model(config, setup)
    packed = config.batching == "packed" and supports_packing(setup.model, setup.is_seq2seq, virtual_token_count(setup.model))
    batches = Batches(encode(examples.train), encode(examples.validation[: config.eval_limit]),
                      setup.tokenizer.pad_token_id, setup.is_seq2seq, setup.device, packed)
    regularizer = build_regularizer(config, setup.model, encode, batches, progress)
    # what a step calls: the loss as one module, so that DDP / FSDP see all of it (training.distributed)
    setup.step_model = dist.wrap(CompletionLoss(setup.model, setup.is_seq2seq), shard_units=shard_units(setup.model))
    dist.seed(config.seed)
    optim = build_optimizer(config, setup.step_model, total_steps(config, len(batches.train), dist.world_size))
    state = restore(config, run.work / "checkpoints", setup, optim, len(batches.train), log, dist,
                    lengths=batches.lengths() if config.group_by_length else None)
    info = run_info(config, setup, examples, batches, encode.chat, optim.total_steps)
    info["distributed"] = {"parallel": dist.mode, "world_size": dist.world_size}
    with (open_trackers(config, run) if dist.is_main else Trackers([])) as trackers:
        info["tracking"] = {"report_to": list(parse_report_to(config.report_to)), "mlflow_run_id": trackers.mlflow_run_id}
        if dist.is_main:
            write_json(run.work / RUN_MARKER, info)
        with (MetricsLog(run.work, keep_lines=state.metrics_lines, trackers=trackers, write=dist.is_main) as metrics,
              StopRequests() as stop, packed_attention(setup.model, batches.packed), autocast(config, setup.device)):
            train_loop(config, state, setup.step_model, batches, optim, regularizer, run.work / "checkpoints", metrics,
                       progress, stop, dist, setup)
            if stop.signum is not None:  # rank 0 says how to resume; the others leave with the same exit code
                raise (_interrupted(run, state, optim, stop.signum) if dist.is_main
                       else OtherRankFailed("stopped by a signal", 128 + stop.signum))
            eval_loss = batches.validation_loss(setup.step_model, config.batch_size)
            if eval_loss is not None:
                metrics.write({"step": state.step, "eval_loss": eval_loss})
        weights = dist.trainable_state(setup.step_model, setup.model, CompletionLoss.PREFIX)
        result = dist.on_main(lambda: finish(config, run.work, state, setup, info, eval_loss,
                                             final_model(config, setup, weights, dist)))
        if dist.is_main:  # finish filled in info["result"] there
            trackers.log_metrics({f"final/{k}": v for k, v in info["result"].items() if k != "peak_memory"}, state.step)
    return result


def shard_units(model: torch.nn.Module) -> tuple[str, ...]:
    """The classes FSDP shards as one unit each: the transformer blocks (transformers' ``_no_split_modules``)."""
    for m in model.modules():
        names = getattr(m, "_no_split_modules", None)
        if names:
            return tuple(names)
    return ()


def final_model(config: TrainConfig, setup: ModelSetup, weights: dict[str, torch.Tensor], dist: Distributed) -> torch.nn.Module:
    """The model ``final/`` is saved from: the trained one, or under FSDP (whose modules hold shards) a plain
    copy built on rank 0's CPU as the run built it, with the trained weights gathered from the ranks."""
    if dist.mode != "fsdp":
        return setup.model
    loaded = load_model(config.model, dtype=config.dtype, device="cpu", quantize=setup.method.base_quantization(config),
                        compute_dtype=config.compute_dtype)
    torch.manual_seed(config.seed)
    model = setup.method.prepare(loaded, config)
    methods.load_trainable_state(model, weights)
    methods.copy_initial_factors(setup.model, model)
    return model


def open_trackers(config: TrainConfig, run: RunFolder) -> Trackers:
    """The trackers of ``--report-to``; a resumed run continues its MLflow run."""
    previous = run.work / RUN_MARKER
    run_id = None
    if config.resume and previous.is_file():
        run_id = (json.loads(previous.read_text()).get("tracking") or {}).get("mlflow_run_id")
    store = Path(config.tracking_dir) if config.tracking_dir else run.work
    return Trackers.open(parse_report_to(config.report_to), run.work, to_dict(config), run_name=config.run_name or run.final.name,
                         store_dir=store, experiment=config.experiment or Path(config.tracking_dir or config.out).resolve().name,
                         mlflow_run_id=run_id)


def _interrupted(run: RunFolder, state: TrainState, optim: Optimization, signum: int) -> Interrupted:
    name = signal.Signals(signum).name
    where = f"stopped by {name} after step {state.step} of {optim.total_steps}"
    if run.staged:
        return Interrupted(f"{where}; --overwrite replaces {run.final} only when the new run finishes, so it is "
                           f"unchanged: run the same command again to start over", signum)
    return Interrupted(f"{where}, checkpoint {ckpt.checkpoint_name(state.step)} saved: continue with the same command "
                       f"plus --resume (peftlab train ... --out {run.final} --resume)", signum)


# --- data and model


@dataclass
class Examples:
    """The run's rendered examples, before tokenisation, and what ``run.json`` records about them."""

    train: list[Example]
    validation: list[Example]
    info: dict


def prepare_data(config: TrainConfig, log: Callable[[str], None]) -> Examples:
    """One task split into train/validation, or several tasks split on their own and their training splits mixed."""
    if config.task:
        multi = prepare_mixture(config.task, config.split_fractions, config.split_seed, config.mix, config.mix_cap,
                                config.mix_temperature, config.mix_size, seed=config.seed, limit=config.limit)
        log(str(multi.mixture))
        examples = Examples(
            train=multi.train,
            validation=[ex for rows in multi.split("validation").values() for ex in rows],
            info={"tasks": {name: {k: len(v) for k, v in d.splits.items()} for name, d in multi.tasks.items()},
                  "mixture": multi.mixture.log_dict()},
        )
    else:
        data = prepare(config.data, config.template, config.split_fractions, config.split_seed)
        examples = Examples(train=data.splits["train"][: config.limit], validation=data.splits["validation"],
                            info={"task": data.task.task, **{k: len(v) for k, v in data.splits.items()}})
    if not examples.train:
        raise UserError(f"the training split of {config.data} is empty; add data or change --split-fractions")
    return examples


@dataclass
class ModelSetup:
    """The loaded model after the method has chosen what trains."""

    loaded: LoadedModel
    model: torch.nn.Module  # the method's model (an adapter injected into loaded.model, or loaded.model itself)
    method: Any  # methods.get(config.method): prepare / save_final
    report: ParameterReport
    device: torch.device
    step_model: torch.nn.Module | None = None  # what a training step calls: CompletionLoss(model), wrapped by DDP / FSDP

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def is_seq2seq(self) -> bool:
        return self.loaded.is_seq2seq


def prepare_model(config: TrainConfig, progress: ProgressFactory, log: Callable[[str], None]) -> ModelSetup:
    method = methods.get(config.method)
    loaded = load_model(config.model, dtype=config.dtype, device=config.device, progress=progress,
                        quantize=method.base_quantization(config), compute_dtype=config.compute_dtype)
    torch.manual_seed(config.seed)  # adapter initialisation does not depend on what loading consumed
    model = method.prepare(loaded, config)
    report = methods.parameter_report(model)
    log(str(report))
    setup = ModelSetup(loaded, model, method, report, next(model.parameters()).device)
    speed_options(config, setup)
    return setup


def speed_options(config: TrainConfig, setup: ModelSetup) -> None:
    """``--gradient-checkpointing`` (transformers' own, non-reentrant: RNG states are replayed, so dropout
    masks and results are the same), ``--compile`` (the module compiled in place: parameter names and
    checkpoints unchanged), and the check that ``--autocast bfloat16`` has hardware to run on. SwiGLU MLPs
    always keep two activations instead of three for the backward pass (``training.lean_mlp``: same gradients)."""
    lean_gated_mlps(setup.loaded.model)
    if config.autocast:
        check_bf16(setup.device)
    if config.gradient_checkpointing:
        if not getattr(setup.loaded.model, "supports_gradient_checkpointing", False):
            raise UserError(f"{type(setup.loaded.model).__name__} does not support --gradient-checkpointing; leave it out")
        setup.loaded.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if config.compile:  # what completion_loss calls: the decoder stack when the head is applied apart
        model = setup.model
        (model.base_model if not setup.is_seq2seq and plain_linear_head(model) else model).compile(dynamic=True)


def check_bf16(device: torch.device) -> None:
    """bfloat16 compute needs hardware for it; emulated on an AVX2 CPU it is several times slower than float32."""
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
    else:
        supported = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    if not supported:
        raise UserError(f"--autocast bfloat16: this {device.type.upper()} has no bfloat16 arithmetic (it would be emulated, "
                        f"slower than float32); leave --autocast out")


def autocast(config: TrainConfig, device: torch.device):
    """The ``--autocast`` context for the forward and backward passes (a no-op without it)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.autocast == "bfloat16")


@dataclass(frozen=True)
class Encoder:
    """Tokenises examples for this model: completion-only labels, positions left for virtual tokens."""

    tokenizer: Any
    is_seq2seq: bool
    chat: bool  # prompts wrapped in the tokenizer's chat template
    max_length: int  # prompt + completion tokens, after the virtual tokens' positions
    max_target_length: int

    @classmethod
    def for_model(cls, config: TrainConfig, setup: ModelSetup) -> Encoder:
        virtual = virtual_token_count(setup.model)  # soft prompts / prefixes take positions too
        context = min(config.max_length, setup.loaded.context_length or config.max_length)
        if context - virtual <= config.max_target_length:
            need = virtual + config.max_target_length + 1
            raise UserError(f"{virtual} virtual tokens plus an example of at least {config.max_target_length + 1} tokens need "
                            f"{need} positions, {need - context} more than the {context} available: use fewer --num-virtual-tokens")
        return cls(setup.tokenizer, setup.is_seq2seq, uses_chat_template(setup.tokenizer, config.chat_template),
                   context - virtual, config.max_target_length)

    def __call__(self, examples: list[Example]) -> list[Encoded]:
        return [encode_example(self.tokenizer, ex.prompt, ex.completion, is_seq2seq=self.is_seq2seq, chat=self.chat,
                               max_length=self.max_length, max_target_length=self.max_target_length) for ex in examples]


@dataclass
class Batches:
    """The tokenised training and validation sets, collated into micro-batches on the model's device:
    one packed row each (``--batching packed``, see ``training.packing``) or right-padded rows."""

    train: list[Encoded]
    validation: list[Encoded]
    pad_id: int
    is_seq2seq: bool
    device: torch.device
    packed: bool = False

    def collate(self, examples: list[Encoded]) -> dict[str, torch.Tensor]:
        return to_device(self._collate(examples), self.device)

    def _collate(self, examples: list[Encoded]) -> dict[str, torch.Tensor]:
        return pack(examples) if self.packed else collate(examples, self.pad_id, self.is_seq2seq)

    def lengths(self) -> list[int]:
        """Tokens of each training example (what ``--group-by-length`` sorts by)."""
        return [len(e.input_ids) + (len(e.labels) if self.is_seq2seq else 0) for e in self.train]

    def validation_loss(self, model, batch_size: int) -> float | None:
        return validation_loss(model, self.validation, batch_size, self._collate, self.device)


def build_regularizer(config: TrainConfig, model, encode: Encoder, batches: Batches,
                      progress: ProgressFactory) -> Regularizer | None:
    """``--regularize``: anchored at the pre-trained weights, so built before a checkpoint is loaded."""
    if not config.regularize:
        return None
    fisher_batches = None
    if config.regularize == "ewc":
        keep = prepare(config.ewc_data, config.ewc_template, config.split_fractions, config.split_seed).splits["train"]
        kept = encode(keep[: config.ewc_examples])
        fisher_batches = [batches.collate(kept[i : i + config.batch_size]) for i in range(0, len(kept), config.batch_size)]
    return make_regularizer(config.regularize, model, config.reg_lambda, fisher_batches, progress=progress)


# --- optimisation


def total_steps(config: TrainConfig, n_train: int, world_size: int = 1) -> int:
    """``--max-steps``, or the optimizer steps of ``--epochs`` passes over ``n_train`` examples (a step takes
    ``--grad-accum`` micro-batches on each of the ``world_size`` processes)."""
    steps_per_epoch = math.ceil(math.ceil(n_train / config.batch_size) / (config.grad_accum * world_size))
    return config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))


def param_groups(named_params: list[tuple[str, torch.nn.Parameter]], weight_decay: float, lr: float,
                 loraplus_ratio: float | None = None) -> list[dict]:
    """AdamW parameter groups: weight decay on matrices only, nanoGPT's rule (``configure_optimizers``);
    with LoRA+ a learning rate ``loraplus_ratio`` times larger for B.

    nanoGPT decays tensors with ``p.dim() >= 2``; here a dimension of size 1 does not count, because
    IA3 keeps its scaling vectors as (out, 1) or (1, in), peft's shapes. Decayed: weight matrices and
    embeddings (full fine-tuning), LoRA / DoRA A and B, bottleneck adapter weights, soft-prompt and
    prefix embeddings (virtual tokens, hidden). Not decayed: biases, norm weights, IA3 vectors, DoRA
    magnitudes: decay pulls a scale toward 0 (switching its layer off), not toward its starting value.
    (peft / HF Trainer decay everything but biases and norm weights, so they do decay IA3 vectors and
    DoRA magnitudes.) A LoRA of rank 1 or a single virtual token is a vector by this rule and not decayed.

    LoRA+ (Hayou et al. 2024, https://arxiv.org/abs/2402.12354): B, which starts at zero, learns at
    lr x ratio and A at lr; as in peft's ``create_loraplus_optimizer``, vectors (DoRA magnitudes) go with B.

    Parameters with the same decay and learning rate share one group, in model order: without
    ``--weight-decay`` and LoRA+ that is one group of every trainable parameter.
    """
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, p in named_params:
        is_matrix = sum(size > 1 for size in p.shape) >= 2
        fast = loraplus_ratio is not None and ("lora_B" in name or p.ndim == 1)
        groups.setdefault((weight_decay if is_matrix else 0.0, lr * loraplus_ratio if fast else lr), []).append(p)
    return [{"params": group, "weight_decay": decay, "lr": group_lr} for (decay, group_lr), group in groups.items()]


@dataclass
class Optimization:
    """The optimizer, its learning-rate schedule and the parameters they update."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    params: list[torch.nn.Parameter]  # the trainable parameters, in model order (gradient clipping)
    total_steps: int


def build_optimizer(config: TrainConfig, model, steps: int) -> Optimization:
    """AdamW over the trainable parameters (LoRA+: B faster); the learning rate warms up linearly, then follows ``--schedule``."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    groups = param_groups(named, config.weight_decay, config.learning_rate, config.loraplus_ratio)
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate)
    warmup = int(config.warmup_ratio * steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config.schedule, warmup, steps))
    return Optimization(optimizer, scheduler, params, steps)


# --- the run's position: restore and save


class DataOrder:
    """Where the run is in its seeded data order: (epoch, next micro-batch), both saved in a checkpoint."""

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int = 0, next_micro: int = 0,
                 lengths: list[int] | None = None) -> None:
        self.n, self.batch_size, self.seed, self.lengths = n, batch_size, seed, lengths  # lengths: --group-by-length
        self.per_epoch = math.ceil(n / batch_size)  # micro-batches per epoch
        self._start(epoch, next_micro)

    def _start(self, epoch: int, next_micro: int) -> None:
        self.epoch, self.next_micro = epoch, next_micro
        self._batches = micro_batches(self.n, self.batch_size, self.seed, epoch, next_micro, self.lengths)

    def take(self) -> list[int]:
        """The example indices of the next micro-batch; after an epoch's last one, the position is the next epoch's start."""
        i, indices = next(self._batches)
        self.next_micro = i + 1
        if self.next_micro == self.per_epoch:
            self._start(self.epoch + 1, 0)
        return indices

    @property
    def epochs_done(self) -> float:
        return round(self.epoch + self.next_micro / self.per_epoch, 4)


@dataclass
class TrainState:
    """What changes as the run goes: the optimizer step, the data position and counters, all kept in checkpoints."""

    step: int
    order: DataOrder
    seen_tokens: int = 0  # tokens the model read, over all the run's processes
    recent: list[float] = field(default_factory=list)  # losses of the last 10 logged steps
    skipped: int = 0  # steps skipped for a non-finite loss or gradient norm (--skip-nonfinite-steps)
    metrics_lines: int | None = 0  # lines of metrics.jsonl written up to ``step`` (None: keep the file as it is)
    earlier_seconds: float = 0.0  # training time of the processes before this one
    start: float = 0.0  # time.perf_counter() when this process started training

    @property
    def elapsed(self) -> float:
        return self.earlier_seconds + time.perf_counter() - self.start


def restore(config: TrainConfig, checkpoints: Path, setup: ModelSetup, optim: Optimization, n_train: int,
            log: Callable[[str], None], dist: Distributed | None = None, lengths: list[int] | None = None) -> TrainState:
    """Step 0 at the start of the data order, or with ``--resume`` a checkpoint's weights, optimizer
    moments, schedule, RNG states, data position and counters (the newest complete one, or ``--resume PATH``).
    Rank 0 reads the checkpoint and sends it to the other ranks."""
    dist = dist or Distributed()
    fresh = TrainState(0, DataOrder(n_train, config.batch_size, config.seed, lengths=lengths))
    if not config.resume:
        return fresh
    found = dist.on_main(lambda: _read_checkpoint(config, checkpoints, setup.model, log))
    if found is None:
        return fresh
    chosen, weights, opt_state, rng, saved = found
    if weights is None:  # a sharded checkpoint: every rank reads its shards
        if dist.mode != "fsdp":
            raise UserError(f"{chosen} is a sharded FSDP checkpoint: resume it under torchrun with --parallel fsdp")
        try:
            dist.load_sharded(setup.step_model, optim.optimizer, chosen / ckpt.SHARDED)
        except Exception as e:  # noqa: BLE001  (torch.distributed.checkpoint's errors name the missing or odd keys)
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UserError(f"the sharded checkpoint {chosen} does not fit this run ({reason}); resume with the "
                            f"original settings or start a new run") from None
    else:
        dist.load_trainable_state(setup.step_model, CompletionLoss.PREFIX, weights,
                                  lambda w: methods.load_trainable_state(setup.model, w))
        try:
            dist.load_optimizer_state(setup.step_model, optim.optimizer, opt_state)
        except ValueError as e:  # parameter groups differ: --weight-decay or --loraplus-ratio changed the groups
            raise UserError(f"the optimizer state in {chosen} does not fit this run ({e}); resume with the original "
                            f"--weight-decay and --loraplus-ratio or start a new run") from None
    optim.scheduler.load_state_dict(saved["scheduler"])
    own_rng = ckpt.rank_rng_state(rng, dist.rank)
    if own_rng is not None:
        ckpt.set_rng_state(own_rng)
    which = "as given" if config.resume_from else "the newest complete checkpoint"
    log(f"resuming from {chosen} ({which}): step {saved['step']} of {optim.total_steps}")
    dist.on_main(lambda: _tidy_checkpoints(config, checkpoints, saved["step"], log))
    return TrainState(saved["step"], DataOrder(n_train, config.batch_size, config.seed, saved["epoch"], saved["next_micro"], lengths),
                      seen_tokens=saved.get("tokens", 0), recent=saved.get("recent", []),
                      skipped=saved.get("skipped_steps", 0), metrics_lines=saved.get("metrics_lines"),
                      earlier_seconds=saved.get("elapsed_s", 0.0))


def _read_checkpoint(config: TrainConfig, checkpoints: Path, model, log: Callable[[str], None]) -> tuple | None:
    """(folder, weights, optimizer state, RNG states, trainer state) of the checkpoint to resume from; None: none yet."""
    if checkpoints.is_dir():
        ckpt.remove_leftovers(checkpoints)
    chosen = _chosen_checkpoint(config, checkpoints)
    if chosen is None:
        log("no checkpoint yet: starting from step 0")
        return None
    weights, opt_state, rng, saved = ckpt.load_checkpoint(chosen)
    if weights is not None:  # a sharded checkpoint's names are checked as its shards load
        methods.check_trainable_names(model, weights)
    return chosen, weights, opt_state, rng, saved


def _tidy_checkpoints(config: TrainConfig, checkpoints: Path, step: int, log: Callable[[str], None]) -> None:
    if checkpoints.is_dir():
        dropped = ckpt.drop_after(checkpoints, step)
        if dropped:
            log(f"deleted the later checkpoints {', '.join(dropped)}: the resumed run writes them again")
        ckpt.prune(checkpoints, config.keep_checkpoints)  # a kill may have come before the last save's deletions


def _chosen_checkpoint(config: TrainConfig, checkpoints: Path) -> Path | None:
    """``--resume PATH`` (a folder, or a checkpoint's name in this run), or the newest complete checkpoint."""
    if not config.resume_from:
        return ckpt.latest_checkpoint(checkpoints)
    for path in (Path(config.resume_from), checkpoints / config.resume_from):
        if path.is_dir():
            return path
    names = ", ".join(p.name for p in ckpt.complete_checkpoints(checkpoints)) if checkpoints.is_dir() else ""
    raise UserError(f"--resume {config.resume_from}: no such checkpoint folder; this run's checkpoints: {names or 'none'}")


def save_checkpoint(config: TrainConfig, checkpoints: Path, state: TrainState, setup: ModelSetup, optim: Optimization,
                    metrics: MetricsLog, dist: Distributed | None = None) -> None:
    """The trainable weights, optimizer state (both gathered whole under FSDP) and every rank's RNG state, written by rank 0."""
    dist = dist or Distributed()
    rngs = dist.gather(ckpt.rng_state())
    position = {"step": state.step, "epoch": state.order.epoch, "next_micro": state.order.next_micro,
                "scheduler": optim.scheduler.state_dict(), "total_steps": optim.total_steps,
                "tokens": state.seen_tokens, "recent": state.recent, "skipped_steps": state.skipped,
                "metrics_lines": metrics.lines, "elapsed_s": state.elapsed}
    if config.sharded_checkpoints:  # every rank writes its shards into rank 0's hidden folder, which rank 0 then commits
        tmp = dist.on_main(lambda: ckpt.begin_checkpoint(checkpoints, state.step))
        bad = dist.save_sharded(setup.step_model, optim.optimizer, tmp / ckpt.SHARDED)

        def commit() -> None:
            if bad:
                raise NonFiniteStep(f"step {state.step}: weight {bad[0]} is no longer finite, not saved; "
                                    f"{_divergence_advice(checkpoints)}")
            ckpt.commit_checkpoint(checkpoints, state.step, position, config.keep_checkpoints, rng=ckpt.ranks_rng_state(rngs))

        dist.on_main(commit)
        return
    weights = dist.trainable_state(setup.step_model, setup.model, CompletionLoss.PREFIX)
    opt_state = dist.optimizer_state(setup.step_model, optim.optimizer)

    def write() -> None:
        check_finite_weights(weights, state.step, checkpoints)
        ckpt.save_checkpoint(checkpoints, state.step, weights, opt_state, position, keep=config.keep_checkpoints,
                             rng=ckpt.ranks_rng_state(rngs))

    dist.on_main(write)


def check_finite_weights(weights: dict[str, torch.Tensor], step: int, checkpoints: Path) -> None:
    """Nothing non-finite is ever saved (huge learning rates can overflow weights even from finite gradients)."""
    for name, p in weights.items():
        if not torch.isfinite(p).all():
            raise NonFiniteStep(f"step {step}: weight {name} is no longer finite, not saved; {_divergence_advice(checkpoints)}")


def _divergence_advice(checkpoints: Path) -> str:
    latest = ckpt.latest_checkpoint(checkpoints) if checkpoints.is_dir() else None
    kept = f"the last good checkpoint {latest.name} is kept" if latest else "no checkpoint was saved before"
    return (f"{kept}; training diverged: start again with a lower --lr (--overwrite), or pass --skip-nonfinite-steps "
            f"to skip such steps")


# --- training


class MetricsLog:
    """``metrics.jsonl``, and the same records to the ``--report-to`` trackers (TensorBoard, MLflow).

    One JSON record per line, flushed at once: a killed run keeps what it logged. A resumed run first
    cuts the file back to the ``keep_lines`` its checkpoint had seen (a killed run's later lines, and a
    half-written last one, go: the re-run steps are logged once). Used as a context manager, so the
    file is closed however the run ends.
    """

    def __init__(self, folder: Path, keep_lines: int | None = 0, trackers: Trackers | None = None, write: bool = True) -> None:
        self.folder = folder
        self.keep_lines = keep_lines
        self.trackers = trackers or Trackers([])
        self.lines = 0  # lines in metrics.jsonl: what a checkpoint records
        self.enabled = write  # False on ranks other than 0: they record nothing

    def __enter__(self) -> MetricsLog:
        if not self.enabled:
            return self
        path = self.folder / "metrics.jsonl"
        kept = path.read_text().split("\n")[:-1] if path.exists() else []  # complete lines only
        if self.keep_lines is not None and path.exists():
            kept = kept[: self.keep_lines]
            write_atomic(path, "".join(line + "\n" for line in kept))
        self.lines = len(kept)
        self._file = path.open("a")
        return self

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self.lines += 1
        self.trackers.log_metrics(record, record["step"])

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._file.close()


class StopRequests:
    """SIGINT / SIGTERM while training: the first asks the loop to stop after the current step (which it
    saves as a checkpoint); a second exits at once (the newest complete checkpoint stays resumable).

    Signal handlers live in the main thread: elsewhere (a thread running ``train``) this does nothing.
    The handler writes its notice with ``os.write``: ``print`` could re-enter the stream it interrupted.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            os.write(2, f"\npeftlab: second {name}: stopped at once; --resume continues from the newest checkpoint\n".encode())
            os._exit(128 + signum)
        self.signum = signum
        os.write(2, f"\npeftlab: {name}: stopping after this step with a checkpoint ({name} again stops at once)\n".encode())

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


@dataclass
class StepStats:
    """What one optimizer step measured (the metrics record of a logged step)."""

    loss: float  # mean cross-entropy per completion token of the step
    completion_tokens: int
    tokens: int  # tokens the model read (seq2seq: encoder and decoder)
    grad_norm: float  # before clipping
    penalty: float | None  # the --regularize term

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)


def train_step(model, micro: list[dict[str, torch.Tensor]], optim: Optimization, regularizer: Regularizer | None,
               max_grad_norm: float | None, is_seq2seq: bool, dist: Distributed | None = None) -> StepStats:
    """One optimizer step over ``micro`` (this process's ``--grad-accum`` micro-batches), then one step of the schedule.

    ``model`` is a ``CompletionLoss`` (under torchrun wrapped by DDP or FSDP). Each micro-batch's summed
    loss is divided by the completion tokens of the whole step, over all processes, so the accumulated
    gradient is that of the mean over the step, as one big batch would give (``training.distributed``
    says why the loss is also multiplied by ``dist.grad_scale``). A step whose loss or gradient norm is
    not finite leaves the weights and optimizer moments as they were (its gradients are dropped); the
    caller decides whether the run goes on.
    """
    dist = dist or Distributed()
    optim.optimizer.zero_grad(set_to_none=True)
    local_tokens = sum(target_count(b["labels"], is_seq2seq) for b in micro)
    tokens = sum(real_tokens(b) + (int((b["labels"] != -100).sum()) if is_seq2seq else 0) for b in micro)
    n_tokens, tokens = (int(v) for v in dist.all_sum(local_tokens, tokens))
    loss_sum = 0.0
    for i, b in enumerate(micro):
        with dist.accumulating(model, sync=i == len(micro) - 1):
            loss, _ = model(b)
            (loss * dist.grad_scale / max(n_tokens, 1) if dist.active else loss / max(n_tokens, 1)).backward()
        loss_sum += loss.item()
    (loss_sum,) = dist.all_sum(loss_sum)
    penalty = None
    if regularizer is not None:  # once per step: the same as adding it to the step's loss (identical on every rank)
        penalty = regularizer.penalty(getattr(model, "module", model).model)  # the model inside DDP and CompletionLoss
        penalty.backward()
    grads = [p.grad for p in optim.params if p.grad is not None]
    grad_norm = (torch.nn.utils.clip_grad_norm_(optim.params, max_grad_norm) if max_grad_norm
                 else torch.nn.utils.get_total_norm(grads))
    stats = StepStats(loss_sum / max(n_tokens, 1), n_tokens, tokens, to_float(grad_norm),
                      penalty.item() if penalty is not None else None)
    if stats.finite:
        optim.optimizer.step()
    else:
        optim.optimizer.zero_grad(set_to_none=True)
    optim.scheduler.step()  # a skipped step still counts: the schedule stays a function of the step
    return stats


def train_loop(config: TrainConfig, state: TrainState, model, batches: Batches, optim: Optimization,
               regularizer: Regularizer | None, checkpoints: Path, metrics: MetricsLog, progress: ProgressFactory,
               stop: StopRequests, dist: Distributed, setup: ModelSetup) -> None:
    """Optimizer steps until ``total_steps`` or a stop request; metrics every ``--log-every``, a validation
    loss every ``--eval-every`` (the last step's is the caller's), a checkpoint every ``--save-every``
    steps, at the last step and at a stop request (any rank's: the ranks agree on it after each step).

    A step takes ``--grad-accum x world size`` micro-batches from the data order, the same on every
    rank; each rank trains on its own block of them."""
    bar = progress("training", optim.total_steps, "step")
    bar.update(state.step)
    try:
        model.train()
        state.start = time.perf_counter()
        while state.step < optim.total_steps:
            step_micro = [state.order.take() for _ in range(config.grad_accum * dist.world_size)]
            micro = [batches.collate([batches.train[j] for j in indices])
                     for indices in dist.micro_share(step_micro, config.grad_accum)]
            stats = train_step(model, micro, optim, regularizer, config.max_grad_norm, batches.is_seq2seq, dist)
            count_step(config, state, stats, checkpoints)
            last = state.step == optim.total_steps
            if state.step % config.log_every == 0 or last:
                metrics.write(step_record(state, stats, optim))
            if config.eval_every and state.step % config.eval_every == 0 and not last:
                metrics.write({"step": state.step, "eval_loss": batches.validation_loss(model, config.batch_size)})
            bar.update(1, loss=f"{stats.loss:.4f}", tok_per_s=f"{state.seen_tokens / state.elapsed:.0f}")
            stopping = dist.any(stop.signum is not None)
            if stopping and stop.signum is None:  # another rank's signal: this one stops with it
                stop.signum = signal.SIGTERM
            if (config.save_every and state.step % config.save_every == 0) or last or stopping:
                save_checkpoint(config, checkpoints, state, setup, optim, metrics, dist)
            if stopping:
                break
    finally:  # closed before an error's message, which must be the last line
        bar.close()


def count_step(config: TrainConfig, state: TrainState, stats: StepStats, checkpoints: Path) -> None:
    """Advance the state by one step; a non-finite one stops the run, or with ``--skip-nonfinite-steps`` is counted."""
    state.step += 1
    state.seen_tokens += stats.tokens
    if stats.finite:
        state.recent = (state.recent + [stats.loss])[-10:]
        return
    if not config.skip_nonfinite_steps:
        raise NonFiniteStep(f"step {state.step}: the loss is {stats.loss} and the gradient norm {stats.grad_norm} at "
                            f"--lr {config.learning_rate:g}, so the run stopped without applying it; "
                            f"{_divergence_advice(checkpoints)}")
    state.skipped += 1


def step_record(state: TrainState, stats: StepStats, optim: Optimization) -> dict:
    """The metrics.jsonl record of a logged step."""
    elapsed = state.elapsed
    return {
        "step": state.step, "epoch": state.order.epochs_done, "loss": stats.loss,
        "lr": optim.scheduler.get_last_lr()[0], "grad_norm": stats.grad_norm,
        "completion_tokens": stats.completion_tokens, "tokens": stats.tokens,
        "tokens_per_sec": state.seen_tokens / elapsed, "elapsed_s": elapsed,
        **({"penalty": stats.penalty} if stats.penalty is not None else {}),
        **({} if stats.finite else {"skipped": True}),
    }


# --- run.json and the final model


def run_info(config: TrainConfig, setup: ModelSetup, examples: Examples, batches: Batches, chat: bool, steps: int) -> dict:
    """``run.json`` while the run is running; ``finish`` adds the result."""
    return {
        "status": "running",
        "config": to_dict(config),
        "model": {"name": setup.loaded.name, "path": setup.loaded.path, "seq2seq": setup.is_seq2seq,
                  "class": type(setup.model).__name__},
        "method": config.method,
        "parameters": methods.report_dict(setup.report),
        "data": {**examples.info, "train_used": len(batches.train), "chat_template": chat},
        "total_steps": steps,
        "versions": versions(),
    }


def finish(config: TrainConfig, work: Path, state: TrainState, setup: ModelSetup, info: dict,
           eval_loss: float | None, model: torch.nn.Module | None = None) -> TrainResult:
    """The final model (or adapter) in ``final/``, whole or not at all, and ``run.json`` with the result.
    ``model``: what to save, when not ``setup.model`` (FSDP's plain copy, see ``final_model``)."""
    model = setup.model if model is None else model
    check_finite_weights(methods.trainable_state(model), state.step, work / "checkpoints")
    staging = work / ".final.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    setup.method.save_final(model, setup.tokenizer, staging, setup.loaded, config)
    seconds = state.elapsed
    train_loss = sum(state.recent) / len(state.recent) if state.recent else None
    tokens_per_second = state.seen_tokens / seconds if seconds else 0.0
    info.update(status="finished", result={"steps": state.step, "train_loss": train_loss, "eval_loss": eval_loss,
                                           "seconds": seconds, "tokens_per_second": tokens_per_second,
                                           "skipped_steps": state.skipped, "peak_memory": peak_memory(setup.device)})
    write_model_card(staging, info)  # README.md: the Hugging Face model card of what final/ holds
    fsync_tree(staging)
    if (work / "final").exists():  # a resumed run whose kill came after final/ but before run.json said finished
        shutil.rmtree(work / "final")
    os.replace(staging, work / "final")
    fsync(work)
    write_json(work / RUN_MARKER, info)
    return TrainResult(work, work / "final", state.step, train_loss, eval_loss, seconds, tokens_per_second,
                       methods.report_dict(setup.report))
