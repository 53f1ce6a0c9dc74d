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
    finish             the last checkpoint, the final model (or adapter) in ``final/``, ``run.json``

The loop never branches on the method: ``methods`` decides what trains and what ``final/`` holds.

The loss is the mean cross-entropy over the completion tokens of an optimizer step (all its
micro-batches together), so accumulation gives the same gradient as one big batch.

The data order is a seeded permutation per epoch; the position in it (epoch, micro-batch) is part
of every checkpoint, so ``--resume`` continues exactly where the run stopped: same weights,
optimizer moments, schedule, RNG states and next batch.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from peftlab.config import TrainConfig, to_dict
from peftlab.data.encode import Encoded, collate, encode_example, uses_chat_template
from peftlab.data.pipeline import Example, prepare, prepare_mixture
from peftlab.errors import UserError
from peftlab.memory import peak_memory
from peftlab.models import LoadedModel, load_model
from peftlab.outputs import RUN_MARKER, RunFolder, write_json
from peftlab.peft import virtual_token_count
from peftlab.peft.core import ParameterReport
from peftlab.progress import ProgressFactory, silent
from peftlab.training import checkpoint as ckpt
from peftlab.training import methods
from peftlab.training.loss import completion_loss, target_count
from peftlab.training.regularize import Regularizer, make_regularizer

# Settings that must not change when a run is resumed.
_RESUME_KEYS = ("model", "data", "task", "mix", "mix_cap", "mix_temperature", "mix_size", "method", "template",
                "split_fractions", "split_seed", "limit", "batch_size", "grad_accum", "seed", "regularize", "reg_lambda")


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


def micro_batches(n: int, batch_size: int, seed: int, epoch: int, start: int) -> Iterator[tuple[int, list[int]]]:
    """(micro-batch index, example indices) of one epoch, from ``start`` on; the order is seeded by (seed, epoch)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    for i in range(start, math.ceil(n / batch_size)):
        yield i, order[i * batch_size : (i + 1) * batch_size]


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def validation_loss(model, examples: list[Encoded], batch_size: int, pad_id: int, is_seq2seq: bool, device) -> float | None:
    if not examples:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        loss, n = completion_loss(model, to_device(collate(examples[i : i + batch_size], pad_id, is_seq2seq), device), is_seq2seq)
        total, count = total + loss.item(), count + n
    model.train(was_training)
    return total / max(count, 1)


def train(config: TrainConfig, progress: ProgressFactory = silent, log: Callable[[str], None] = lambda _: None) -> TrainResult:
    """Fine-tune ``config.model`` on ``config.data``; see the module docstring."""
    run = RunFolder.prepare(config.out, overwrite=config.overwrite, resume=config.resume)
    if config.resume:
        _check_resume(run, config)
    try:
        result = _train(config, run, progress, log)
    except BaseException:
        run.abandon(resumable=ckpt.latest_checkpoint(run.work / "checkpoints") is not None)
        raise
    run.commit()
    result.run_dir = run.final
    result.final_dir = run.final / "final"
    return result


def _check_resume(run: RunFolder, config: TrainConfig) -> None:
    stored = json.loads((run.final / RUN_MARKER).read_text())["config"]
    changed = [k for k in _RESUME_KEYS if stored.get(k) != getattr(config, k)]
    if changed:
        diffs = ", ".join(f"--{k.replace('_', '-')} {stored.get(k)!r} -> {getattr(config, k)!r}" for k in changed)
        raise UserError(f"--resume with different settings than the run in {run.final}: {diffs}; use the original ones")


def _train(config: TrainConfig, run: RunFolder, progress: ProgressFactory, log: Callable[[str], None]) -> TrainResult:
    torch.manual_seed(config.seed)
    examples = prepare_data(config, log)
    setup = prepare_model(config, progress, log)
    encode = Encoder.for_model(config, setup)
    batches = Batches(encode(examples.train), encode(examples.validation[: config.eval_limit]),
                      setup.tokenizer.pad_token_id, setup.is_seq2seq, setup.device)
    regularizer = build_regularizer(config, setup.model, encode, batches, progress)
    optim = build_optimizer(config, setup.model, total_steps(config, len(batches.train)))
    state = restore(config, run.work / "checkpoints", setup.model, optim, len(batches.train), log)
    info = run_info(config, setup, examples, batches, encode.chat, optim.total_steps)
    write_json(run.work / RUN_MARKER, info)
    with MetricsLog(run.work) as metrics:
        train_loop(config, state, setup.model, batches, optim, regularizer, run.work / "checkpoints", metrics, progress)
        eval_loss = batches.validation_loss(setup.model, config.batch_size)
        if eval_loss is not None:
            metrics.write({"step": state.step, "eval_loss": eval_loss})
    return finish(config, run.work, state, setup, optim, info, eval_loss)


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

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def is_seq2seq(self) -> bool:
        return self.loaded.is_seq2seq


def prepare_model(config: TrainConfig, progress: ProgressFactory, log: Callable[[str], None]) -> ModelSetup:
    loaded = load_model(config.model, dtype=config.dtype, device=config.device, progress=progress)
    torch.manual_seed(config.seed)  # adapter initialisation does not depend on what loading consumed
    method = methods.get(config.method)
    model = method.prepare(loaded, config)
    report = methods.parameter_report(model)
    log(str(report))
    return ModelSetup(loaded, model, method, report, next(model.parameters()).device)


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
    """The tokenised training and validation sets, collated into padded micro-batches on the model's device."""

    train: list[Encoded]
    validation: list[Encoded]
    pad_id: int
    is_seq2seq: bool
    device: torch.device

    def collate(self, examples: list[Encoded]) -> dict[str, torch.Tensor]:
        return to_device(collate(examples, self.pad_id, self.is_seq2seq), self.device)

    def validation_loss(self, model, batch_size: int) -> float | None:
        return validation_loss(model, self.validation, batch_size, self.pad_id, self.is_seq2seq, self.device)


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


