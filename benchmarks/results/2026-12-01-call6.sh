#!/usr/bin/env bash
# Session 18, call 6: batch-1 served steps, the SiLU gate fused into the down GEMV alone (norms unfused) vs ca22ffc.
set -uo pipefail
export PYTHONUNBUFFERED=1
for name in gateonly base; do
  tree="$PWD/.device/$name"
  (cd "$tree" && PYTHONPATH="$tree" TORCHINDUCTOR_CACHE_DIR=/tmp/ind-$name python3 benchmarks/step_profile.py \
     --batches 1 --context 1024 --steps 100 --max-num-tokens 2048 --save "$OUT" --tag=-ab-$name 2>&1 \
     | tee -a "$OUT/ab.log" | grep '^{' | cut -c1-80)
done
