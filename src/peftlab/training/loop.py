"""The training loop: one loop for full fine-tuning and every PEFT method.

    peftlab train --model smollm2-135m-instruct --data demo:dialogsum --out runs/sum --max-steps 30

Read it top to bottom: prepare the run folder, load the model and let the method decide which
parameters train, render and tokenise the data, then AdamW with linear warm-up and a cosine (or
linear, or constant) schedule, gradient accumulation, gradient clipping, a validation loss every N
steps, checkpoints every N steps, and the final model (or adapter) in ``final/``.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from peftlab.training import methods
from peftlab.config import TrainConfig, to_dict
from peftlab.data.encode import Encoded, collate, encode_example, uses_chat_template
from peftlab.data.mixtures import prepare_mixture
from peftlab.data.pipeline import prepare
from peftlab.errors import UserError
from peftlab.outputs import RUN_MARKER, RunFolder, write_json
from peftlab.memory import peak_memory
from peftlab.models import load_model
from peftlab.peft import virtual_token_count
from peftlab.progress import ProgressFactory, silent
from peftlab.training import checkpoint as ckpt
from peftlab.training.loss import completion_loss, target_count
from peftlab.training.regularize import make_regularizer

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


def _check_resume(run: RunFolder, config: TrainConfig) -> None:
    stored = json.loads((run.final / RUN_MARKER).read_text())["config"]
    changed = [k for k in _RESUME_KEYS if stored.get(k) != getattr(config, k)]
    if changed:
        diffs = ", ".join(f"--{k.replace('_', '-')} {stored.get(k)!r} -> {getattr(config, k)!r}" for k in changed)
        raise UserError(f"--resume with different settings than the run in {run.final}: {diffs}; use the original ones")


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


def _train(config: TrainConfig, run: RunFolder, progress: ProgressFactory, log: Callable[[str], None]) -> TrainResult:
    torch.manual_seed(config.seed)
    work = run.work

    # --- data (before the model: data errors should not wait for a model load)
    if config.task:  # multi-task: each task split on its own, the training splits mixed
        multi = prepare_mixture(config.task, config.split_fractions, config.split_seed, config.mix, config.mix_cap,
                                config.mix_temperature, config.mix_size, seed=config.seed, limit=config.limit)
        train_examples = multi.train
        validation = [ex for rows in multi.split("validation").values() for ex in rows]
        data_info = {"tasks": {name: {k: len(v) for k, v in d.splits.items()} for name, d in multi.tasks.items()},
                     "mixture": multi.mixture.log_dict()}
        log(str(multi.mixture))
    else:
        data = prepare(config.data, config.template, config.split_fractions, config.split_seed)
        train_examples = data.splits["train"][: config.limit]
        validation = data.splits["validation"]
        data_info = {"task": data.task.task, **{k: len(v) for k, v in data.splits.items()}}
    if not train_examples:
        raise UserError(f"the training split of {config.data} is empty; add data or change --split-fractions")

    # --- model and method
    loaded = load_model(config.model, dtype=config.dtype, device=config.device, progress=progress)
    model, tokenizer, is_seq2seq = loaded.model, loaded.tokenizer, loaded.is_seq2seq
    torch.manual_seed(config.seed)  # adapter initialisation does not depend on what loading consumed
    method = methods.get(config.method)
    model = method.prepare(loaded, config)
    report = methods.parameter_report(model)
    log(str(report))
    device = next(model.parameters()).device

    chat = uses_chat_template(tokenizer, config.chat_template)
    virtual = virtual_token_count(model)  # soft prompts / prefixes take positions too
    context = min(config.max_length, loaded.context_length or config.max_length)
    max_length = context - virtual
    if max_length <= config.max_target_length:
        need = virtual + config.max_target_length + 1
        raise UserError(f"{virtual} virtual tokens plus an example of at least {config.max_target_length + 1} tokens need "
                        f"{need} positions, {need - context} more than the {context} available: use fewer --num-virtual-tokens")
    encode = lambda ex: encode_example(  # noqa: E731
        tokenizer, ex.prompt, ex.completion, is_seq2seq=is_seq2seq, chat=chat,
        max_length=max_length, max_target_length=config.max_target_length,
    )
    train_set = [encode(ex) for ex in train_examples]
    val_set = [encode(ex) for ex in validation[: config.eval_limit]]
    pad_id = tokenizer.pad_token_id
    regularizer = None
    if config.regularize:  # anchored at the pre-trained weights: built before a checkpoint is loaded
        fisher_batches = None
        if config.regularize == "ewc":
            keep = prepare(config.ewc_data, config.ewc_template, config.split_fractions, config.split_seed).splits["train"]
            kept = [encode(ex) for ex in keep[: config.ewc_examples]]
            fisher_batches = [to_device(collate(kept[i : i + config.batch_size], pad_id, is_seq2seq), device)
                              for i in range(0, len(kept), config.batch_size)]
        regularizer = make_regularizer(config.regularize, model, config.reg_lambda, fisher_batches, progress=progress)

    # --- optimisation
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    micro_per_epoch = math.ceil(len(train_set) / config.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / config.grad_accum)
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    warmup = int(config.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config.schedule, warmup, total_steps))

    step, epoch, next_micro = 0, 0, 0
    checkpoints = work / "checkpoints"
    if config.resume and (latest := ckpt.latest_checkpoint(checkpoints)) is not None:
        weights, opt_state, rng, state = ckpt.load_checkpoint(latest)
        methods.load_trainable_state(model, weights)
        optimizer.load_state_dict(opt_state)
        scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(rng)
        step, epoch, next_micro = state["step"], state["epoch"], state["next_micro"]
        log(f"resuming from {latest.name}: step {step} of {total_steps}")
    elif config.resume:
        log("no checkpoint yet: starting from step 0")

    info = {
        "status": "running",
        "config": to_dict(config),
        "model": {"name": loaded.name, "path": loaded.path, "seq2seq": is_seq2seq, "class": type(model).__name__},
        "method": config.method,
        "parameters": methods.report_dict(report),
        "data": {**data_info, "train_used": len(train_set), "chat_template": chat},
        "total_steps": total_steps,
    }
    write_json(work / RUN_MARKER, info)
    metrics_file = (work / "metrics.jsonl").open("a")
    tensorboard = _tensorboard(work)

    def save(step_now: int) -> None:
        state = {"step": step_now, "epoch": epoch, "next_micro": next_micro, "scheduler": scheduler.state_dict(), "total_steps": total_steps}
        ckpt.save_checkpoint(checkpoints, step_now, methods.trainable_state(model), optimizer, state)

    def write(record: dict) -> None:
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        if tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    tensorboard.add_scalar(key, value, record["step"])

    bar = progress("training", total_steps, "step")
    bar.update(step)
    model.train()
    start = time.perf_counter()
    seen_tokens, recent, eval_loss = 0, [], None
    batches = micro_batches(len(train_set), config.batch_size, config.seed, epoch, next_micro)
    while step < total_steps:
        loss_sum, n_tokens, step_tokens = 0.0, 0, 0
        optimizer.zero_grad(set_to_none=True)
        micro = []
        for _ in range(config.grad_accum):
            try:
                i, indices = next(batches)
            except StopIteration:
                epoch, next_micro = epoch + 1, 0
                batches = micro_batches(len(train_set), config.batch_size, config.seed, epoch, 0)
                i, indices = next(batches)
            next_micro = i + 1
            micro.append(to_device(collate([train_set[j] for j in indices], pad_id, is_seq2seq), device))
        # the loss is averaged over the completion tokens of the whole step
        n_tokens = sum(target_count(b["labels"], is_seq2seq) for b in micro)
        for b in micro:
            loss, _ = completion_loss(model, b, is_seq2seq)
            (loss / max(n_tokens, 1)).backward()
            loss_sum += loss.item()
            step_tokens += int(b["attention_mask"].sum()) + (int((b["labels"] != -100).sum()) if is_seq2seq else 0)
        penalty = None
        if regularizer is not None:  # once per step: the same as adding it to the step's loss
            penalty = regularizer.penalty(model)
            penalty.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm) if config.max_grad_norm else None
        optimizer.step()
        scheduler.step()
        step += 1
        if next_micro >= micro_per_epoch:  # the epoch ended exactly on this step
            epoch, next_micro = epoch + 1, 0
            batches = micro_batches(len(train_set), config.batch_size, config.seed, epoch, 0)

        seen_tokens += step_tokens
        elapsed = time.perf_counter() - start
        step_loss = loss_sum / max(n_tokens, 1)
        recent = (recent + [step_loss])[-10:]
        if step % config.log_every == 0 or step == total_steps:
            write({
                "step": step, "epoch": round(epoch + next_micro / micro_per_epoch, 4), "loss": step_loss,
                "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "completion_tokens": n_tokens, "tokens": step_tokens, "tokens_per_sec": seen_tokens / elapsed, "elapsed_s": elapsed,
                **({"penalty": penalty.item()} if penalty is not None else {}),
            })
        if config.eval_every and step % config.eval_every == 0 and step != total_steps:
            eval_loss = validation_loss(model, val_set, config.batch_size, pad_id, is_seq2seq, device)
            write({"step": step, "eval_loss": eval_loss})
        if config.save_every and step % config.save_every == 0 and step != total_steps:
            save(step)
        bar.update(1, loss=f"{step_loss:.4f}", tok_per_s=f"{seen_tokens / elapsed:.0f}")
    bar.close()

    eval_loss = validation_loss(model, val_set, config.batch_size, pad_id, is_seq2seq, device)
    if eval_loss is not None:
        write({"step": step, "eval_loss": eval_loss})
    metrics_file.close()
    if tensorboard is not None:
        tensorboard.close()
    save(step)
    method.save_final(model, tokenizer, work / "final", loaded, config)
    seconds = time.perf_counter() - start
    info.update(status="finished", result={"steps": step, "train_loss": sum(recent) / len(recent) if recent else None,
                                           "eval_loss": eval_loss, "seconds": seconds,
                                           "tokens_per_second": seen_tokens / seconds if seconds else 0.0,
                                           "peak_memory": peak_memory(device)})
    write_json(work / RUN_MARKER, info)
    return TrainResult(work, work / "final", step, info["result"]["train_loss"], eval_loss, seconds,
                       info["result"]["tokens_per_second"], methods.report_dict(report))


def _tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: metrics.jsonl only
        return None
    return SummaryWriter(str(folder / "tensorboard"))
