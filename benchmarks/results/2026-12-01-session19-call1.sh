#!/usr/bin/env bash
# Session 19, call 1: GEMV weight prefetch before the PDL wait (LLMFX_GEMV_PREFETCH 0 none, 1 first tile in
# registers, 2 L2 prefetch of the program's whole slice, 3 both): kernel tests under each, then batch-1/2 served steps.
set -uo pipefail
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/ind
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip install -e failed"
nvidia-smi --query-gpu=name,clocks.sm --format=csv,noheader
for pf in 1 2 3; do
  LLMFX_GEMV_PREFETCH=$pf python3 -m pytest -q -o addopts="" -p no:cacheprovider -m gpu tests/test_triton_gemv.py 2>&1 | tail -2 | sed "s/^/pf$pf tests: /"
done
for pf in 0 2 1 3 0 2; do
  s=$(date +%s)
  LLMFX_GEMV_PREFETCH=$pf python3 benchmarks/step_profile.py --batches 1,2 --context 1024 --steps 100 --max-num-tokens 2048 \
     --save "$OUT" --tag=-pf$pf-$s 2>&1 | tee -a "$OUT/ab.log" | grep '^{' | cut -c1-110 | sed "s/^/pf$pf: /"
  echo "took $(( $(date +%s) - s )) s"
done
