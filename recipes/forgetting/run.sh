#!/usr/bin/env bash
# Catastrophic forgetting, and three ways to avoid it, on the embedded model and the embedded tasks.
#
#   recipes/forgetting/run.sh [OUT_DIR]   (MODEL=..., STEPS=..., FULL_LR=..., LAMBDA=... change the defaults)
#
# Four runs with the same budget (STEPS optimizer steps of 8 examples, seed 42; 40 steps = one
# epoch of the 320 training summaries; full fine-tuning at FULL_LR, LoRA at its default 1e-3):
#   single  full fine-tuning on summarisation only           (the course notes: may forget other tasks)
#   multi   full fine-tuning on a mixture of four tasks       (FLAN-style multi-task instruction tuning)
#   lora    LoRA on summarisation only                        (PEFT: the base weights stay frozen)
#   l2sp    full fine-tuning on summarisation with L2-SP      (penalty LAMBDA * ||theta - theta0||^2)
# after each, `peftlab forgetting` evaluates the base model and each tuned model on the built-in `demo`
# suite (summaries, review stars, sentiment, arithmetic-to-Python, QA) and prints before/after/delta.
set -euo pipefail
out=${1:-runs/forgetting}
model=${MODEL:-smollm2-135m-instruct}
steps=${STEPS:-40}
full_lr=${FULL_LR:-2e-4}
lambda=${LAMBDA:-10}
peftlab=${PEFTLAB:-peftlab}
common=(--model "$model" --max-steps "$steps" --batch-size 8 --seed 42 --save-every 0 --eval-limit 16 --overwrite)
mkdir -p "$out"
report() {  # report RUN --tuned|--adapter: the base and the tuned model on the held-out demo suite
  $peftlab forgetting --model "$model" "$2" "$out/$1/final" --suite demo --out "$out/report-$1" --overwrite
  echo "== $1"; cat "$out/report-$1/forgetting.md"
}
$peftlab train "${common[@]}" --out "$out/single" --data demo:dialogsum --method full --lr "$full_lr"
report single --tuned
$peftlab train "${common[@]}" --out "$out/multi" --method full --lr "$full_lr" --task sum=demo:dialogsum \
    --task rating:review_rating=demo:reviews --task code=demo:python --task qa=demo:qa --mix equal
report multi --tuned
$peftlab train "${common[@]}" --out "$out/lora" --data demo:dialogsum --method lora
report lora --adapter
$peftlab train "${common[@]}" --out "$out/l2sp" --data demo:dialogsum --method full --lr "$full_lr" --regularize l2sp --reg-lambda "$lambda"
report l2sp --tuned
