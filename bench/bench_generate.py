"""Greedy generation: peftlab with LoRA merged, peftlab with LoRA unmerged, transformers + peft unmerged.

    .venv/bin/python bench/bench_generate.py [--quick] [--prompts 100] [--rounds 1] [--threads N]

The embedded model (smollm2-135m-instruct) gets LoRA r=16 on q, k, v and o with a random non-zero
B (so the adapter changes the outputs). The same adapter file is loaded three ways:

- peftlab merged:   ``merge_and_unload`` (plain ``nn.Linear`` layers), peftlab's ``generate``;
- peftlab unmerged: ``LoraLinear`` layers, peftlab's ``generate``;
- peft unmerged:    ``peft.PeftModel.from_pretrained``, transformers' ``generate`` (greedy, KV cache), batches
                    in the order given (as a loop over the prompts does);
- peft unmerged, length-sorted: the same with the prompts batched longest first, as peftlab's
                    ``generate`` batches them (so this ratio isolates the decoding loop and the LoRA path).

DialogSum dev prompts (the "Summarize the following conversation." instruction + dialogue) go
through the chat template exactly as peftlab's ``generate`` sends them, batch 8, 64 new tokens at
most. Each side generates all the prompts in one call; the sides take turns (the order rotating
from round to round), in one process. We report generated tokens per second (EOS included,
padding excluded), the ratios, and how many texts agree between the sides (merged and unmerged,
or different batches, may differ in rare cases by float rounding:
W x + s B A x is not bit-equal to (W + s B A) x). Writes ``bench/results/generate.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from peftlab.data.encode import encode_prompts, prompt_ids
from peftlab.eval.generate import completion_tokens, generate, stop_ids
from peftlab.models import load_model
from peftlab.peft import LoraConfig, adapter_parameters, apply_lora, merge_and_unload
from peftlab.peft.formats import load_adapter, save_adapter

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dialogsum" / "dev.jsonl"
RESULTS = Path(__file__).parent / "results" / "generate.json"
INSTRUCTION = "Summarize the following conversation.\n\n"
SIDES = ("peftlab merged", "peftlab unmerged", "peft unmerged", "peft unmerged sorted")


def read_prompts(count: int) -> list[str]:
    with DATA.open() as f:
        records = [json.loads(line) for line, _ in zip(f, range(count))]
    return [INSTRUCTION + r["dialogue"] for r in records]


def build_models(model_name: str, rank: int, folder: Path) -> tuple[dict, object]:
    """The three sides' models from one adapter file (seeded random A and B)."""
    import peft

    torch.manual_seed(0)
    loaded = load_model(model_name)
    config = LoraConfig(rank=rank, alpha=2 * rank, targets="q_proj,k_proj,v_proj,o_proj")
    unmerged = apply_lora(loaded.model, config).eval()
    with torch.no_grad():
        for name, p in adapter_parameters(unmerged).items():
            if "lora_B" in name:
                p.normal_(0, 0.02)  # non-zero B: the adapter changes the outputs
    save_adapter(unmerged, folder, config)
    merged = merge_and_unload(load_adapter(load_model(model_name).model, folder)).eval()
    reference = peft.PeftModel.from_pretrained(load_model(model_name).model, str(folder)).eval()
    models = {"peftlab merged": merged, "peftlab unmerged": unmerged, "peft unmerged": reference,
              "peft unmerged sorted": reference}
    return models, loaded.tokenizer


@torch.inference_mode()
def reference_generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
                       sort: bool) -> tuple[list[str], int]:
    """transformers' ``generate`` on the peft model, encoded and cut at EOS as peftlab does."""
    stop = stop_ids(model, tokenizer)
    order = list(range(len(prompts)))
    if sort:
        lengths = [len(prompt_ids(tokenizer, p, is_seq2seq=False, chat=True, max_length=512)) for p in prompts]
        order.sort(key=lambda i: -lengths[i])
    texts, count = [""] * len(prompts), 0
    for i in range(0, len(order), batch_size):
        members = order[i : i + batch_size]
        batch = encode_prompts(tokenizer, [prompts[j] for j in members], is_seq2seq=False, chat=True, max_length=512)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                             eos_token_id=stop, pad_token_id=tokenizer.pad_token_id)
        for j, row in zip(members, out[:, batch["input_ids"].shape[1]:].tolist()):  # (B, T_new)
            row = completion_tokens(row, stop)
            count += len(row)
            texts[j] = tokenizer.decode(row, skip_special_tokens=True).strip()
    return texts, count


