"""Training steps: peftlab's against peft + transformers as their docs show, LoRA and full fine-tuning.

    .venv/bin/python bench/bench_train.py [--quick] [--steps 4] [--threads N]

Data: DialogSum dev (the "Summarize the following conversation." instruction + dialogue as the
user turn of the chat template, the summary as the completion), at most 768 tokens, batches of 8
drawn in one seeded random order; model: the embedded smollm2-135m-instruct in float32.

Sides, each with its own copy of the model, the same batches and AdamW (lr 0, so every side keeps
the starting weights and their losses must agree), gradient norm clipped at 1:

- peftlab LoRA / full: ``peftlab.training.loop.train_step`` on packed rows (``--batching packed``, the
  default), completion-only chunked cross-entropy, the lean SwiGLU product (``training.lean_mlp``);
  LoRA r=16, alpha 32, no dropout on q, k, v, o.
- peft LoRA: ``get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=[q, k, v, o]))``;
  transformers full: the bare model. Both get ``DataCollatorForSeq2Seq`` batches (dynamic padding,
  labels -100 on the prompt) and ``model(**batch).loss``.
- peftlab QLoRA (peak memory only, also with gradient checkpointing): the base loaded into NF4 layer by
  layer, float32 compute, the same LoRA.
- peft LoRA grouped: the same with transformers' ``LengthGroupedSampler`` order (its own batches,
  so only its tokens/s compares).

Steps alternate between the sides (A B A B ...) after one warm-up step each. Reported: real
(non-padding) tokens per second, mean loss, ratios. Peak memory: each side runs ``--steps`` steps
alone in a fresh subprocess, which reports ``ru_maxrss`` (started before this process loads anything).
``--quick`` (2 steps, examples cut to 256 tokens: nearly all the same length) is a smoke run only.
Writes ``bench/results/train.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from peftlab.data.encode import collate, encode_example, pack, real_tokens
from peftlab.models import load_model
from peftlab.training.lean_mlp import lean_gated_mlps
from peftlab.training.loop import Optimization, micro_batches, train_step
from peftlab.training.loss import CompletionLoss
from peftlab.training.packing import packed_attention

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dialogsum" / "dev.jsonl"
RESULTS = Path(__file__).parent / "results" / "train.json"
INSTRUCTION = "Summarize the following conversation.\n\n"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
SIDES = ("peftlab lora", "peft lora", "peft lora grouped", "peftlab full", "transformers full")
MEMORY_SIDES = ("peftlab lora", "peftlab lora checkpointed", "peftlab qlora", "peftlab qlora checkpointed", "peft lora", "peftlab full", "transformers full")


def encoded_examples(tokenizer, count: int, max_length: int) -> list:
    with DATA.open() as f:
        records = [json.loads(line) for line, _ in zip(f, range(count))]
    return [encode_example(tokenizer, INSTRUCTION + r["dialogue"], r["summary"], is_seq2seq=False, chat=True,
                           max_length=max_length, max_target_length=128) for r in records]


def batch_order(examples: list, batch_size: int, steps: int, grouped: bool) -> list[list[int]]:
    """Example indices per step: a seeded random order, or transformers' length-grouped one."""
    if not grouped:
        return [b for _, b in micro_batches(len(examples), batch_size, seed=0, epoch=0, start=0)][:steps]
    from transformers.trainer_pt_utils import LengthGroupedSampler

    order = list(LengthGroupedSampler(batch_size, lengths=[len(e.input_ids) for e in examples],
                                      generator=torch.Generator().manual_seed(0)))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)][:steps]


class Side:
    """One side's model, optimizer and step function."""

    def __init__(self, name: str, encode, schedule) -> None:
        self.name = name
        torch.manual_seed(0)
        # QLoRA (memory only): the base loaded layer by layer into NF4, computing in float32 (bfloat16 is
        # emulated, several times slower, on CPUs without AVX512-BF16/AMX)
        quantize = {"quantize": "nf4", "compute_dtype": "float32"} if name.startswith("peftlab qlora") else {}
        loaded = load_model("smollm2-135m-instruct", **quantize)
        self.tokenizer = loaded.tokenizer
        self.examples = encode(self.tokenizer)
        self.order = order = schedule(self.examples)
        model = loaded.model
        if name.startswith(("peftlab lora", "peftlab qlora")):
            from peftlab import peft as ours

            model = ours.apply_lora(model, ours.LoraConfig(rank=16, alpha=32, dropout=0.0, targets=",".join(TARGETS)))
            if name.endswith("checkpointed"):  # --gradient-checkpointing, as the loop sets it
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif name.startswith("peft lora"):
            import peft

            model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
        else:
            model.requires_grad_(True)
        if name.startswith("peftlab"):  # as the loop prepares every model it trains
            lean_gated_mlps(model)
        self.model = model.train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=0.0)
        self.optim = Optimization(self.optimizer, torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: 1.0),
                                  self.params, len(order))
        if not name.startswith("peftlab"):
            from transformers import DataCollatorForSeq2Seq

            self.collator = DataCollatorForSeq2Seq(self.tokenizer, padding=True)
        self.losses, self.tokens, self.seconds = [], 0, 0.0

    def step(self, i: int, timed: bool = True) -> None:
        chosen = [self.examples[j] for j in self.order[i % len(self.order)]]
        start = time.perf_counter()
        if self.name.startswith("peftlab"):
            batch = pack(chosen)
            with packed_attention(self.model):
                stats = train_step(CompletionLoss(self.model, False), [batch], self.optim, None, 1.0, False)
            loss, tokens = stats.loss, stats.tokens
        else:
            batch = self.collator([{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids),
                                    "labels": e.labels} for e in chosen])
            out = self.model(**batch).loss
            out.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            loss, tokens = out.item(), real_tokens(batch)
        if timed:
            self.seconds += time.perf_counter() - start
            self.tokens += tokens
            self.losses.append(loss)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def build(name: str, steps: int, batch_size: int, max_length: int) -> Side:
    """A side whose examples are encoded with its own tokenizer (no second model load to get one: it
    would inflate the side's peak RSS)."""
    return Side(name, lambda tokenizer: encoded_examples(tokenizer, 500, max_length),
                lambda examples: batch_order(examples, batch_size, steps + 1, grouped=name.endswith("grouped")))


