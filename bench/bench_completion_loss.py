"""Training step: peftlab's completion-only loss vs transformers' full-logits loss.

    .venv/bin/python bench/bench_completion_loss.py [--model smollm2-135m-instruct] [--steps 4]

transformers computes logits for every position, (B, T, vocab), then the loss; peftlab applies
the output head only at completion positions (labels != -100). Same model, same batch of
DialogSum-shaped demo examples (prompt masked), same optimizer: we time forward + backward +
AdamW step and measure the peak RSS growth of each, and check the two losses agree.
"""

from __future__ import annotations

import argparse
import time

import torch

from peftlab.data.demo import dialogsum_demo
from peftlab.data.encode import collate, encode_example
from peftlab.models import load_model
from peftlab.training.loss import completion_loss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    torch.manual_seed(0)
    loaded = load_model(args.model)
    model, tok = loaded.model, loaded.tokenizer
    model.train()
    records = dialogsum_demo(args.batch_size)
    batch = collate([encode_example(tok, "Summarize the following conversation.\n\n" + r["dialogue"], r["summary"],
                                    is_seq2seq=False, chat=True, max_length=512, max_target_length=128) for r in records],
                    tok.pad_token_id, False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: both variants see the same weights every step

    def reference_step() -> float:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    def peftlab_step() -> float:
        total, count = completion_loss(model, batch, False)
        (total / count).backward()
        optimizer.step()
        optimizer.zero_grad()
        return (total / count).item()

    results = {}
    for name, step in (("transformers", reference_step), ("peftlab", peftlab_step)):
        step()  # warm-up
        start = time.perf_counter()
        losses = [step() for _ in range(args.steps)]
        results[name] = ((time.perf_counter() - start) / args.steps, losses[-1])
    (t_ref, l_ref), (t_ours, l_ours) = results["transformers"], results["peftlab"]
    tokens = int(batch["attention_mask"].sum())
    print(f"model {args.model}, batch {tuple(batch['input_ids'].shape)}, {tokens} tokens, "
          f"{int((batch['labels'] != -100).sum())} completion tokens, {torch.get_num_threads()} threads")
    print("| variant | s/step | tokens/s | loss |\n|---|---|---|---|")
    print(f"| transformers (full logits) | {t_ref:.3f} | {tokens / t_ref:.0f} | {l_ref:.6f} |")
    print(f"| peftlab (completion logits) | {t_ours:.3f} | {tokens / t_ours:.0f} | {l_ours:.6f} |")
    print(f"speed-up: {t_ref / t_ours:.2f}x; loss difference {abs(l_ref - l_ours):.2e}")


if __name__ == "__main__":
    main()
