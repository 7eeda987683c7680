#!/usr/bin/env bash
# One device call's worth of GPU work: `bash benchmarks/gpu_run.sh STAGE...` with stages
#   tests    the GPU test suite (marked gpu)
#   latency  PERF.md latency, batches 1,8,64,256, transformers peers
#   offline  PERF.md offline workload, llmfx overlap on and off, transformers continuous batching peer
#   startup  cold and warm compile cache
#   profile  the simulator's cost model for the TinyLlama shape
#   simval   the simulator against the engine: one build, profiled, offline + Poisson at 70% load, simulated
#   dynamic  step_profile at batch 1 / 64 / 136 / 256, context 1024: one shape-generic graph vs one per bucket
#   busy     step_profile at batch 64, context 1024: GPU busy with the overlap scheduler on and off
#   ropekv   the fused rope + KV-write kernel: its GPU tests and the decoder's parity tests, then its benchmark
#   gc       offline without peers, as is and with gc.freeze() before the timed run (GC time and full collections reported)
#   prefill  one full prefill step's forward (8192 tokens of the offline workload's prompts): time and kernel table
#   trace    the offline workload's first steps (outputs cut to 24 tokens) under torch.profiler: kernels per served step
#   timeline the offline workload step by step: host time vs device time per decode batch size (offline_timeline.py)
#   ab       served steps (step_profile, batch 64 / 256 or $AB_BATCHES, context 1024) of this tree and of the tree in $BASELINE,
#            in $AB_ORDER (default "new base")
#            (e.g. `git archive REV | tar -x -C .device/base`, carried), each with its own compile cache
#   offlineab  `llmfx bench offline --no-peers --repeats ${AB_REPEATS:-2}` of this tree and of $BASELINE, in $AB_ORDER
#            (default "new base"), each with its own compile cache
#   timelineab  offline_timeline.py of this tree and of $BASELINE, in $AB_ORDER (default "new base"), each with its own
#            compile cache: host vs device time per decode batch size for both
#   startupab  `llmfx bench startup` of this tree and of $BASELINE, in $AB_ORDER (default "new base"), each run in its
#            own fresh workdir, so both trees' cold runs start from empty inductor and Triton caches
# Logs and results go to $OUT (the device tool brings them back). Start the command with LLMFX_COMMIT=<hash>: the
# results record it (bench.source_commit), and the device copy's own .git can name an older commit. The A/B
# stages' base results would carry the same name: label those by file name when you commit them.
set -uo pipefail
OUT=${OUT:-/tmp/llmfx-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/llmfx-inductor}
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip install -e failed"
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv,noheader
work=/tmp/llmfx-bench
for stage in "$@"; do
  start=$(date +%s)
  case "$stage" in
    tests) python3 -m pytest -q -o addopts="" -p no:cacheprovider -m gpu tests/ 2>&1 | tee "$OUT/gpu_tests.log" | tail -25 ;;
    latency) llmfx bench latency --workdir $work --save "$OUT" --tag=-latency 2>&1 | tee "$OUT/latency.log" | tail -30 ;;
    offline) llmfx bench offline --workdir $work --save "$OUT" --tag=-offline 2>&1 | tee "$OUT/offline.log" | tail -12
             llmfx bench offline --workdir $work --no-peers --disable-overlap-scheduler --save "$OUT" \
               --tag=-offline-no-overlap 2>&1 | tee -a "$OUT/offline.log" | tail -6 ;;
    startup) llmfx bench startup --workdir $work --save "$OUT" --tag=-startup 2>&1 | tee "$OUT/startup.log" | tail -20 ;;
    profile) llmfx profile --model tinyllama-1.1b --out "$OUT/profile_h200.json" 2>&1 | tee "$OUT/profile.log" | tail -8 ;;
    simval) python3 benchmarks/sim_validation.py --model tinyllama-1.1b --out "$OUT" 2>&1 | tee "$OUT/simval.log" \
              | tail -12 ;;
    dynamic) for d in auto false; do
               python3 benchmarks/step_profile.py --batches 1,64,136,256 --context 1024 --steps 60 --max-num-tokens 2048 \
                 --compile-dynamic $d --save "$OUT" --tag=-dynamic-$d 2>&1 | tee -a "$OUT/dynamic.log" | tail -6
             done ;;
    busy) for o in "" --disable-overlap-scheduler; do
            python3 benchmarks/step_profile.py --batches 64 --context 1024 --steps 200 --max-num-tokens 2048 $o \
              --save "$OUT" --tag=-busy${o:+-no-overlap} 2>&1 | tee -a "$OUT/busy.log" | grep '^{'
          done ;;
    ropekv) python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_triton_rope_kv.py tests/test_gpu.py 2>&1 \
              | tee "$OUT/ropekv_tests.log" | tail -8
            python3 benchmarks/rope_kv_write.py --save "$OUT" 2>&1 | tee "$OUT/ropekv.log" | tail -30 ;;
    gc) for f in "" --gc-freeze; do
          llmfx bench offline --workdir $work --no-peers $f --save "$OUT" --tag=-offline-gc${f:+-freeze} 2>&1 \
            | tee -a "$OUT/gc.log" | tail -6
        done ;;
    prefill) python3 benchmarks/graph_parts.py --prefill-tokens 8192 --trace --save "$OUT" 2>&1 \
               | tee "$OUT/prefill.log" | tail -45 ;;
    trace) python3 benchmarks/served_trace.py --workdir $work --save "$OUT" 2>&1 | tee "$OUT/trace.log" | tail -60 ;;
    timeline) python3 benchmarks/offline_timeline.py --workdir $work --save "$OUT" 2>&1 | tee "$OUT/timeline.log" | tail -14 ;;
    ab) [ -d "${BASELINE:-}" ] || { echo "ab needs BASELINE=<a tree of the base revision>"; continue; }
        for name in ${AB_ORDER:-new base}; do
          tree=$([ "$name" = new ] && echo "$PWD" || echo "$BASELINE")
          (cd "$tree" && PYTHONPATH="$tree" TORCHINDUCTOR_CACHE_DIR=/tmp/llmfx-inductor-$name python3 \
             benchmarks/step_profile.py --batches ${AB_BATCHES:-64,256} --context 1024 --steps ${AB_STEPS:-100} --max-num-tokens 2048 \
             --save "$OUT" --tag=-ab-$name 2>&1 | tee -a "$OUT/ab.log" | grep '^{')
        done ;;
    offlineab) [ -d "${BASELINE:-}" ] || { echo "offlineab needs BASELINE=<a tree of the base revision>"; continue; }
        for name in ${AB_ORDER:-new base}; do
          tree=$([ "$name" = new ] && echo "$PWD" || echo "$BASELINE")
          (cd "$tree" && PYTHONPATH="$tree" TORCHINDUCTOR_CACHE_DIR=/tmp/llmfx-inductor-$name python3 -m llmfx.cli bench \
             offline --workdir $work --no-peers --repeats ${AB_REPEATS:-2} --save "$OUT" --tag=-offline-ab-$name 2>&1 \
             | tee -a "$OUT/offlineab.log" | tail -8)
        done ;;
    timelineab) [ -d "${BASELINE:-}" ] || { echo "timelineab needs BASELINE=<a tree of the base revision>"; continue; }
        for name in ${AB_ORDER:-new base}; do
          tree=$([ "$name" = new ] && echo "$PWD" || echo "$BASELINE")
          (cd "$tree" && PYTHONPATH="$tree" TORCHINDUCTOR_CACHE_DIR=/tmp/llmfx-inductor-$name python3 \
             benchmarks/offline_timeline.py --workdir $work --save "$OUT/timeline-$name" 2>&1 \
             | tee -a "$OUT/timelineab.log" | tail -14)
        done ;;
    startupab) [ -d "${BASELINE:-}" ] || { echo "startupab needs BASELINE=<a tree of the base revision>"; continue; }
        for name in ${AB_ORDER:-new base}; do
          tree=$([ "$name" = new ] && echo "$PWD" || echo "$BASELINE")
          dir=$(mktemp -d /tmp/llmfx-startup-$name-XXXX)
          (cd "$tree" && PYTHONPATH="$tree" llmfx bench startup --workdir "$dir" --save "$OUT" --tag=-startup-ab-$name \
             2>&1 | tee -a "$OUT/startupab.log" | tail -14)
        done ;;
    *) echo "unknown stage $stage" ;;
  esac
  echo "== $stage took $(( $(date +%s) - start )) s"
done
