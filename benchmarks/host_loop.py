"""Host time of the whole serving loop on PERF.md's offline workload, with the device work removed.

    python benchmarks/host_loop.py [--num-requests 256] [--gc-gen0-threshold N|python] [--profile] [--save DIR]

Builds the TinyLlama-shape LLM on the CPU (dummy weights, never run), then replaces the compiled step with an
instant stand-in that returns token 1 for every row: every other part of a step runs as served
(request intake, schedule, KV bookkeeping, input staging, collect, postprocess, delivery to the
front end thread). The wall time per step is then the host's floor on step time: a GPU step
faster than it leaves the GPU waiting (PERF.md: the target is 0.5 ms at batch 256). Reports the
median host time per step by decode batch size, by how many sequences finished just before the step (a
finish releases the sequence's pages and delivers its output: on the H200's host the step after one
finish took 1.1 ms more, session 15), and the cyclic GC's time, collections per generation and longest
pause over the run (every thread's); `--profile` adds yappi's busiest functions
across all threads (pip install yappi). This box's timings vary by about 30% run to run: compare
variants in one process where you can.
"""

import argparse
import collections
import gc
import json
import statistics
import time
from pathlib import Path


from llmfx import bench
from llmfx.llm import LLM
from llmfx.testing.stand_in import instant_step


def periods_by_finishes(trace) -> dict[int, list[float]]:
    """Decode-only launching iterations' periods (start to next start, s), keyed by how many sequences finished
    since the launch before (`bench.finished_before`): this iteration handles their pages and outputs."""
    launches = [t for t in trace if t.launched is not None]
    finished = bench.finished_before([(t.launched.num_seqs, t.launched.num_tokens == t.launched.num_decode)
                                      for t in launches])
    out: dict[int, list[float]] = {}
    for it, following, n in zip(launches, launches[1:], finished):
        if n is not None:
            out.setdefault(n, []).append(following.start - it.start)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tinyllama-1.1b")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--disable-overlap-scheduler", action="store_true")
    p.add_argument("--prefix-cache", action="store_true", help="keep KV block reuse on (the LLM default)")
    p.add_argument("--gc-gen0-threshold", default="20000",
                   help="the executor loop's GC gen-0 threshold (LLM's default 20000); 'python' leaves Python's 700")
    p.add_argument("--profile", action="store_true", help="yappi: the busiest functions over all threads")
    p.add_argument("--save", default=None)
    p.add_argument("--tag", default="")
    args = p.parse_args()
    try:
        threshold = bench.gc_threshold_arg(args.gc_gen0_threshold)
    except ValueError as err:
        p.error(str(err))
    from llmfx.kv_cache import KvCacheConfig

    work = bench.offline_workload(bench.preset(args.model).vocab_size, args.num_requests)
    params = bench.offline_params(work)
    prompts = [prompt for prompt, _ in work]
    kv = KvCacheConfig(max_tokens=args.num_requests * 2112, enable_block_reuse=args.prefix_cache)
    with LLM(args.model, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16", device="cpu", max_seq_len=2048 + 64,
             disable_overlap_scheduler=args.disable_overlap_scheduler, kv_cache_config=kv,
             garbage_collection_gen0_threshold=threshold) as llm:
        llm._engine._step = instant_step(llm._engine.engine_cfg.max_batch_size)
        if args.profile:
            import yappi

            yappi.set_clock_type("wall")
            yappi.start()
        # The executor thread's CPU time: unlike wall time, other work on a busy box does not inflate it.
        clock = time.pthread_getcpuclockid(llm._executor._thread.ident)
        gc_timer = bench.GcTimer()
        gc.callbacks.append(gc_timer)
        try:
            with llm.trace_steps() as trace:
                start, cpu_start = time.perf_counter(), time.clock_gettime(clock)
                llm.generate(prompts, params, use_tqdm=False)
                elapsed, cpu = time.perf_counter() - start, time.clock_gettime(clock) - cpu_start
        finally:
            gc.callbacks.remove(gc_timer)
        if args.profile:
            yappi.stop()
    by_batch = collections.defaultdict(list)
    for it, following in zip(trace, trace[1:]):  # start to start: the delivery of outputs counts
        batch = it.collected
        if batch is not None and batch.num_tokens == batch.num_decode and not following.waited_for_work:
            by_batch[min(256, -(-batch.num_decode // 32) * 32)].append(following.start - it.start)
    rows = [{"decode_batch_up_to": b, "steps": len(v), "median_ms": 1e3 * statistics.median(v)}
            for b, v in sorted(by_batch.items())]
    finishing = [{"finished_before": n, "steps": len(v), "median_ms": 1e3 * statistics.median(v)}
                 for n, v in sorted(periods_by_finishes(trace).items())]
    steps = sum(1 for it in trace if it.collected is not None)
    print(f"{args.num_requests} requests, {steps} steps in {elapsed:.2f} s: {1e3 * elapsed / steps:.2f} ms per step, "
          f"of which the executor thread's CPU time {1e3 * cpu / steps:.2f} ms")
    gc_stats = {"gc_gen0_threshold": threshold, "gc_s": round(sum(gc_timer.seconds), 4),
                "gc_collections": gc_timer.collections, "gc_longest_pause_ms": round(gc_timer.longest * 1e3, 2)}
    print(f"  GC: {gc_stats}")
    for r in rows:
        print(f"  decode batch <= {r['decode_batch_up_to']:3d}: {r['steps']:4d} steps, median {r['median_ms']:.2f} ms")
    for r in finishing:
        print(f"  decode steps after {r['finished_before']} finished: {r['steps']:4d} steps, median {r['median_ms']:.3f} ms")
    if args.profile:
        stats = yappi.get_func_stats()
        stats.sort("tsub")
        print("busiest functions (own time, all threads):")
        for s in list(stats)[:25]:
            print(f"  {s.tsub:8.3f} s own {s.ttot:8.3f} s total {s.ncall:9d} calls  {s.module.split('/')[-1]}:{s.lineno} {s.name}")
    if args.save:
        out = {"date": time.strftime("%Y-%m-%d"), "machine": "cpu", "model": args.model,
               "num_requests": args.num_requests, "overlap": not args.disable_overlap_scheduler,
               "prefix_cache": args.prefix_cache, "steps": steps, "seconds": elapsed,
               "executor_thread_cpu_s": cpu, **gc_stats, "by_decode_batch": rows, "by_finishes_before": finishing}
        Path(args.save).mkdir(parents=True, exist_ok=True)
        Path(args.save, f"host_loop{args.tag}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