def run_side(side: str, model, tokenizer, prompts: list[str], max_new_tokens: int,
             batch_size: int) -> tuple[list[str], int, float]:
    start = time.perf_counter()
    if side.startswith("peft unmerged"):
        texts, count = reference_generate(model, tokenizer, prompts, max_new_tokens, batch_size, side.endswith("sorted"))
    else:
        result = generate(model, tokenizer, prompts, is_seq2seq=False, chat=True, max_new_tokens=max_new_tokens,
                          batch_size=batch_size)
        texts, count = result.texts, result.new_tokens
    return texts, count, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 prompts: a smoke run")
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1, help="times each side generates all the prompts")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = read_prompts(16 if args.quick else args.prompts)

    with tempfile.TemporaryDirectory() as folder:
        models, tokenizer = build_models(args.model, args.rank, Path(folder))
    for side in SIDES:  # warm-up, not timed
        run_side(side, models[side], tokenizer, prompts[:2], 4, args.batch_size)

    texts = {s: [] for s in SIDES}
    tokens = dict.fromkeys(SIDES, 0)
    seconds = dict.fromkeys(SIDES, 0.0)
    for r in range(args.rounds):
        k = r % len(SIDES)
        for side in SIDES[k:] + SIDES[:k]:  # rotate who goes first
            got, count, took = run_side(side, models[side], tokenizer, prompts, args.max_new_tokens, args.batch_size)
            texts[side] = got
            tokens[side] += count
            seconds[side] += took

    speed = {s: tokens[s] / seconds[s] for s in SIDES}
    n = len(prompts)
    same = {
        "merged = unmerged": sum(a == b for a, b in zip(texts["peftlab merged"], texts["peftlab unmerged"])),
        "unmerged = peft": sum(a == b for a, b in zip(texts["peftlab unmerged"], texts["peft unmerged"])),
        "merged = peft": sum(a == b for a, b in zip(texts["peftlab merged"], texts["peft unmerged"])),
        "unmerged = peft length-sorted": sum(a == b for a, b in zip(texts["peftlab unmerged"], texts["peft unmerged sorted"])),
    }
    ratios = {
        "unmerged / merged": speed["peftlab unmerged"] / speed["peftlab merged"],
        "unmerged / peft": speed["peftlab unmerged"] / speed["peft unmerged"],
        "merged / peft": speed["peftlab merged"] / speed["peft unmerged"],
        "unmerged / peft length-sorted": speed["peftlab unmerged"] / speed["peft unmerged sorted"],
    }
    print(f"model {args.model}, LoRA r={args.rank} on q,k,v,o, {n} DialogSum prompts, batch {args.batch_size}, "
          f"max {args.max_new_tokens} new tokens, {torch.get_num_threads()} threads")
    print("| side | generated tokens | seconds | tokens/s |\n|---|---|---|---|")
    for s in SIDES:
        print(f"| {s} | {tokens[s]} | {seconds[s]:.2f} | {speed[s]:.1f} |")
    print("\n| ratio | value |\n|---|---|")
    for name, value in ratios.items():
        print(f"| {name} | {value:.2f}x |")
    print("\n| identical texts | count |\n|---|---|")
    for name, value in same.items():
        print(f"| {name} | {value} / {n} |")

    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({
        "model": args.model, "rank": args.rank, "prompts": n, "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens, "rounds": args.rounds, "threads": torch.get_num_threads(),
        "tokens": tokens, "seconds": seconds, "tokens_per_second": speed, "ratios": ratios, "identical_texts": same,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
