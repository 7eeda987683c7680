"""Where one steady decode step's time goes: host phases against device time (run on the GPU).

Builds the TinyLlama-shape engine as serving does (dummy weights), fills decode batches of a few
sizes and drives `llmfx.executor.step` by hand with the overlap scheduler on (off with
--disable-overlap-scheduler). For each batch size it reports the wall time per step, the device
time of the step's work (CUDA events around the launch, read after the fact), their ratio
(`gpu_busy`, PERF.md's GPU-busy figure), the median and longest period between steps returning (the mean
hides whether a gap is every step or a few outliers) and the host time of each phase: schedule, input building,
the compiled call, the result copy, collect and postprocess. A step is host-bound when the phases
sum to more than its device time. `--save DIR` writes the table as JSON; `--trace` adds a torch
profiler table of the busiest host ops at the smallest batch.
"""

import argparse
import collections
import datetime
import json
import statistics
import time
from pathlib import Path

import torch

import llmfx.executor as executor
from llmfx import bench
from llmfx.sim.profile import build_engine
from llmfx.executor import AbortRequest, AddRequest, gc_gen0_threshold
from llmfx.sampling_params import SamplingParams
from llmfx.scheduler import Request


class PhaseTimer:
    """Accumulates host seconds per named phase by wrapping callables."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = collections.defaultdict(list)

    def wrap(self, name, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name].append(time.perf_counter() - t0)
        return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tinyllama-1.1b")
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--save", default=None)
    parser.add_argument("--tag", default="")
    parser.add_argument("--trace", action="store_true")
    parser.add_argument("--graph-capture", default="manual", choices=["manual", "inductor"])
    parser.add_argument("--compile-dynamic", default="auto", choices=["auto", "false"],
                        help="auto: one shape-generic graph after two sizes (the default); false: one graph per bucket")
    parser.add_argument("--max-num-tokens", type=int, default=1024, help="sets the mixed buckets (and their compiles)")
    parser.add_argument("--gc-gen0-threshold", default="20000",
                        help="the GC gen-0 threshold the steps run under, as the executor loop's (LLM's default "
                             "20000); 'python' leaves Python's 700")
    parser.add_argument("--disable-overlap-scheduler", action="store_true",
                        help="postprocess each step before launching the next (for the overlap's gain)")
    args = parser.parse_args()
    try:
        gc_threshold = bench.gc_threshold_arg(args.gc_gen0_threshold)
    except ValueError as err:
        parser.error(str(err))
    batches = [int(b) for b in args.batches.split(",")]
    cuda = torch.cuda.is_available()
    # The first requests decode while the last ones still prefill, and each decode takes one token of
    # a step's max_num_tokens: a request's output must outlast the fill, the warm-up and the timed
    # steps, or the batch never fills (and with max_num_tokens <= batch the prefill starves).
    largest = max(batches)
    if args.max_num_tokens <= largest:
        parser.error(f"--max-num-tokens must exceed the largest batch ({largest}) so that its prefill progresses")
    fill_steps = -(-largest * args.context // (args.max_num_tokens - largest)) + largest
    max_tokens = fill_steps + 5 + args.steps + 16
    # Decode buckets are exactly the profiled batch sizes, so a static build compiles only what it times.
    e = build_engine(args.model, dtype="bfloat16" if cuda else "float32", load_format="dummy",
                     max_batch_size=max(batches), max_num_tokens=args.max_num_tokens,
                     max_seq_len=args.context + max_tokens + 64,
                     kv_tokens=max(batches) * (args.context + max_tokens + 64), cuda_graph_capture=args.graph_capture,
                     cuda_graph_batch_sizes=batches, compile_dynamic=None if args.compile_dynamic == "auto" else False)
    e.cfg = executor.ExecutorConfig(limits=e.cfg.limits, scheduler=e.cfg.scheduler,
                                    overlap=not args.disable_overlap_scheduler)
    timer = PhaseTimer()
    for name in ("schedule", "postprocess"):
        setattr(executor, name, timer.wrap(name, getattr(executor, name)))
    engine = e.engine
    engine._stage = timer.wrap("inputs", engine._stage)
    engine._penalties = timer.wrap("penalties", engine._penalties)
    engine.collect = timer.wrap("collect", engine.collect)
    device_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def on_device(fn):
        return bench.device_timed(fn, device_events) if cuda else fn

    engine._step = timer.wrap("compiled call", on_device(engine._step))
    engine._replay = timer.wrap("graph replay", on_device(engine._replay))  # captured by hand: the step's graphs
    ids = iter(range(10**9))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    rows = []
    with gc_gen0_threshold(gc_threshold):  # the steps run as the executor loop runs them
        for batch in batches:
            inbox = [AddRequest(Request(request_id=next(ids), prompt_token_ids=tuple(
                (7 * i + j) % engine.cfg.vocab_size for j in range(args.context)), params=params)) for i in range(batch)]
            mine = {message.request.request_id for message in inbox}
            while True:
                out = e.step(inbox)
                inbox = []
                if len(out.batch.seqs) == batch and all(len(s.token_ids) == 1 for s in out.batch.seqs):
                    break
                if any(event.finish_reason and event.request_id in mine for event in out.events):  # fail, not hang
                    raise RuntimeError(f"a request finished before batch {batch} filled: {out.errors or out.events[0]}")
            for _ in range(5):
                e.step()
            timer.seconds.clear()
            device_events.clear()
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            ends = []
            for _ in range(args.steps):
                e.step()
                ends.append(time.perf_counter())
            if cuda:
                torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) / args.steps
            # Per-step periods: in steady state a step returns once per device step, so their median shows
            # the typical step and the mean (wall) adds the outliers (a GC pause, a page boundary).
            periods = [b - a for a, b in zip([t0] + ends[:-1], ends)]
            device = statistics.median(s.elapsed_time(t) for s, t in device_events) if cuda else float("nan")
            row = {"batch": batch, "wall_ms_per_step": round(wall * 1e3, 3), "device_ms_per_step": round(device, 3),
                   "median_step_period_ms": round(statistics.median(periods) * 1e3, 3),
                   "max_step_period_ms": round(max(periods) * 1e3, 3),
                   # PERF.md's "GPU busy": the fraction of wall time the device spends on the steps' work.
                   "gpu_busy": round(device / (wall * 1e3), 3)}
            row.update({f"host_{k.replace(' ', '_')}_ms": round(statistics.median(v) * 1e3, 3)
                        for k, v in timer.seconds.items()})
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.trace and batch == batches[0]:
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                    for _ in range(20):
                        e.step()
                table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
                print(table)
                if args.save:
                    Path(args.save, f"step_profile_trace{args.tag}.txt").write_text(table)
            sched = e.state.sched
            e.step([AbortRequest(tuple(s.request_id for s in (*sched.running, *sched.waiting)))])
            e.step()
    if args.save:
        result = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
                  "gpu": torch.cuda.get_device_name() if cuda else "cpu", "model": args.model,
                  "context": args.context, "steps": args.steps, "rows": rows}
        Path(args.save).mkdir(parents=True, exist_ok=True)
        result["graph_capture"] = args.graph_capture
        result["compile_dynamic"] = args.compile_dynamic
        result["overlap"] = not args.disable_overlap_scheduler
        result["gc_gen0_threshold"] = gc_threshold
        Path(args.save, f"step_profile{args.tag}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