def total_steps(config: TrainConfig, n_train: int) -> int:
    """``--max-steps``, or the optimizer steps of ``--epochs`` passes over ``n_train`` examples."""
    steps_per_epoch = math.ceil(math.ceil(n_train / config.batch_size) / config.grad_accum)
    return config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))


def param_groups(params: list[torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """AdamW parameter groups: weight decay on matrices only, nanoGPT's rule (``configure_optimizers``).

    nanoGPT decays tensors with ``p.dim() >= 2``; here a dimension of size 1 does not count, because
    IA3 keeps its scaling vectors as (out, 1) or (1, in), peft's shapes. Decayed: weight matrices and
    embeddings (full fine-tuning), LoRA / DoRA A and B, bottleneck adapter weights, soft-prompt and
    prefix embeddings (virtual tokens, hidden). Not decayed: biases, norm weights, IA3 vectors, DoRA
    magnitudes: decay pulls a scale toward 0 (switching its layer off), not toward its starting value.
    (peft / HF Trainer decay everything but biases and norm weights, so they do decay IA3 vectors and
    DoRA magnitudes.) A LoRA of rank 1 or a single virtual token is a vector by this rule and not decayed.

    Parameters with the same decay share one group, in model order: without ``--weight-decay`` that is
    one group of every trainable parameter.
    """
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for p in params:
        is_matrix = sum(size > 1 for size in p.shape) >= 2
        groups.setdefault(weight_decay if is_matrix else 0.0, []).append(p)
    return [{"params": group, "weight_decay": decay} for decay, group in groups.items()]


@dataclass
class Optimization:
    """The optimizer, its learning-rate schedule and the parameters they update."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    params: list[torch.nn.Parameter]  # the trainable parameters, in model order (gradient clipping)
    total_steps: int


def build_optimizer(config: TrainConfig, model, steps: int) -> Optimization:
    """AdamW over the trainable parameters; the learning rate warms up linearly, then follows ``--schedule``."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(params, config.weight_decay), lr=config.learning_rate)
    warmup = int(config.warmup_ratio * steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config.schedule, warmup, steps))
    return Optimization(optimizer, scheduler, params, steps)


# --- the run's position: restore and save


class DataOrder:
    """Where the run is in its seeded data order: (epoch, next micro-batch), both saved in a checkpoint."""

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int = 0, next_micro: int = 0) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.per_epoch = math.ceil(n / batch_size)  # micro-batches per epoch
        self._start(epoch, next_micro)

    def _start(self, epoch: int, next_micro: int) -> None:
        self.epoch, self.next_micro = epoch, next_micro
        self._batches = micro_batches(self.n, self.batch_size, self.seed, epoch, next_micro)

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
    """What changes as the run goes: the optimizer step, the data position and throughput counters."""

    step: int
    order: DataOrder
    seen_tokens: int = 0  # since this process started training
    recent: list[float] = field(default_factory=list)  # losses of the last 10 steps
    start: float = 0.0  # time.perf_counter() when training started

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def restore(config: TrainConfig, checkpoints: Path, model, optim: Optimization, n_train: int,
            log: Callable[[str], None]) -> TrainState:
    """Step 0 at the start of the data order, or with ``--resume`` the newest checkpoint's weights,
    optimizer moments, schedule, RNG states and data position."""
    latest = ckpt.latest_checkpoint(checkpoints) if config.resume else None
    if latest is None:
        if config.resume:
            log("no checkpoint yet: starting from step 0")
        return TrainState(0, DataOrder(n_train, config.batch_size, config.seed))
    weights, opt_state, rng, saved = ckpt.load_checkpoint(latest)
    methods.load_trainable_state(model, weights)
    try:
        optim.optimizer.load_state_dict(opt_state)
    except ValueError as e:  # parameter groups differ: --weight-decay changed which tensors decay
        raise UserError(f"the optimizer state in {latest} does not fit this run ({e}); resume with the original "
                        f"--weight-decay or start a new run") from None
    optim.scheduler.load_state_dict(saved["scheduler"])
    ckpt.set_rng_state(rng)
    log(f"resuming from {latest.name}: step {saved['step']} of {optim.total_steps}")
    return TrainState(saved["step"], DataOrder(n_train, config.batch_size, config.seed, saved["epoch"], saved["next_micro"]))


