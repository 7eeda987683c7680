"""Where the offline workload's wall time goes, step by step: host work against device work.

    python benchmarks/offline_timeline.py [--model tinyllama-1.1b] [--num-requests 256] [--save DIR]

Runs PERF.md's offline workload through `LLM.generate` as `llmfx bench offline` does (untimed warm-up
first), with the executor loop traced (`LLM.trace_steps`) and CUDA events around every launched step.
Per loop iteration: its wall time (start to the next start, delivery included), the host's share
(wall less the wait in collect) and the device time of the step it launched. A step is host-bound
when its host time exceeds its device time; the sum of those excesses is what a faster host could
save at most, and the sum of device times is what the run would take if the host cost nothing.
Reported by decode batch size, so the answer to "host or kernels?" comes per batch, and by how many
sequences finished just before a decode step (their pages and outputs are that step's host work); the
saved JSON also lists every launching iteration in order (`steps`), so single host-bound steps can be found. On the CPU
the device column is empty (launch is synchronous there). The events add ~10 us of host work a step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from llmfx import bench
from llmfx.executor import StepTiming

BUCKETS = (1, 8, 32, 64, 96, 128, 160, 192, 224, 256)


@dataclass(frozen=True, slots=True)
class Iteration:
    """One traced loop iteration that launched a step."""

    seqs: int  # sequences in the launched batch
    prefill_tokens: int  # tokens of its chunks longer than one token
    wall_s: float
    host_s: float  # wall less the wait for the device in collect
    device_s: float | None  # the launched step's device time; None on the CPU


def iterations(trace: list[StepTiming], device_s: list[float] | None) -> list[Iteration]:
    """Launching iterations of a trace, each with the device time of its launch (device_s in launch order)."""
    launching = [i for i, t in enumerate(trace) if t.launched is not None]
    if device_s is not None and len(device_s) != len(launching):
        raise ValueError(f"{len(device_s)} device timings for {len(launching)} launched steps")
    out = []
    for k, i in enumerate(launching):
        t = trace[i]
        wall = (trace[i + 1].start if i + 1 < len(trace) else t.end) - t.start
        b = t.launched
        out.append(Iteration(seqs=b.num_seqs, prefill_tokens=b.num_tokens - b.num_decode, wall_s=wall,
                             host_s=max(0.0, wall - t.collect_s), device_s=None if device_s is None else device_s[k]))
    return out


def summarize(its: list[Iteration]) -> list[dict]:
    """Per batch bucket (decode-only steps) and one row for steps with prefill: counts, sums and medians in ms."""
    groups: dict[str, list[Iteration]] = {}
    for it in its:
        key = "prefill" if it.prefill_tokens else f"<={next(b for b in BUCKETS if it.seqs <= b)}"
        groups.setdefault(key, []).append(it)
    order = [f"<={b}" for b in BUCKETS] + ["prefill", "all"]
    groups["all"] = its
    rows = []
    for key in (k for k in order if k in groups):
        g = groups[key]
        row = {"batch": key, "steps": len(g), "wall_s": round(sum(i.wall_s for i in g), 4),
               "host_s": round(sum(i.host_s for i in g), 4),
               "median_wall_ms": round(statistics.median(i.wall_s for i in g) * 1e3, 3),
               "median_host_ms": round(statistics.median(i.host_s for i in g) * 1e3, 3),
               "max_wall_ms": round(max(i.wall_s for i in g) * 1e3, 3)}  # a stall (a full GC, say) shows here
        if all(i.device_s is not None for i in g):
            row.update(device_s=round(sum(i.device_s for i in g), 4),
                       median_device_ms=round(statistics.median(i.device_s for i in g) * 1e3, 3),
                       host_bound_steps=sum(i.host_s > i.device_s for i in g),
                       host_excess_s=round(sum(max(0.0, i.host_s - i.device_s) for i in g), 4))
        rows.append(row)
    return rows


def by_finishes(its: list[Iteration]) -> list[dict]:
    """Decode steps grouped by the sequences that finished since the step before (`bench.finished_before`):
    counts and median host ms, and with device times their median and the host-bound steps."""
    groups: dict[int, list[Iteration]] = {}
    for it, n in zip(its, bench.finished_before([(i.seqs, not i.prefill_tokens) for i in its])):
        if n is not None:
            groups.setdefault(n, []).append(it)
    rows = []
    for n, g in sorted(groups.items()):
        row = {"finished_before": n, "steps": len(g),
               "median_host_ms": round(statistics.median(i.host_s for i in g) * 1e3, 3)}
        if all(i.device_s is not None for i in g):
            row.update(median_device_ms=round(statistics.median(i.device_s for i in g) * 1e3, 3),
                       host_bound_steps=sum(i.host_s > i.device_s for i in g))
        rows.append(row)
    return rows


def step_rows(its: list[Iteration]) -> list[list]:
    """Every launching iteration in order: [sequences, prefill tokens, wall ms, host ms, device ms or None]."""
    def ms(seconds: float | None) -> float | None:
        return None if seconds is None else round(seconds * 1e3, 3)

    return [[i.seqs, i.prefill_tokens, ms(i.wall_s), ms(i.host_s), ms(i.device_s)] for i in its]


def timed_launches(engine) -> list[tuple[torch.cuda.Event, torch.cuda.Event]]:
    """Wrap the engine's launching calls (graph replay, compiled or eager step) with CUDA events; returns their list."""
    events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
    engine._replay, engine._step = bench.device_timed(engine._replay, events), bench.device_timed(engine._step, events)
    return events


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tinyllama-1.1b")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--lengths", default="100,1024", help="LO,HI: prompt and output lengths (PERF.md: 100,1024)")
    p.add_argument("--gc-gen0-threshold", default="20000",
                   help="the executor loop's GC gen-0 threshold (LLM's default 20000); 'python' leaves Python's 700")
    p.add_argument("--workdir", default=None, help="where the dummy checkpoint is saved (reused if present)")
    p.add_argument("--save", default=None)
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    if args.num_requests < 1:
        p.error(f"--num-requests must be >= 1, got {args.num_requests}")
    try:
        lo, hi = (int(x) for x in args.lengths.split(","))
    except ValueError:
        p.error(f"--lengths must be LO,HI (two integers), got {args.lengths!r}")
    if not 1 <= lo <= hi:
        p.error(f"--lengths must satisfy 1 <= LO <= HI, got {args.lengths!r}")
    try:
        threshold = bench.gc_threshold_arg(args.gc_gen0_threshold)
    except ValueError as err:
        p.error(str(err))
    from llmfx.llm import LLM
    from llmfx.presets import preset

    cuda = torch.cuda.is_available()
    path = bench.hf_checkpoint(args.model, Path(args.workdir or tempfile.mkdtemp()))
    vocab = preset(args.model).vocab_size
    work = bench.offline_workload(vocab, args.num_requests, (lo, hi))
    prompts = [p for p, _ in work]
    params = bench.offline_params(work)
    with LLM(str(path), skip_tokenizer_init=True, dtype="bfloat16" if cuda else "float32",
             max_seq_len=2048 + 64, garbage_collection_gen0_threshold=threshold) as llm:
        llm.generate(bench.shifted_prompts(prompts, vocab, 1), params, use_tqdm=False)
        events = timed_launches(llm._engine) if cuda else None
        with llm.trace_steps() as trace:
            start = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            elapsed = time.perf_counter() - start
        if cuda:
            torch.cuda.synchronize()
        device_s = [s.elapsed_time(e) / 1e3 for s, e in events] if cuda else None
        its = iterations(list(trace), device_s)
        rows, finishes = summarize(its), by_finishes(its)
    out_tokens = sum(n for _, n in work)
    print(f"{args.num_requests} requests, {out_tokens} output tokens in {elapsed:.3f} s: "
          f"{out_tokens / elapsed:,.0f} output tok/s")
    for row in rows + finishes:
        print(json.dumps(row))
    if args.save:
        saved = bench.save_rows(Path(args.save), f"offline_timeline{args.tag}.json", rows, model=args.model,
                                num_requests=args.num_requests, lengths=[lo, hi],
                                gc_gen0_threshold=threshold, wall_s=round(elapsed, 4),
                                output_tokens_per_s=round(out_tokens / elapsed, 1), by_finishes=finishes,
                                steps=step_rows(its))
        print(f"saved {saved}")


if __name__ == "__main__":
    main()
