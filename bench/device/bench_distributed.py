"""Training throughput through torchrun: 1 process, then DDP and FSDP2 on every GPU of the machine.

    python bench/device/bench_distributed.py             # on a CUDA machine: SmolLM2-135M's shape, bf16
    python bench/device/bench_distributed.py --quick     # anywhere: a tiny shape on CPU (gloo), 2 processes, 3 steps

Self-contained: torch, transformers and tokenizers, and peftlab from this checkout's src/ (no download:
a random-init Llama saved to a temporary folder with the test suite's locally trained tokenizer,
``tests/tiny.py``; data: the embedded ``demo:dialogsum``). Each row is one
``torchrun --standalone --nproc_per_node=N -m peftlab train ...`` and reads ``run.json``: tokens/s is
every token the model read, over all processes, per second of training (the first, slower steps
included, so use enough ``--steps``). The global batch grows with the processes (--batch-size per
process), as data parallelism is used; "x 1 proc" is the throughput against the 1-process row of
the same method. With one GPU only the 1-process rows (and FSDP on one process) run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def save_model(folder: Path, quick: bool) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import build_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    shape = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
             if quick else  # SmolLM2-135M's shape (the vocabulary is the local tokenizer's)
             dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **shape)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run(model: Path, out: Path, procs: int, parallel: str | None, method: str, args) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", "-m", "peftlab",
               "train", "--model", str(model), "--data", "demo:dialogsum", "--out", str(out), "--max-steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--device", args.device, "--dtype", args.dtype, "--eval-limit", "2",
               "--method", method, *(["--parallel", parallel] if parallel else [])]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": (done.stdout + done.stderr).strip().splitlines()[-1][:160]}
    result = json.loads((out / "run.json").read_text())["result"]
    return {"tokens_per_second": result["tokens_per_second"], "train_loss": result["train_loss"],
            "peak_memory": result.get("peak_memory")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shape on CPU with gloo, 2 processes, 3 steps")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--methods", default="lora,full")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.quick
    args.device = "cuda" if cuda else "cpu"
    args.dtype = "bfloat16" if cuda else "float32"
    args.steps = args.steps or (3 if args.quick else 30)
    gpus = torch.cuda.device_count() if cuda else 2
    layouts = [(1, None), (1, "fsdp")] + ([(gpus, "ddp"), (gpus, "fsdp")] if gpus > 1 else [])
    print(f"device: {torch.cuda.get_device_name(0) if cuda else 'CPU (gloo)'} x {gpus}; {args.steps} steps, "
          f"batch {args.batch_size} per process, {args.dtype}")
    with tempfile.TemporaryDirectory() as tmp:
        model = save_model(Path(tmp) / "model", args.quick)
        print("| method | processes | parallel | tokens/s | x 1 proc | train loss | peak memory |")
        print("|---|---|---|---|---|---|---|")
        for method in args.methods.split(","):
            base = None
            for procs, parallel in layouts:
                r = run(model, Path(tmp) / f"{method}-{procs}-{parallel}", procs, parallel, method, args)
                if "error" in r:
                    print(f"| {method} | {procs} | {parallel or '-'} | failed: {r['error']} | | | |")
                    continue
                base = base or r["tokens_per_second"]
                memory = r["peak_memory"]
                print(f"| {method} | {procs} | {parallel or '-'} | {r['tokens_per_second']:.0f} | "
                      f"{r['tokens_per_second'] / base:.2f} | {r['train_loss']:.4f} | {json.dumps(memory)} |", flush=True)


if __name__ == "__main__":
    main()
