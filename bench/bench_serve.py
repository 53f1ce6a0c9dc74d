"""Serving many LoRA adapters: peftlab's mixed batches against peft's two ways, in tokens per second.

    .venv/bin/python bench/bench_serve.py [--quick] [--adapters 8] [--per-adapter 4] [--threads N]

The embedded model (smollm2-135m-instruct) gets ``--adapters`` LoRA adapters (r=16 on q, k, v, o,
seeded random non-zero B, so each changes the outputs). The same requests, ``--per-adapter`` DialogSum
prompts for each adapter (chat template, greedy, at most ``--max-new-tokens`` new tokens), are served
four ways in one process:

- peftlab mixed:        the serving engine, every request submitted at once: one batch holds all adapters;
- peftlab one adapter:  the same engine and batch size, every request on the first adapter (what the
                        mixed batch should keep: the target is >= 80% of its speed);
- peft by adapter:      ``PeftModel`` with every adapter loaded, ``set_adapter`` then transformers'
                        ``generate`` on each adapter's sub-batch (peft's usual way);
- peft mixed batch:     the same ``PeftModel``, one ``generate(..., adapter_names=[...])`` over the whole batch
                        (the target: peftlab mixed >= 2x).

The sides run interleaved, round by round (the order rotating), after a warm-up. We report generated
tokens per second (EOS included, padding excluded), the ratios, and how many texts agree between peftlab
mixed and peft by adapter (float rounding may flip a rare near-tie). Writes ``bench/results/serve.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import torch

from peftlab.data.encode import encode_prompts
from peftlab.eval.generate import completion_tokens, stop_ids
from peftlab.models import load_model
from peftlab.peft import LoraConfig, adapter_parameters, apply_lora, save_adapter
from peftlab.serve.engine import Engine, Request, Sampling

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dialogsum" / "dev.jsonl"
RESULTS = Path(__file__).parent / "results" / "serve.json"
INSTRUCTION = "Summarize the following conversation.\n\n"
FALLBACK = ["#Person1#: Hi Tom, are we still on for lunch tomorrow at noon?\n#Person2#: Sorry, I have to move it "
            "to Friday. Is that fine with you?\n#Person1#: Friday works. The cafe near the station?"]
SIDES = ("peftlab mixed", "peftlab one adapter", "peft by adapter", "peft mixed batch")


def read_prompts(count: int) -> list[str]:
    if not DATA.is_file():
        return [INSTRUCTION + FALLBACK[0]] * count
    with DATA.open() as f:
        records = [json.loads(line) for line, _ in zip(f, range(count))]
    return [INSTRUCTION + r["dialogue"] for r in records]


def save_adapters(model_name: str, count: int, rank: int, folder: Path) -> dict[str, Path]:
    config = LoraConfig(rank=rank, alpha=2 * rank, targets="q_proj,k_proj,v_proj,o_proj")
    folders = {}
    for i in range(count):
        torch.manual_seed(i)
        model = apply_lora(load_model(model_name).model, config)
        with torch.no_grad():
            for name, p in adapter_parameters(model).items():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        folders[f"task{i}"] = save_adapter(model, folder / f"task{i}", config)
    return folders


def run_engine(engine: Engine, ids: list[list[int]], names: list[str], max_new_tokens: int) -> tuple[list[str], int, float]:
    """Submit every request at once; wait for all of them."""
    left = threading.Semaphore(0)
    requests = [Request(name, row, Sampling(max_tokens=max_new_tokens, temperature=0.0),
                        on_event=lambda _, finish: finish is not None and left.release()) for name, row in zip(names, ids)]
    start = time.perf_counter()
    for request in requests:
        engine.submit(request)
    for _ in requests:
        left.acquire()
    took = time.perf_counter() - start
    return [r.text for r in requests], sum(len(r.tokens) for r in requests), took


@torch.inference_mode()
def run_peft(model, tokenizer, prompts: list[str], names: list[str], max_new_tokens: int, mixed: bool) -> tuple[list[str], int, float]:
    """transformers' greedy ``generate`` on the peft model: one mixed call, or one call per adapter after ``set_adapter``."""
    stop = stop_ids(model, tokenizer)
    groups = [list(range(len(prompts)))] if mixed else [[i for i, n in enumerate(names) if n == name] for name in dict.fromkeys(names)]
    texts, count = [""] * len(prompts), 0
    start = time.perf_counter()
    for rows in groups:
        batch = encode_prompts(tokenizer, [prompts[i] for i in rows], is_seq2seq=False, chat=True, max_length=512)
        extra = {"adapter_names": [names[i] for i in rows]} if mixed else {}
        if not mixed:
            model.set_adapter(names[rows[0]])
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                             eos_token_id=stop, pad_token_id=tokenizer.pad_token_id, **extra)
        for i, row in zip(rows, out[:, batch["input_ids"].shape[1]:].tolist()):  # (B, T_new)
            row = completion_tokens(row, stop)
            count += len(row)
            texts[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    return texts, count, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 requests per adapter, 24 new tokens, 1 round: a smoke run")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--per-adapter", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.quick:
        args.per_adapter, args.max_new_tokens, args.rounds = 2, 24, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    import peft

    n = args.adapters * args.per_adapter
    prompts = read_prompts(n)
    with tempfile.TemporaryDirectory() as folder:
        folders = save_adapters(args.model, args.adapters, args.rank, Path(folder))
        loaded = load_model(args.model)
        engine = Engine(loaded, folders, max_adapters=args.adapters, max_batch=n, max_queue=n)
        reference = peft.PeftModel.from_pretrained(load_model(args.model).model, str(folders["task0"]), adapter_name="task0")
        for name, path in list(folders.items())[1:]:
            reference.load_adapter(str(path), adapter_name=name)
        reference.eval()
    tokenizer = loaded.tokenizer
    engine.start()
    names = [f"task{i % args.adapters}" for i in range(n)]  # every adapter in the batch, interleaved
    ids = [encode_prompts(tokenizer, [p], is_seq2seq=False, chat=True, max_length=512)["input_ids"][0].tolist() for p in prompts]

    def run(side: str, count: int, max_new_tokens: int) -> tuple[list[str], int, float]:
        if side == "peftlab mixed":
            return run_engine(engine, ids[:count], names[:count], max_new_tokens)
        if side == "peftlab one adapter":
            return run_engine(engine, ids[:count], ["task0"] * count, max_new_tokens)
        return run_peft(reference, tokenizer, prompts[:count], names[:count], max_new_tokens, mixed=side == "peft mixed batch")

    for side in SIDES:  # warm-up, not timed
        run(side, min(n, 2 * args.adapters), 2)
    texts = {}
    tokens = dict.fromkeys(SIDES, 0)
    seconds = dict.fromkeys(SIDES, 0.0)
    for r in range(args.rounds):
        for side in SIDES[r % 4 :] + SIDES[: r % 4]:  # rotate who goes first
            got, count, took = run(side, n, args.max_new_tokens)
            texts[side] = got
            tokens[side] += count
            seconds[side] += took
    engine.stop()

    speed = {s: tokens[s] / seconds[s] for s in SIDES}
    ratios = {
        "mixed / one adapter": speed["peftlab mixed"] / speed["peftlab one adapter"],
        "mixed / peft mixed batch": speed["peftlab mixed"] / speed["peft mixed batch"],
        "mixed / peft by adapter": speed["peftlab mixed"] / speed["peft by adapter"],
    }
    targets = {"mixed / one adapter": 0.8, "mixed / peft mixed batch": 2.0}
    same = sum(a == b for a, b in zip(texts["peftlab mixed"], texts["peft by adapter"]))
    print(f"model {args.model}, {args.adapters} LoRA adapters (r={args.rank} on q,k,v,o), {n} requests in one batch "
          f"({args.per_adapter} per adapter), max {args.max_new_tokens} new tokens, {args.rounds} round(s), "
          f"{torch.get_num_threads()} threads")
    print("| side | generated tokens | seconds | tokens/s |\n|---|---|---|---|")
    for s in SIDES:
        print(f"| {s} | {tokens[s]} | {seconds[s]:.2f} | {speed[s]:.1f} |")
    print("\n| ratio | value | target |\n|---|---|---|")
    for name, value in ratios.items():
        target = f">= {targets[name]:g}x" if name in targets else "-"
        print(f"| {name} | {value:.2f}x | {target} |")
    print(f"\nidentical texts, peftlab mixed = peft by adapter: {same} / {n}")

    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({
        "model": args.model, "adapters": args.adapters, "rank": args.rank, "requests": n,
        "max_new_tokens": args.max_new_tokens, "rounds": args.rounds, "threads": torch.get_num_threads(),
        "tokens": tokens, "seconds": seconds, "tokens_per_second": speed, "ratios": ratios, "targets": targets,
        "identical_texts": same,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
