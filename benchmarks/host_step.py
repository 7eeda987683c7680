"""Host time of one scheduling step (schedule + postprocess) in steady decode at batch 256.

PERF.md's target is <= 0.5 ms, hidden under a ~2 ms GPU step. No model runs: sampled tokens are a
fixed function of the request, so this times exactly the scheduler's pure functions the executor
calls every step. Prints the median over many steps (and over `--repeats` fresh runs: this box's
timings vary ~1.5x from process to process); `--gc` adds the cyclic GC's time and collections per
step (through gc.callbacks; the medians hide most of it); `--save DIR` writes a results JSON.
"""

import argparse
import gc
import statistics
import time

from llmfx import bench
from llmfx.kv_cache import new_page_pool
from llmfx.sampling_params import SamplingParams
from llmfx.scheduler import Request, SchedulerConfig, SchedulerLimits, new_scheduler_state, postprocess, schedule


def sampled_tokens(batch, token: int) -> dict[int, int]:
    """Sequence id -> token for every sampling row of batch (from its columns where it has them: older trees
    had records only)."""
    columns = getattr(batch, "columns", None)
    if columns is not None:
        return dict.fromkeys(columns.ids[columns.samples].tolist(), token)
    return {s.request_id: token for s in batch.seqs if s.sample}


def fill_prefix_cache(state, limits, cfg, num_pages: int, context: int):
    """Serve prefill-only requests of distinct prompts until about num_pages full pages sit in the prefix cache."""
    params = SamplingParams(max_tokens=1, ignore_eos=True, detokenize=False)
    fillers = tuple(Request(request_id=10**7 + i, prompt_token_ids=tuple((101 * i + 13 * j + 1) % 32000
                                                                         for j in range(context)), params=params)
                    for i in range(-(-num_pages // (context // 16))))
    state, b = schedule(state, fillers, limits, cfg)
    while b.seqs:
        state, _ = postprocess(state, b, {s.request_id: 1 for s in b.seqs if s.sample}, limits)
        state, b = schedule(state, (), limits, cfg)
    return state


def measure(batch: int, context: int, steps: int, policy: str, cached_pages: int = 0,
            num_pages: int | None = None, time_gc: bool = False, gc_freeze: bool = False,
            gc_threshold: int | None = None, prefix_cache: bool = True) -> dict[str, float]:
    limits = SchedulerLimits(max_batch_size=batch, max_num_tokens=8192, max_seq_len=context + steps + 64, page_size=16)
    cfg = SchedulerConfig(capacity_scheduler_policy=policy)
    pages = batch * (context + steps + 64) // 16 + 1 + cached_pages
    if num_pages is not None:
        if num_pages < pages:
            raise ValueError(f"--num-pages must be at least {pages} for this batch, context and cache, got {num_pages}")
        pages = num_pages
    state = new_scheduler_state(new_page_pool(pages, 16, prefix_cache))
    if cached_pages:
        state = fill_prefix_cache(state, limits, cfg, cached_pages, context)
    params = SamplingParams(max_tokens=steps + 32, ignore_eos=True, detokenize=False)
    requests = tuple(Request(request_id=i, prompt_token_ids=tuple((i * 7 + j) % 32000 for j in range(context)),
                             params=params) for i in range(batch))
    state, b = schedule(state, requests, limits, cfg)
    while any(not s.sample for s in b.seqs) or len(b.seqs) < batch:  # prefill everyone
        state, _ = postprocess(state, b, {s.request_id: 1 for s in b.seqs if s.sample}, limits)
        state, b = schedule(state, (), limits, cfg)
    sched_t, post_t = [], []
    timer = bench.GcTimer()
    if time_gc:
        gc.callbacks.append(timer)
    if gc_freeze:  # the application's choice, measured: live objects move to the permanent generation
        gc.collect()
        gc.freeze()
    thresholds = gc.get_threshold()
    if gc_threshold is not None:
        gc.set_threshold(gc_threshold, *thresholds[1:])
    for _ in range(steps):
        sampled = sampled_tokens(b, 5)  # the engine's output, made untimed
        t0 = time.perf_counter()
        state, _ = postprocess(state, b, sampled, limits)
        t1 = time.perf_counter()
        state, b = schedule(state, (), limits, cfg)
        t2 = time.perf_counter()
        post_t.append(t1 - t0)
        sched_t.append(t2 - t1)
    gc.set_threshold(*thresholds)
    if gc_freeze:
        gc.unfreeze()
    out = {"schedule_ms": statistics.median(sched_t) * 1e3, "postprocess_ms": statistics.median(post_t) * 1e3,
           "mean_step_ms": (sum(sched_t) + sum(post_t)) / steps * 1e3}
    if time_gc:
        gc.callbacks.remove(timer)
        out.update(timer.per_step(steps))
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--policy", default="guaranteed_no_evict")
    parser.add_argument("--cached-pages", type=int, default=0, help="full pages left in the prefix cache first")
    parser.add_argument("--num-pages", type=int, default=None,
                        help="KV pool size (default: just enough; the H200 serves TinyLlama from ~363k pages)")
    parser.add_argument("--repeats", type=int, default=1, help="fresh runs; each figure is the median over them")
    parser.add_argument("--gc", action="store_true", help="also time the cyclic GC's collections per step")
    parser.add_argument("--gc-freeze", action="store_true", help="gc.freeze() before the timed steps")
    parser.add_argument("--gc-threshold", type=int, default=None, help="the GC's gen-0 threshold for the timed steps")
    parser.add_argument("--no-prefix-cache", action="store_true", help="a pool that registers no pages (what they cost)")
    parser.add_argument("--save", default=None)
    parser.add_argument("--tag", default="", help="suffix of the results file name")
    args = parser.parse_args()
    if args.no_prefix_cache and args.cached_pages:
        parser.error("--cached-pages needs the prefix cache: drop --no-prefix-cache")
    runs = [measure(args.batch, args.context, args.steps, args.policy, args.cached_pages, args.num_pages, args.gc,
                    args.gc_freeze, args.gc_threshold, not args.no_prefix_cache) for _ in range(args.repeats)]
    steps = [r["schedule_ms"] + r["postprocess_ms"] for r in runs]
    rows = [bench.Row(benchmark="host_step", system="llmfx scheduler", batch=args.batch, metric=k,
                      value=statistics.median(r[k] for r in runs)) for k in runs[0]]
    rows.append(bench.Row(benchmark="host_step", system="llmfx scheduler", batch=args.batch, metric="step_ms",
                          value=statistics.median(steps), floor_fraction=0.5 / statistics.median(steps)))
    if args.repeats > 1:
        rows += [bench.Row(benchmark="host_step", system="llmfx scheduler", batch=args.batch, metric=f"step_ms_{name}",
                           value=f(steps)) for name, f in (("min", min), ("max", max))]
    bench.print_table(rows)
    if args.save:
        from pathlib import Path
        pool = "" if args.num_pages is None else f"-pool{args.num_pages}"
        cache = "-no-prefix-cache" if args.no_prefix_cache else f"-cached{args.cached_pages}"
        print(f"saved {bench.save(rows, Path(args.save), f'-host-step-b{args.batch}{cache}{pool}{args.tag}')}")
