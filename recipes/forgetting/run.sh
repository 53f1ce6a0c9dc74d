#!/usr/bin/env bash
# Catastrophic forgetting, and three ways to avoid it, on the embedded model and the embedded tasks.
#
#   recipes/forgetting/run.sh [OUT_DIR]        (MODEL=..., STEPS=..., LAMBDA=... to change the defaults)
#
# Four runs with the same budget (STEPS optimizer steps of 8 examples, seed 42):
#   single  full fine-tuning on summarisation only           (the course notes: may forget other tasks)
#   multi   full fine-tuning on a mixture of four tasks       (FLAN-style multi-task instruction tuning)
#   lora    LoRA on summarisation only                        (PEFT: the base weights stay frozen)
#   l2sp    full fine-tuning on summarisation with L2-SP      (penalty LAMBDA * ||theta - theta0||^2)
# then `peftlab forgetting` evaluates the base model and each tuned model on the built-in `demo`
# suite (summaries, review stars, sentiment, arithmetic-to-Python, QA) and prints before/after/delta.
set -euo pipefail
out=${1:-runs/forgetting}
model=${MODEL:-smollm2-135m-instruct}
steps=${STEPS:-16}
lambda=${LAMBDA:-10}
peftlab=${PEFTLAB:-peftlab}
common=(--model "$model" --max-steps "$steps" --batch-size 8 --seed 42 --save-every 0 --eval-limit 16 --overwrite)
mkdir -p "$out"
$peftlab train "${common[@]}" --out "$out/single" --data demo:dialogsum --method full
$peftlab train "${common[@]}" --out "$out/multi" --method full --task sum=demo:dialogsum \
    --task rating:review_rating=demo:reviews --task code=demo:python --task qa=demo:qa --mix equal
$peftlab train "${common[@]}" --out "$out/lora" --data demo:dialogsum --method lora
$peftlab train "${common[@]}" --out "$out/l2sp" --data demo:dialogsum --method full --regularize l2sp --reg-lambda "$lambda"
for run in single multi l2sp; do
  $peftlab forgetting --model "$model" --tuned "$out/$run/final" --suite demo --out "$out/report-$run" --overwrite
done
$peftlab forgetting --model "$model" --adapter "$out/lora/final" --suite demo --out "$out/report-lora" --overwrite
for run in single multi lora l2sp; do echo "== $run"; cat "$out/report-$run/forgetting.md"; done
