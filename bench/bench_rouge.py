"""ROUGE-1/2/L/Lsum on long multi-line pairs: peftlab's scorer against Google's rouge-score.

    .venv/bin/python bench/bench_rouge.py [--quick] [--pairs 2000] [--chunk 50]

Pairs are built from DialogSum dev (read by path from ../shared/data): a reference is two
dialogues and a summary (one turn per line, about 300 tokens, ~25 lines); its prediction keeps
about two thirds of those lines, shuffled within a window, with a third of the lines taken from
other dialogues, so every ROUGE type lands strictly between 0 and 1 and ROUGE-Lsum's union of
LCSs differs from ROUGE-L. Both sides score the same pairs with and without the Porter stemmer,
in chunks, alternating which side goes first, in one process; peftlab's stem cache starts
empty. Every score must be equal (to 1e-12) or the bench fails. Writes ``bench/results/rouge.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from rouge_score import rouge_scorer

from peftlab.eval import rouge as peftlab_rouge
from peftlab.eval.rouge import ROUGE_TYPES

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dialogsum" / "dev.jsonl"
RESULTS = Path(__file__).parent / "results" / "rouge.json"
MEASURES = ("precision", "recall", "fmeasure")


def build_pairs(count: int, seed: int = 0) -> list[tuple[str, str]]:
    """(prediction, reference) pairs of long multi-line texts built from DialogSum dev."""
    rows = [json.loads(line) for line in DATA.open(encoding="utf-8")]
    rng = random.Random(seed)
    pairs = []
    for k in range(count):
        first, second = rows[k % len(rows)], rows[(7 * k + 3) % len(rows)]
        lines = first["dialogue"].split("\n") + second["dialogue"].split("\n") + [first["summary"]]
        kept = [line for line in lines if rng.random() < 0.67]
        other = rows[rng.randrange(len(rows))]["dialogue"].split("\n")
        kept += rng.sample(other, min(len(other), len(lines) // 3))
        rng.shuffle(kept[len(kept) // 2 :])  # part reordered: ROUGE-L and ROUGE-Lsum part ways
        pairs.append(("\n".join(kept), "\n".join(lines)))
    return pairs


def score_reference(scorer, pairs) -> list[dict]:
    return [scorer.score(reference, prediction) for prediction, reference in pairs]  # (target, prediction)


def score_peftlab(pairs, use_stemmer: bool) -> list[dict]:
    return [peftlab_rouge.rouge(prediction, reference, use_stemmer) for prediction, reference in pairs]


def run(pairs, use_stemmer: bool, chunk: int) -> dict:
    """Both sides on the same chunks, alternating which goes first; the largest score difference."""
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    peftlab_rouge._stem_token.cache_clear()  # start cold, as rouge-score does
    seconds = {"rouge-score": 0.0, "peftlab": 0.0}
    max_diff = 0.0
    for c, start in enumerate(range(0, len(pairs), chunk)):
        part = pairs[start : start + chunk]
        sides = [("rouge-score", lambda: score_reference(scorer, part)), ("peftlab", lambda: score_peftlab(part, use_stemmer))]
        results = {}
        for name, side in sides if c % 2 == 0 else sides[::-1]:
            begin = time.perf_counter()
            results[name] = side()
            seconds[name] += time.perf_counter() - begin
        for theirs, ours in zip(results["rouge-score"], results["peftlab"]):
            for rouge_type in ROUGE_TYPES:
                for measure in MEASURES:
                    diff = abs(getattr(theirs[rouge_type], measure) - getattr(ours[rouge_type], measure))
                    max_diff = max(max_diff, diff)
    if max_diff > 1e-12:
        raise SystemExit(f"scores differ (stemmer {use_stemmer}): max abs difference {max_diff:.3e}")
    return {
        "use_stemmer": use_stemmer,
        "rouge_score_s": seconds["rouge-score"],
        "peftlab_s": seconds["peftlab"],
        "speedup": seconds["rouge-score"] / seconds["peftlab"],
        "max_abs_diff": max_diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="200 pairs instead of 2,000")
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--chunk", type=int, default=50)
    args = parser.parse_args()
    count = 200 if args.quick else args.pairs

    pairs = build_pairs(count)
    tokens = [len(peftlab_rouge.tokenize(text)) for pair in pairs for text in pair]
    lines = [text.count("\n") + 1 for pair in pairs for text in pair]
    rows = [run(pairs, use_stemmer, args.chunk) for use_stemmer in (False, True)]

    print(f"{count} pairs from DialogSum dev, {sum(tokens) / len(tokens):.0f} tokens and "
          f"{sum(lines) / len(lines):.0f} lines per text on average; ROUGE-1/2/L/Lsum, interleaved chunks of {args.chunk}")
    print("| use_stemmer | rouge-score s | peftlab s | speed-up | max abs diff |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['use_stemmer']} | {row['rouge_score_s']:.2f} | {row['peftlab_s']:.2f} | "
              f"{row['speedup']:.1f}x | {row['max_abs_diff']:.1e} |")
    RESULTS.parent.mkdir(exist_ok=True)
    summary = {"pairs": count, "mean_tokens": sum(tokens) / len(tokens), "mean_lines": sum(lines) / len(lines),
               "chunk": args.chunk, "rows": rows}
    RESULTS.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