def save_checkpoint(checkpoints: Path, state: TrainState, model, optim: Optimization) -> None:
    position = {"step": state.step, "epoch": state.order.epoch, "next_micro": state.order.next_micro,
                "scheduler": optim.scheduler.state_dict(), "total_steps": optim.total_steps}
    ckpt.save_checkpoint(checkpoints, state.step, methods.trainable_state(model), optim.optimizer, position)


# --- training


class MetricsLog:
    """``metrics.jsonl`` and, when tensorboard is installed, the same scalars under ``tensorboard/``.

    One JSON record per line, flushed at once: a killed run keeps what it logged. Used as a context
    manager, so both are closed however the run ends.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __enter__(self) -> MetricsLog:
        self._tensorboard = _tensorboard(self.folder)
        self._file = (self.folder / "metrics.jsonl").open("a")
        return self

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(key, value, record["step"])

    def __exit__(self, *exc) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


def _tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: metrics.jsonl only
        return None
    return SummaryWriter(str(folder / "tensorboard"))


@dataclass
class StepStats:
    """What one optimizer step measured (the metrics record of a logged step)."""

    loss: float  # mean cross-entropy per completion token of the step
    completion_tokens: int
    tokens: int  # tokens the model read (seq2seq: encoder and decoder)
    grad_norm: float | None  # before clipping; None without --max-grad-norm
    penalty: float | None  # the --regularize term


def train_step(model, micro: list[dict[str, torch.Tensor]], optim: Optimization, regularizer: Regularizer | None,
               max_grad_norm: float | None, is_seq2seq: bool) -> StepStats:
    """One optimizer step over ``micro`` (``--grad-accum`` micro-batches), then one step of the schedule.

    Each micro-batch's summed loss is divided by the completion tokens of the whole step, so the
    accumulated gradient is that of the mean over the step, as one big batch would give.
    """
    optim.optimizer.zero_grad(set_to_none=True)
    n_tokens = sum(target_count(b["labels"], is_seq2seq) for b in micro)
    loss_sum, tokens = 0.0, 0
    for b in micro:
        loss, _ = completion_loss(model, b, is_seq2seq)
        (loss / max(n_tokens, 1)).backward()
        loss_sum += loss.item()
        tokens += int(b["attention_mask"].sum()) + (int((b["labels"] != -100).sum()) if is_seq2seq else 0)
    penalty = None
    if regularizer is not None:  # once per step: the same as adding it to the step's loss
        penalty = regularizer.penalty(model)
        penalty.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(optim.params, max_grad_norm) if max_grad_norm else None
    optim.optimizer.step()
    optim.scheduler.step()
    return StepStats(loss_sum / max(n_tokens, 1), n_tokens, tokens, float(grad_norm) if grad_norm is not None else None,
                     penalty.item() if penalty is not None else None)


def train_loop(config: TrainConfig, state: TrainState, model, batches: Batches, optim: Optimization,
               regularizer: Regularizer | None, checkpoints: Path, metrics: MetricsLog, progress: ProgressFactory) -> None:
    """Optimizer steps until ``total_steps``; metrics every ``--log-every``, a validation loss every
    ``--eval-every`` and a checkpoint every ``--save-every`` steps (the last step's are ``finish``'s)."""
    bar = progress("training", optim.total_steps, "step")
    bar.update(state.step)
    model.train()
    state.start = time.perf_counter()
    while state.step < optim.total_steps:
        micro = [batches.collate([batches.train[j] for j in state.order.take()]) for _ in range(config.grad_accum)]
        stats = train_step(model, micro, optim, regularizer, config.max_grad_norm, batches.is_seq2seq)
        state.step += 1
        state.seen_tokens += stats.tokens
        state.recent = (state.recent + [stats.loss])[-10:]
        last = state.step == optim.total_steps
        elapsed = state.elapsed
        if state.step % config.log_every == 0 or last:
            metrics.write({
                "step": state.step, "epoch": state.order.epochs_done, "loss": stats.loss,
                "lr": optim.scheduler.get_last_lr()[0], "grad_norm": stats.grad_norm,
                "completion_tokens": stats.completion_tokens, "tokens": stats.tokens,
                "tokens_per_sec": state.seen_tokens / elapsed, "elapsed_s": elapsed,
                **({"penalty": stats.penalty} if stats.penalty is not None else {}),
            })
        if config.eval_every and state.step % config.eval_every == 0 and not last:
            metrics.write({"step": state.step, "eval_loss": batches.validation_loss(model, config.batch_size)})
        if config.save_every and state.step % config.save_every == 0 and not last:
            save_checkpoint(checkpoints, state, model, optim)
        bar.update(1, loss=f"{stats.loss:.4f}", tok_per_s=f"{state.seen_tokens / elapsed:.0f}")
    bar.close()


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
    }


def finish(config: TrainConfig, work: Path, state: TrainState, setup: ModelSetup, optim: Optimization, info: dict,
           eval_loss: float | None) -> TrainResult:
    """The last checkpoint, the final model (or adapter) in ``final/``, and ``run.json`` with the result."""
    save_checkpoint(work / "checkpoints", state, setup.model, optim)
    setup.method.save_final(setup.model, setup.tokenizer, work / "final", setup.loaded, config)
    seconds = state.elapsed
    train_loss = sum(state.recent) / len(state.recent) if state.recent else None
    tokens_per_second = state.seen_tokens / seconds if seconds else 0.0
    info.update(status="finished", result={"steps": state.step, "train_loss": train_loss, "eval_loss": eval_loss,
                                           "seconds": seconds, "tokens_per_second": tokens_per_second,
                                           "peak_memory": peak_memory(setup.device)})
    write_json(work / RUN_MARKER, info)
    return TrainResult(work, work / "final", state.step, train_loss, eval_loss, seconds, tokens_per_second,
                       methods.report_dict(setup.report))
