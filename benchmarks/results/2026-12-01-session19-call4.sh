#!/usr/bin/env bash
# Session 19, call 4: the final tree (811785d): served steps at 1/8/64/256, the GPU suite, the offline timeline, GPU busy.
set -uo pipefail
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/llmfx-inductor LLMFX_COMMIT=811785d
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip install -e failed"
s=$(date +%s)
python3 benchmarks/step_profile.py --batches 1,8,64,256 --context 1024 --steps 100 --max-num-tokens 2048 --save "$OUT" \
  --tag=-final 2>&1 | tee -a "$OUT/steps.log" | grep '^{' | cut -c1-100
echo "steps took $(( $(date +%s) - s )) s"
bash benchmarks/gpu_run.sh tests timeline busy
