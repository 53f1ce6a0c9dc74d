"""GPU training throughput and memory: peftlab against peft + transformers, bf16, Llama-1B shape.

    python bench/device/bench_train_gpu.py                 # on a CUDA GPU: the issue's anchor setting
    python bench/device/bench_train_gpu.py --quick         # anywhere (CPU too): a tiny shape, 2 steps

Self-contained: torch, transformers and peft, and peftlab from this checkout's src/ (no data, no
download: a random-init Llama with Llama-3.2-1B's shape). Every side runs in its own subprocess, so
peak memory is that side's alone (``torch.cuda.max_memory_allocated``, or peak RSS on CPU):

- ``peft default``: ``get_peft_model`` with LoRA r=16 on all linear layers (peft keeps the adapters in
  float32 on a bf16 base: ``autocast_adapter_dtype=True``), loss ``model(**batch).loss``;
- ``peft bf16 adapters``: the same with ``autocast_adapter_dtype=False``;
- ``transformers full``: full fine-tuning, ``model(**batch).loss``;
- ``peftlab lora``: peftlab's LoRA (bf16 adapters) with the completion-only loss (the head runs only
  where labels are set), ``torch.compile`` on CUDA;
- ``peftlab full``: full fine-tuning with the completion-only loss.

Each row: batch 8 x 1024 tokens, the last 256 of each row are the completion (labels), AdamW
lr 1e-4 (adapters) / 1e-5 (full); 3 warm-up steps, then ``--steps`` timed steps. tokens/s counts
every real token of the batch (no padding here). Ratios are against ``peft default``.
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

SRC = Path(__file__).resolve().parents[2] / "src"
SIDES = ["peft default", "peft bf16 adapters", "transformers full", "peftlab lora", "peftlab full"]


def llama_config(quick: bool):
    from transformers import LlamaConfig

    if quick:
        return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaConfig(  # Llama-3.2-1B's shape
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=True,
    )


def batch(config, size: int, tokens: int, completion: int, device) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, config.vocab_size, (size, tokens), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, : tokens - completion] = -100  # the prompt: no loss
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device)}


def run_side(side: str, args) -> dict:
    """One side's training steps; returns tokens/s, peak memory and the last loss."""
    sys.path.insert(0, str(SRC))
    from transformers import LlamaForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = llama_config(args.quick)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype).to(device)
    data = batch(config, args.batch_size, args.tokens, args.completion, device)
    lr = 1e-5 if "full" in side else 1e-4

    if side.startswith("peft "):
        import peft

        lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
        model = peft.get_peft_model(model, lora, autocast_adapter_dtype=(side == "peft default"))
    elif side == "peftlab lora":
        from peftlab.peft import LoraConfig, apply_lora

        model = apply_lora(model, LoraConfig(rank=16, alpha=32, targets="all-linear",
                                             adapter_dtype="bfloat16" if dtype == torch.bfloat16 else "float32"))
    model.train()

    if side.startswith("peftlab"):
        from peftlab.training.loss import completion_loss

        def loss_of(b):
            total, count = completion_loss(model, b, False)
            return total / count
        if device.type == "cuda" and not args.no_compile:
            loss_of = torch.compile(loss_of)
    else:
        def loss_of(b):
            return model(**b).loss

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)

    def step() -> float:
        loss = loss_of(data)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"side": side, "tokens_per_s": args.steps * args.batch_size * args.tokens / seconds,
            "peak_gib": peak / 2**30, "loss": float(loss), "device": str(device),
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "trainable": sum(p.numel() for p in params)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shape, 2 steps: a smoke test anywhere")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--completion", type=int, default=None)
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--side", help=argparse.SUPPRESS)  # internal: run one side and print its JSON
    parser.add_argument("--json", default="bench/results/train_gpu.json")
    args = parser.parse_args()
    args.steps = args.steps or (2 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.tokens = args.tokens or (64 if args.quick else 1024)
    args.completion = args.completion or args.tokens // 4

    if args.side:
        print(json.dumps(run_side(args.side, args)))
        return

    rows = []
    forwarded = [f"--steps={args.steps}", f"--warmup={args.warmup}", f"--batch-size={args.batch_size}",
                 f"--tokens={args.tokens}", f"--completion={args.completion}",
                 *(["--quick"] if args.quick else []), *(["--no-compile"] if args.no_compile else [])]
    for side in args.sides.split(","):
        out = subprocess.run([sys.executable, __file__, *forwarded, "--side", side], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{side}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    ref = next((r for r in rows if r["side"] == "peft default"), None)
    print(f"device: {rows[0]['gpu'] if rows else '?'}, batch {args.batch_size} x {args.tokens} "
          f"(completion {args.completion}), {args.steps} timed steps")
    print("| side | trainable | tokens/s | peak GiB | loss | tokens/s vs peft default | memory vs peft default |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        speed = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
        memory = f"{r['peak_gib'] / ref['peak_gib']:.2f}x" if ref else "-"
        print(f"| {r['side']} | {r['trainable']:,} | {r['tokens_per_s']:,.0f} | {r['peak_gib']:.2f} | {r['loss']:.4f} "
              f"| {speed} | {memory} |")
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