def peak_rss(name: str, args) -> float:
    """GB of peak RSS of a fresh process that runs ``--steps`` steps of ``name`` alone."""
    command = [sys.executable, __file__, "--memory-side", name, "--steps", str(args.steps), "--max-length",
               str(args.max_length), "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rss_gb"]


def memory_side(name: str, args) -> None:
    side = build(name, args.steps, args.batch_size, args.max_length)
    for i in range(args.steps):
        side.step(i)
    print(json.dumps({"side": name, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="2 steps of examples cut to 256 tokens")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=768)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--memory-side", choices=MEMORY_SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.max_length = 2, 256
    torch.set_num_threads(args.threads)
    if args.memory_side:
        return memory_side(args.memory_side, args)

    # First, while this process is small: Linux carries ru_maxrss over fork + exec, so a child started by a
    # process holding five models would report that process's peak, not its own.
    memory = {name: peak_rss(name, args) for name in MEMORY_SIDES}
    sides = {name: build(name, args.steps, args.batch_size, args.max_length) for name in SIDES}
    for side in sides.values():
        side.step(args.steps, timed=False)  # warm-up on a batch outside the timed ones
    for i in range(args.steps):
        for side in sides.values():  # A B A B ...
            side.step(i)

    tps = {name: s.tokens_per_second for name, s in sides.items()}
    result = {
        "steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length, "threads": args.threads,
        "sides": {name: {"tokens_per_second": tps[name], "tokens": s.tokens, "seconds": s.seconds,
                         "mean_loss": sum(s.losses) / len(s.losses), "losses": s.losses,
                         "peak_rss_gb": memory.get(name)} for name, s in sides.items()},
        "peak_rss_gb": memory,
        "ratios": {
            "lora tokens/s vs peft": tps["peftlab lora"] / tps["peft lora"],
            "lora tokens/s vs peft grouped": tps["peftlab lora"] / tps["peft lora grouped"],
            "full tokens/s vs transformers": tps["peftlab full"] / tps["transformers full"],
            "lora peak RSS vs peft": memory["peftlab lora"] / memory["peft lora"],
            "full peak RSS vs transformers": memory["peftlab full"] / memory["transformers full"],
            "lora peak RSS vs peftlab full": memory["peftlab lora"] / memory["peftlab full"],
            "lora --gradient-checkpointing peak RSS vs peft": memory["peftlab lora checkpointed"] / memory["peft lora"],
            "lora --gradient-checkpointing peak RSS vs peftlab full":
                memory["peftlab lora checkpointed"] / memory["peftlab full"],
            "qlora peak RSS vs peftlab lora": memory["peftlab qlora"] / memory["peftlab lora"],
            "qlora --gradient-checkpointing peak RSS vs lora --gradient-checkpointing":
                memory["peftlab qlora checkpointed"] / memory["peftlab lora checkpointed"],
        },
        "max loss difference (same batches, lr 0)": max(
            abs(a - b) for x, y in (("peftlab lora", "peft lora"), ("peftlab full", "transformers full"))
            for a, b in zip(sides[x].losses, sides[y].losses)),
    }
    print(f"DialogSum dev, batch {args.batch_size}, <= {args.max_length} tokens, {args.steps} steps, {args.threads} threads")
    print("| side | tokens/s | mean loss | peak RSS (GB) |\n|---|---|---|---|")
    for name, s in result["sides"].items():
        rss = f"{s['peak_rss_gb']:.2f}" if s["peak_rss_gb"] is not None else "-"
        print(f"| {name} | {s['tokens_per_second']:.1f} | {s['mean_loss']:.5f} | {rss} |")
    print(f"| peftlab lora --gradient-checkpointing | - | - | {memory['peftlab lora checkpointed']:.2f} |")
    print(f"| peftlab qlora (NF4 base, float32 compute) | - | - | {memory['peftlab qlora']:.2f} |")
    print(f"| peftlab qlora --gradient-checkpointing | - | - | {memory['peftlab qlora checkpointed']:.2f} |")
    print("\n| ratio | value |\n|---|---|")
    for name, value in result["ratios"].items():
        print(f"| {name} | {value:.2f}x |")
    print(f"\nmax loss difference, same batches: {result['max loss difference (same batches, lr 0)']:.2e}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
