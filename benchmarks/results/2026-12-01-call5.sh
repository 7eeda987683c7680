#!/usr/bin/env bash
# Session 18, call 5: GPU tests of the fused GEMVs / decode merge / static sizes, then served steps of three trees.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
python3 -m pytest -q -o addopts="" -p no:cacheprovider -m gpu tests/test_fused_linear.py tests/test_triton_attention.py \
  tests/test_gpu.py tests/test_gpu_engine.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -8
for name in new nomerge base; do
  tree=$([ "$name" = new ] && echo "$PWD" || echo "$PWD/.device/$name")
  (cd "$tree" && PYTHONPATH="$tree" TORCHINDUCTOR_CACHE_DIR=/tmp/ind-$name python3 benchmarks/step_profile.py \
     --batches 1,64,256 --context 1024 --steps 60 --max-num-tokens 2048 --save "$OUT" --tag=-ab-$name 2>&1 \
     | tee -a "$OUT/ab.log" | grep '^{' | cut -c1-80)
done
