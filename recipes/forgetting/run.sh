#!/usr/bin/env bash
# Catastrophic forgetting, and three ways to avoid it, on the embedded model and the embedded tasks.
#
#   recipes/forgetting/run.sh [OUT_DIR]   (MODEL=..., STEPS=..., FULL_LR=..., LAMBDA=..., RUNS=... change the defaults)
#
# Six runs with the same budget (STEPS optimizer steps of 8 examples, seed 42; 40 steps = one
# epoch of the 320 training summaries; full fine-tuning at FULL_LR, LoRA at its defaults):
#   single  full fine-tuning on summarisation only           (the course notes: may forget other tasks)
#   multi   full fine-tuning on a mixture of four tasks       (FLAN-style multi-task instruction tuning)
#   lora    LoRA on summarisation only                        (PEFT: the base weights stay frozen)
#   l2sp    full fine-tuning on summarisation with L2-SP      (penalty LAMBDA * ||theta - theta0||^2)
#   rating  LoRA on review stars only                         (a second single-task adapter)
#   merged  the lora and rating adapters merged into one      (peftlab merge-adapters, cat: the sum of both updates)
# after each, `peftlab forgetting` evaluates the base model and each tuned model on the built-in `demo`
# suite (summaries, review stars, sentiment, arithmetic-to-Python, QA) and prints before/after/delta.
# RUNS="multi lora rating merged" runs only those (merged needs lora and rating, run first or before).
set -euo pipefail
out=${1:-runs/forgetting}
model=${MODEL:-smollm2-135m-instruct}
steps=${STEPS:-40}
full_lr=${FULL_LR:-2e-4}
lambda=${LAMBDA:-10}
runs=${RUNS:-single multi lora l2sp rating merged}
peftlab=${PEFTLAB:-peftlab}
common=(--model "$model" --max-steps "$steps" --batch-size 8 --seed 42 --save-every 0 --eval-limit 16 --overwrite)
mkdir -p "$out"
report() {  # report RUN --tuned|--adapter: the base and the tuned model on the held-out demo suite
  $peftlab forgetting --model "$model" "$2" "$out/$1/final" --suite demo --out "$out/report-$1" --overwrite
  echo "== $1"; cat "$out/report-$1/forgetting.md"
}
wanted() { [[ " $runs " == *" $1 "* ]]; }
if wanted single; then
  $peftlab train "${common[@]}" --out "$out/single" --data demo:dialogsum --method full --lr "$full_lr"
  report single --tuned
fi
if wanted multi; then
  $peftlab train "${common[@]}" --out "$out/multi" --method full --lr "$full_lr" --task sum=demo:dialogsum \
      --task rating:review_rating=demo:reviews --task code=demo:python --task qa=demo:qa --mix equal
  report multi --tuned
fi
if wanted lora; then
  $peftlab train "${common[@]}" --out "$out/lora" --data demo:dialogsum --method lora
  report lora --adapter
fi
if wanted l2sp; then
  $peftlab train "${common[@]}" --out "$out/l2sp" --data demo:dialogsum --method full --lr "$full_lr" --regularize l2sp --reg-lambda "$lambda"
  report l2sp --tuned
fi
if wanted rating; then
  $peftlab train "${common[@]}" --out "$out/rating" --task rating:review_rating=demo:reviews --method lora
  report rating --adapter
fi
if wanted merged; then  # one adapter carrying both tasks: does it keep what each single-task adapter learnt?
  for need in lora rating; do
    [[ -f "$out/$need/final/adapter_config.json" ]] || { echo "merged needs the $need run first: RUNS=\"$need merged\"" >&2; exit 2; }
  done
  $peftlab merge-adapters --model "$model" --adapter sum="$out/lora/final" --adapter rating="$out/rating/final" \
      --combination cat --out "$out/merged/final" --overwrite
  report merged --adapter
fi
# One table of every run's scores on each task (the base first): merged against lora, rating and multi shows
# whether one merged adapter keeps both tasks.
"${PYTHON:-python3}" - "$out" $runs <<'PY'
import json, sys
from pathlib import Path
out, runs = Path(sys.argv[1]), sys.argv[2:]
reports = {r: json.loads((out / f"report-{r}" / "forgetting.json").read_text())
           for r in runs if (out / f"report-{r}" / "forgetting.json").is_file()}
if reports:
    first = next(iter(reports.values()))
    print("\n| task | metric | base | " + " | ".join(reports) + " |\n|---|---|---:|" + "---:|" * len(reports))
    for row in first["rows"]:
        cells = []
        for report in reports.values():
            mine = next(r for r in report["rows"] if r["task"] == row["task"])
            cells.append(f"{mine['after']:.4f} ({mine['delta']:+.4f})")
        print(f"| {row['task']} | {row['metric']} | {row['before']:.4f} | " + " | ".join(cells) + " |")
PY
