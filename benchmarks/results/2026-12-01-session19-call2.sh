#!/usr/bin/env bash
# Session 19, call 2: step inputs (lengths, query starts, positions, slots, rope row) read before the PDL wait in
# the rope + KV write, decode and decode reduce kernels, vs HEAD; served steps, each tree its own compile cache.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip install -e failed"
nvidia-smi --query-gpu=name,clocks.sm --format=csv,noheader
python3 -m pytest -q -o addopts="" -p no:cacheprovider -m gpu tests/test_triton_attention.py tests/test_triton_rope_kv.py 2>&1 | tail -2
for name in new base new; do
  tree=$([ "$name" = new ] && echo "$PWD" || echo "$PWD/.device/base")
  s=$(date +%s)
  (cd "$tree" && PYTHONPATH="$tree" TORCHINDUCTOR_CACHE_DIR=/tmp/ind-$name python3 benchmarks/step_profile.py \
     --batches 1,64,256 --context 1024 --steps 100 --max-num-tokens 2048 --save "$OUT" --tag=-ab-$name-$s 2>&1 \
     | tee -a "$OUT/ab.log" | grep '^{' | cut -c1-110 | sed "s/^/$name: /")
  echo "took $(( $(date +%s) - s )) s"
done
