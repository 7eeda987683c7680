#!/usr/bin/env bash
# Session 19, call 3: step inputs read before the PDL wait (rope + KV write, decode, reduce, varlen) with and without
# the decode kernel's L2 prefetch of its split's K/V rows (LLMFX_NO_KV_PREFETCH=1 turns it off), vs HEAD.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip install -e failed"
nvidia-smi --query-gpu=name,clocks.sm --format=csv,noheader
python3 -m pytest -q -o addopts="" -p no:cacheprovider -m gpu tests/test_triton_attention.py tests/test_triton_rope_kv.py 2>&1 | tail -2
LLMFX_NO_KV_PREFETCH=1 python3 -m pytest -q -o addopts="" -p no:cacheprovider -m gpu tests/test_triton_attention.py 2>&1 | tail -1
for name in pf nopf base pf nopf; do
  tree=$([ "$name" = base ] && echo "$PWD/.device/base" || echo "$PWD")
  nopf=$([ "$name" = nopf ] && echo 1 || echo "")
  s=$(date +%s)
  (cd "$tree" && LLMFX_NO_KV_PREFETCH=$nopf PYTHONPATH="$tree" TORCHINDUCTOR_CACHE_DIR=/tmp/ind-$name python3 \
     benchmarks/step_profile.py --batches 1,8,64,256 --context 1024 --steps 100 --max-num-tokens 2048 --save "$OUT" \
     --tag=-ab-$name-$s 2>&1 | tee -a "$OUT/ab.log" | grep '^{' | cut -c1-100 | sed "s/^/$name: /")
  echo "took $(( $(date +%s) - s )) s"
done
