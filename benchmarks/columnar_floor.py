"""A floor for the host step if decode state were held as arrays: a numpy sketch, not llmfx code.

    python benchmarks/columnar_floor.py [--batch 256] [--steps 600] [--save DIR]

Written when llmfx's scheduler kept one frozen record per sequence and rebuilt it twice a step, plus
a ScheduledSeq and a TokenEvent: ~7 us of Python per sequence (benchmarks/host_step.py: ~1.9 ms at
batch 256 on the 2-core CPU box, PERF.md's target is 0.5 ms); session 10 made it columnar
(llmfx/running.py). This sketch does one steady decode
step's worth of the same bookkeeping over arrays instead: append the sampled tokens to an
append-only output tape (a state sees its prefix), stop on length or EOS, allocate a page where the
last one is full (page table copied, as an immutable state would), and compute the step's slots
and sequence lengths; the per-request events stay a Python list. No prefix-cache registration,
preemption, beams or chunked prefill: it bounds from below what a columnar decode state could cost.
"""

import argparse
import statistics
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--save", type=Path, default=None)
    args = p.parse_args(argv)
    b, ps, ctx = args.batch, args.page_size, args.context
    max_pages = -(-(ctx + args.steps + 1) // ps)
    computed = np.full(b, ctx, np.int64)  # tokens whose KV is written or scheduled
    num_out = np.zeros(b, np.int64)
    max_tokens = np.full(b, args.steps + 1, np.int64)
    eos = np.full(b, 2, np.int64)
    table = np.zeros((b, max_pages), np.int64)
    num_pages = np.full(b, ctx // ps, np.int64)
    table[:, : ctx // ps] = np.arange(1, b * (ctx // ps) + 1).reshape(b, -1)
    free = np.arange(b * (ctx // ps) + 1, b * max_pages + 1)
    free_top = len(free)
    outputs = np.zeros((b, args.steps + 1), np.int64)
    request_ids = list(range(b))
    rows = np.arange(b)
    rng = np.random.default_rng(0)
    times = []
    for _ in range(args.steps):
        tokens = rng.integers(3, 32000, b)
        start = time.perf_counter()
        outputs[rows, num_out] = tokens  # postprocess
        num_out = num_out + 1
        finished = (num_out >= max_tokens) | (tokens == eos)
        events = list(zip(request_ids, tokens.tolist()))
        need = computed == num_pages * ps  # schedule: one token each, a page where the last is full
        k = int(need.sum())
        new_pages = free[free_top - k: free_top]
        free_top -= k
        table = table.copy()
        grow = np.flatnonzero(need)
        table[grow, num_pages[grow]] = new_pages
        num_pages = num_pages + need
        positions = computed
        computed = computed + 1
        slots = table[rows, positions // ps] * ps + positions % ps  # step inputs
        seq_lens = positions + 1
        times.append(time.perf_counter() - start)
        assert len(events) == b and slots.shape == seq_lens.shape == finished.shape == (b,)
    median_ms = statistics.median(times) * 1e3
    print(f"batch {b}: median {median_ms:.3f} ms per step over {len(times)} steps")
    if args.save:
        from llmfx.bench import save_rows

        row = {"batch": b, "context": ctx, "steps": len(times), "median_ms": median_ms}
        print("saved", save_rows(args.save, f"{time.strftime('%Y-%m-%d')}-cpu-columnar-floor-b{b}.json", [row]))


if __name__ == "__main__":
    main()
