"""The training loop: completion-only loss, overfitting, accumulation, checkpoints, exact resume, weight decay."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from peftlab.config import TrainConfig
from peftlab.data.encode import IGNORE_INDEX, collate, encode_example
from peftlab.errors import UserError
from peftlab.progress import silent
from peftlab.training import loop
from peftlab.training.loop import build_optimizer, lr_lambda, micro_batches, prepare_model, train
from peftlab.training.loss import completion_loss, target_count
from helpers import losses, write_dialogues


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_completion_loss_equals_hf_loss(kind, tiny_llama_dir, tiny_t5_dir):
    folder = {"llama": tiny_llama_dir, "t5": tiny_t5_dir}[kind]
    tok = AutoTokenizer.from_pretrained(folder)
    auto = AutoModelForSeq2SeqLM if kind == "t5" else AutoModelForCausalLM
    model = auto.from_pretrained(folder)
    seq2seq = kind == "t5"
    examples = [encode_example(tok, p, c, is_seq2seq=seq2seq, chat=False, max_length=64, max_target_length=16)
                for p, c in [("Summarize: a long dialogue here.", "A summary."), ("Hi", "Hello there, friend.")]]
    batch = collate(examples, tok.pad_token_id, seq2seq)
    if not seq2seq:  # the prompt is masked, the completion is not
        assert batch["labels"][0, 0] == IGNORE_INDEX and (batch["labels"][0] != IGNORE_INDEX).any()
    total, count = completion_loss(model, batch, seq2seq)
    reference = model(**batch).loss  # HF's mean over non-ignored (shifted) labels
    assert count == target_count(batch["labels"], seq2seq)
    assert torch.allclose(total / count, reference, atol=1e-5)


def test_schedule_warmup_then_cosine_to_zero():
    f = lr_lambda("cosine", warmup=2, total=10)
    assert [round(f(s), 4) for s in (0, 1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0) and f(10) == pytest.approx(0.0, abs=1e-9)
    assert lr_lambda("linear", 0, 4)(2) == pytest.approx(0.5)


def test_data_order_is_seeded_and_covers_the_epoch():
    first = [i for _, b in micro_batches(10, 3, seed=1, epoch=0, start=0) for i in b]
    assert sorted(first) == list(range(10))
    assert first == [i for _, b in micro_batches(10, 3, seed=1, epoch=0, start=0) for i in b]
    assert first != [i for _, b in micro_batches(10, 3, seed=1, epoch=1, start=0) for i in b]
    assert [b for _, b in micro_batches(10, 3, 1, 0, start=2)] == [first[6:9], first[9:]]


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_overfit_30_steps_halves_the_loss(kind, tiny_llama_dir, tiny_t5_dir, tmp_path):
    folder = {"llama": tiny_llama_dir, "t5": tiny_t5_dir}[kind]
    data = write_dialogues(tmp_path / "d.jsonl")
    result = train(TrainConfig(model=str(folder), data=str(data), out=str(tmp_path / "run"), max_steps=30,
                               batch_size=8, lr=3e-3, warmup_ratio=0.1, device="cpu"))
    trace = losses(result.run_dir)
    assert len(trace) == 30 and all(math.isfinite(x) for x in trace)
    assert sum(trace[-3:]) / 3 < 0.5 * trace[0], trace
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["status"] == "finished" and info["parameters"]["trainable"] == info["parameters"]["total"]
    assert (result.final_dir / "config.json").is_file() and (result.final_dir / "tokenizer.json").is_file()


def test_gradient_accumulation_matches_one_big_batch(tiny_llama_dir, tmp_path):
    data = write_dialogues(tmp_path / "d.jsonl", n=40)
    common = dict(model=str(tiny_llama_dir), data=str(data), max_steps=2, lr=1e-3, device="cpu", max_grad_norm=None, eval_limit=1)
    big = train(TrainConfig(out=str(tmp_path / "big"), batch_size=8, grad_accum=1, **common))
    small = train(TrainConfig(out=str(tmp_path / "small"), batch_size=4, grad_accum=2, **common))
    assert losses(big.run_dir) == pytest.approx(losses(small.run_dir), rel=1e-5)
    a = load_file(big.final_dir / "model.safetensors")
    b = load_file(small.final_dir / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


class _Interrupt:
    """A progress factory that raises KeyboardInterrupt once training reaches ``at`` steps."""

    def __init__(self, at):
        self.at = at

    def __call__(self, description, total, unit="it"):
        at, done = self.at, [0]

        class Bar:
            def update(self, n=1, **stats):
                done[0] += n
                if description == "training" and done[0] >= at:
                    raise KeyboardInterrupt

            def close(self):
                pass

        return Bar()


def test_resume_continues_bit_identically(tiny_llama_dir, tmp_path):
    data = write_dialogues(tmp_path / "d.jsonl", n=40)
    common = dict(model=str(tiny_llama_dir), data=str(data), max_steps=8, batch_size=6, lr=1e-3,
                  save_every=3, device="cpu", seed=7)
    straight = train(TrainConfig(out=str(tmp_path / "a"), **common))
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(out=str(tmp_path / "b"), **common), progress=_Interrupt(at=5))
    assert (tmp_path / "b" / "checkpoints" / "step-000003").is_dir() and not (tmp_path / "b" / "final").exists()
    resumed = train(TrainConfig(out=str(tmp_path / "b"), resume=True, **common))
    a = load_file(straight.final_dir / "model.safetensors")
    b = load_file(resumed.final_dir / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # metrics.jsonl was cut back to the checkpoint's step 3: every step logged once, with the same loss
    assert losses(straight.run_dir) == losses(resumed.run_dir)


def test_resume_with_other_weight_decay_groups_is_a_user_error(tiny_llama_dir, tmp_path):
    data = write_dialogues(tmp_path / "d.jsonl", n=20)
    common = dict(model=str(tiny_llama_dir), data=str(data), out=str(tmp_path / "r"), max_steps=3, batch_size=4,
                  save_every=1, device="cpu")
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**common), progress=_Interrupt(at=2))
    with pytest.raises(UserError, match="--weight-decay"):  # norms now in a group of their own
        train(TrainConfig(resume=True, weight_decay=0.1, **common))


def test_checkpoint_holds_weights_optimizer_and_position(tiny_llama_dir, tmp_path):
    data = write_dialogues(tmp_path / "d.jsonl", n=20)
    result = train(TrainConfig(model=str(tiny_llama_dir), data=str(data), out=str(tmp_path / "r"), max_steps=4,
                               batch_size=4, save_every=2, device="cpu"))
    step2 = result.run_dir / "checkpoints" / "step-000002"
    state = json.loads((step2 / "state.json").read_text())
    assert state["step"] == 2 and state["epoch"] == 0 and state["next_micro"] == 2
    assert {"weights.safetensors", "optimizer.pt", "rng.pt", "state.json"} <= {p.name for p in step2.iterdir()}


@pytest.mark.parametrize("method, vectors", [("full", "norm.weight"), ("dora", "lora_magnitude_vector"),
                                             ("ia3", "ia3_l"), ("prompt", None)])
def test_weight_decay_shrinks_matrices_only(method, vectors, tiny_llama_dir):
    # with zero gradients AdamW's step is the decay alone: p <- p * (1 - lr * wd) for decayed tensors
    config = TrainConfig(model=str(tiny_llama_dir), data="unused.jsonl", out="unused", method=method, lr=0.1,
                         weight_decay=0.5, warmup_ratio=0.0, num_virtual_tokens=4, device="cpu")
    model = prepare_model(config, silent, lambda _: None).model
    optim = build_optimizer(config, model, steps=10)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    for p in trainable.values():
        p.grad = torch.zeros_like(p)
        p.data += 1.0  # away from 0 (LoRA's B starts there), so that decay shows
    before = {name: p.detach().clone() for name, p in trainable.items()}
    optim.optimizer.step()
    kept = {name for name, p in trainable.items() if torch.equal(p, before[name])}
    assert kept == {name for name in trainable if vectors and vectors in name}  # ia3_l is (out, 1) or (1, in): a vector
    for name in trainable.keys() - kept:
        assert torch.allclose(trainable[name], before[name] * (1 - 0.1 * 0.5), rtol=1e-6, atol=0), name


def test_metrics_file_is_closed_when_a_step_raises(tiny_llama_dir, tmp_path, monkeypatch):
    logs, calls, step = [], [0], loop.train_step

    class Spy(loop.MetricsLog):
        def __enter__(self):
            logs.append(super().__enter__())
            return logs[-1]

    def failing_step(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("boom")
        return step(*args, **kwargs)

    monkeypatch.setattr(loop, "MetricsLog", Spy)
    monkeypatch.setattr(loop, "train_step", failing_step)
    data = write_dialogues(tmp_path / "d.jsonl", n=20)
    with pytest.raises(RuntimeError, match="boom"):
        train(TrainConfig(model=str(tiny_llama_dir), data=str(data), out=str(tmp_path / "r"), max_steps=4,
                          batch_size=4, save_every=1, device="cpu"))
    assert len(logs) == 1 and logs[0]._file.closed
    assert [r["step"] for r in map(json.loads, (tmp_path / "r" / "metrics.jsonl").read_text().splitlines())] == [1, 2]


@pytest.mark.slow
def test_a_training_step_on_the_embedded_model(embedded_model_dir, tmp_path):
    result = train(TrainConfig(model=str(embedded_model_dir), data="demo:dialogsum", out=str(tmp_path / "r"),
                               max_steps=1, batch_size=2, limit=2, eval_limit=2, device="cpu"))
    trace = losses(result.run_dir)
    assert len(trace) == 1 and 0 < trace[0] < 10
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["data"]["chat_template"] is True and info["parameters"]["total"] > 100_000_000
