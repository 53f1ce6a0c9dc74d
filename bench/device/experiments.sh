#!/usr/bin/env bash
# The course notes' experiment on a lent GPU machine: a compare of methods and a LoRA rank sweep
# on the embedded SmolLM2-135M-Instruct and real DialogSum data (400 train / 100 test).
#
#   bench/device/experiments.sh GGUF_FILE DIALOGSUM_JSONL OUT_DIR [TIME_LIMIT_S]
#
# The GPU machine has torch/transformers/peft but no registry access: peftlab runs from src/
# (PYTHONPATH), the gguf package and the data travel with the working tree. Compare and sweep run
# side by side; both are resumable, so a time limit only cuts what had not finished.
set -u
gguf=$1; data=$2; out=$3; limit=${4:-330}
here=$(cd "$(dirname "$0")/../.." && pwd)
export PYTHONPATH="$here/src:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 PEFTLAB_CACHE=${PEFTLAB_CACHE:-$out/cache}
model=${MODEL:-smollm2-135m-instruct}
py=${PYTHON:-python3}
mkdir -p "$out"
[ "$gguf" = "-" ] || "$py" - "$gguf" <<'PY'
import sys, time
from pathlib import Path
from peftlab.models import cache_dir, convert_gguf
t = time.time()
convert_gguf(Path(sys.argv[1]), cache_dir() / "models" / "smollm2-135m-instruct")
print(f"converted in {time.time() - t:.1f} s", flush=True)
PY
common=(--model "$model" --data "$data" --split-fractions 0.8,0.0,0.2 --test-limit "${TEST_LIMIT:-100}"
        --epochs 1 --batch-size "${BATCH:-8}" --max-new-tokens "${NEW_TOKENS:-64}" --eval-batch-size 50 --device auto)
"$py" -m peftlab compare "${common[@]}" --out "$out/compare" \
    --methods "${METHODS:-base,fewshot:1,full,lora,dora,adapter,prompt,ia3,bitfit}" > "$out/compare.log" 2>&1 &
cmp=$!
"$py" -m peftlab sweep "${common[@]}" --out "$out/sweep" --method lora --rank "${RANKS:-1,2,4,8,16,32,64}" \
    --latency-examples 0 > "$out/sweep.log" 2>&1 &
swp=$!
( sleep "$limit"; kill $cmp $swp 2>/dev/null ) & watchdog=$!
wait $cmp; echo "compare exit $?"; wait $swp; echo "sweep exit $?"
kill $watchdog 2>/dev/null
for d in compare sweep; do  # rebuild the report from whatever finished
  [ -f "$out/$d/results.json" ] || "$py" - "$out/$d" <<'PY'
import json, sys
from pathlib import Path
rows = [json.loads(p.read_text()) for p in sorted(Path(sys.argv[1]).glob("variants/*/result.json"))]
kind = "SweepConfig" if "sweep" in sys.argv[1] else "CompareConfig"
if rows:
    (Path(sys.argv[1]) / "results.json").write_text(json.dumps({"kind": kind, "rows": rows}, indent=2))
PY
  [ -f "$out/$d/results.json" ] && "$py" -m peftlab report --run-dir "$out/$d" || true
done
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
