"""The simulator against the engine it models, in one process on one engine build.

1. Build the LLM as serving does and profile it (`profile_llm`): the cost model.
2. Serve PERF.md's offline workload (all requests at once, after an untimed warm-up run on other
   tokens, so the timed run gets no prefix-cache hits): output tok/s and mean end-to-end latency
   from the RequestOutputs' metrics.
3. Serve Poisson arrivals at `load` x the offline run's request rate, each request submitted at
   its arrival time.
4. Simulate both with the fitted cost model and the engine's own limits, policy, KV pool and
   overlap setting, each request arriving when the engine received it, and compare.

`benchmarks/sim_validation.py` is the command line; `main` writes sim_validation.json (the report),
profile.json (the fitted cost model, a drop-in for llmfx/sim/profile_default.json) and
served_steps.json (every step the engine served, timed, to refit cost models offline).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmfx.bench import offline_workload
from llmfx.kv_cache import KvCacheConfig
from llmfx.sampling_params import SamplingParams
from llmfx.sim.arrivals import SimRequest, poisson
from llmfx.sim.cli import describe, parse_length
from llmfx.sim.cost_model import CostModel, StepSample, save_cost_model
from llmfx.sim.profile import charge_steps, profile_llm
from llmfx.sim.simulator import SimConfig, simulate

FORMAT = "llmfx-sim-validation"
METRICS = ("output_tok_per_s", "mean_latency_s")  # compared, each within the tolerance


@dataclass(frozen=True, slots=True, kw_only=True)
class Figures:
    """Throughput and latency of one served or simulated run (seconds from the first arrival)."""

    num_requests: int
    output_tokens: int
    duration_s: float  # first arrival to last finish
    output_tok_per_s: float
    mean_latency_s: float  # arrival to last token, averaged over requests
    requests_per_s: float

    @staticmethod
    def of(requests: Sequence[tuple[float, float, int]]) -> Figures:
        """From (arrival, finish, output tokens) per request, on one clock."""
        if not requests:
            raise ValueError("Figures.of needs at least one request")
        start = min(a for a, _, _ in requests)
        duration = max(f for _, f, _ in requests) - start
        tokens = sum(n for _, _, n in requests)
        rate = (lambda x: x / duration if duration > 0 else math.nan)
        return Figures(num_requests=len(requests), output_tokens=tokens, duration_s=duration,
                       output_tok_per_s=rate(tokens), mean_latency_s=sum(f - a for a, f, _ in requests) / len(requests),
                       requests_per_s=rate(len(requests)))


@dataclass(frozen=True, slots=True, kw_only=True)
class Served:
    """One workload as the engine served it."""

    figures: Figures
    arrivals: tuple[float, ...]  # when the loop could take each request: seconds after the first, workload order
    samples: tuple[StepSample, ...]  # every step the loop ran, timed as the simulator charges it
    wall_s: float  # first submission to last result
    arrival_lag_s: tuple[float, ...] = ()  # submitted minus intended arrival (Poisson)


def relative_error(predicted: float, measured: float) -> float:
    """(predicted - measured) / measured."""
    return (predicted - measured) / measured


def _params(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False)


def _served(outputs, wall_s: float, trace, lags: Sequence[float] = (), together: bool = False) -> Served:
    metrics = [o.metrics for o in outputs]
    bad = [o.request_id for o in outputs if o.outputs[0].finish_reason != "length"]
    if bad:
        raise RuntimeError(f"requests {bad[:5]} did not run to max_tokens (finish reasons "
                           f"{sorted({o.outputs[0].finish_reason for o in outputs})}); the engine failed them")
    t0 = min(m.arrival_time for m in metrics)
    figures = Figures.of([(m.arrival_time, m.finished_time, m.num_generated_tokens) for m in metrics])
    # Requests submitted together reach the loop together, however long building each one took.
    arrivals = tuple(0.0 for _ in metrics) if together else tuple(m.arrival_time - t0 for m in metrics)
    return Served(figures=figures, arrivals=arrivals,
                  samples=tuple(charge_steps(trace)), wall_s=wall_s, arrival_lag_s=tuple(lags))


def serve_all_at_once(llm, work: Sequence[tuple[list[int], int]]) -> Served:
    """Submit every (prompt, max_tokens) at once through LLM.generate, as PERF.md's offline run does."""
    with llm.trace_steps() as trace:
        start = time.perf_counter()
        outputs = llm.generate([p for p, _ in work], [_params(n) for _, n in work], use_tqdm=False)
        wall = time.perf_counter() - start
    return _served(outputs, wall, trace, together=True)


def serve_at_arrivals(llm, work: Sequence[tuple[list[int], int]], arrivals: Sequence[float]) -> Served:
    """Submit each (prompt, max_tokens) with generate_async at its arrival time (seconds from now)."""
    order = sorted(range(len(work)), key=lambda i: arrivals[i])
    handles: dict[int, Any] = {}
    lags = [0.0] * len(work)
    with llm.trace_steps() as trace:
        start = time.monotonic()
        for i in order:
            delay = start + arrivals[i] - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            lags[i] = time.monotonic() - start - arrivals[i]
            prompt, max_tokens = work[i]
            handles[i] = llm.generate_async(prompt, _params(max_tokens))
        outputs = [handles[i].result() for i in range(len(work))]
        wall = time.monotonic() - start
    return _served(outputs, wall, trace, lags)


def sim_config(llm) -> SimConfig:
    """The simulator's view of a built LLM: its limits, scheduler settings, KV pool and overlap flag."""
    ec = llm.executor_config
    pool = llm.scheduler_state.pool
    return SimConfig(limits=ec.limits, scheduler=ec.scheduler, num_pages=pool.num_pages,
                     enable_prefix_cache=pool.enable_prefix_cache, overlap=ec.overlap)


def compare(served: Served, work: Sequence[tuple[list[int], int]], cfg: SimConfig, cost: CostModel,
            tolerance: float) -> dict[str, Any]:
    """Simulate the served requests (arriving when the engine got them) and compare the figures."""
    requests = [SimRequest(request_id=i, arrival_time=a, prompt_len=len(p), output_len=n)
                for i, ((p, n), a) in enumerate(zip(work, served.arrivals))]
    started = time.perf_counter()
    result = simulate(requests, cfg, cost)
    sim = Figures.of([(r.arrival_time, r.finish_time, r.num_output_tokens) for r in result.requests])
    engine = served.figures
    errors = {m: relative_error(getattr(sim, m), getattr(engine, m)) for m in METRICS}
    busy = sum(s.seconds for s in served.samples)
    replayed = sum(cost.step_time(s.shape) for s in served.samples)
    # A step costs at least its host work, even where (synchronous launch) it was charged to the step before.
    step_errors = sorted(abs(relative_error(cost.step_time(s.shape), max(s.seconds, s.host))) for s in served.samples)
    sim_steps = [s for s in result.steps if s.num_seqs]
    return {
        "engine": dataclasses.asdict(engine),
        "sim": dataclasses.asdict(sim),
        "relative_error": errors,
        "pass": {m: abs(e) <= tolerance for m, e in errors.items()},
        "diagnostics": {
            "engine_steps": len(served.samples),
            "sim_steps": len(sim_steps),
            "engine_busy_s": busy,
            "sim_busy_s": sum(s.duration for s in sim_steps),
            # The cost model alone: the engine's own batches, timed by the model instead of the clock.
            "cost_model_on_engine_steps_s": replayed,
            "cost_model_on_engine_steps_error": relative_error(replayed, busy) if busy else None,
            "step_abs_error_p50": step_errors[len(step_errors) // 2] if step_errors else None,
            "step_abs_error_p90": step_errors[int(0.9 * (len(step_errors) - 1))] if step_errors else None,
            "engine_mean_decode_batch": (sum(s.shape.decode_seqs for s in served.samples) / len(served.samples)
                                         if served.samples else None),
            "sim_mean_decode_batch": sum(s.decode_seqs for s in sim_steps) / len(sim_steps) if sim_steps else None,
            "sim_preemptions": sum(s.preempted for s in result.steps),
            "engine_wall_s": served.wall_s,
            "arrival_lag_ms_mean": 1e3 * sum(served.arrival_lag_s) / len(served.arrival_lag_s)
            if served.arrival_lag_s else None,
            "arrival_lag_ms_max": 1e3 * max(served.arrival_lag_s) if served.arrival_lag_s else None,
            "simulate_s": time.perf_counter() - started,
        },
    }


def _fresh_tokens(work: Sequence[tuple[list[int], int]], vocab: int, seed: int) -> list[tuple[list[int], int]]:
    """The same lengths with other random tokens (a warm-up that leaves no prefix-cache hits behind)."""
    rng = random.Random(seed)
    return [([rng.randrange(vocab) for _ in p], n) for p, n in work]


def validate(llm, *, model: str, num_requests: int, lengths: tuple[int, int], poisson_requests: int,
             load: float = 0.7, seed: int = 0, warmup: bool = True, tolerance: float = 0.10,
             grid: dict[str, Any] | None = None, log: Callable[[str], None] | None = None
             ) -> tuple[dict[str, Any], CostModel, dict[str, list[dict[str, float]]]]:
    """Profile a built, idle LLM, serve and simulate both workloads: (report, cost model, served steps)."""
    if not (isinstance(load, (int, float)) and 0 < load < 1):
        raise ValueError(f"load must be a fraction of the measured capacity in (0, 1), got {load!r}")
    if not (isinstance(tolerance, (int, float)) and tolerance > 0):
        raise ValueError(f"tolerance must be a relative error > 0, got {tolerance!r}")
    for name, n in (("num_requests", num_requests), ("poisson_requests", poisson_requests)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {n!r}")
    log = log or (lambda msg: None)
    timings: dict[str, float] = {}
    vocab = llm.config.vocab_size

    started = time.perf_counter()
    cost = profile_llm(llm, seed=seed, log=log, meta={"model": model}, **(grid or {}))
    timings["profile_s"] = time.perf_counter() - started
    log(f"cost model: {describe(cost)}")

    offline = offline_workload(vocab, num_requests, lengths, seed=seed)
    started = time.perf_counter()
    if warmup:
        serve_all_at_once(llm, _fresh_tokens(offline, vocab, seed + 1))
    served_offline = serve_all_at_once(llm, offline)
    timings["offline_s"] = time.perf_counter() - started
    capacity = served_offline.figures.requests_per_s
    log(f"offline: {served_offline.figures.output_tok_per_s:,.0f} output tok/s, "
        f"{served_offline.figures.mean_latency_s:.3f} s mean latency, {capacity:.2f} requests/s")

    rate = load * capacity
    arrivals = poisson(poisson_requests, rate, prompt_len=lengths, output_len=lengths, seed=seed)
    rng = random.Random(seed + 2)
    work_poisson = [([rng.randrange(vocab) for _ in range(r.prompt_len)], r.output_len) for r in arrivals]
    started = time.perf_counter()
    served_poisson = serve_at_arrivals(llm, work_poisson, [r.arrival_time for r in arrivals])
    timings["poisson_s"] = time.perf_counter() - started
    log(f"poisson at {rate:.2f} requests/s: {served_poisson.figures.output_tok_per_s:,.0f} output tok/s, "
        f"{served_poisson.figures.mean_latency_s:.3f} s mean latency")

    cfg = sim_config(llm)
    started = time.perf_counter()
    workloads = {
        "offline": {"definition": {"arrivals": "all at once", "num_requests": num_requests,
                                   "lengths": list(lengths), "seed": seed, "warmup_run": warmup},
                    **compare(served_offline, offline, cfg, cost, tolerance)},
        "poisson": {"definition": {"arrivals": "poisson", "num_requests": poisson_requests, "load": load,
                                   "rate_per_s": rate, "lengths": list(lengths), "seed": seed},
                    **compare(served_poisson, work_poisson, cfg, cost, tolerance)},
    }
    timings["simulate_s"] = time.perf_counter() - started
    lim = cfg.limits
    policy = cfg.scheduler.capacity_scheduler_policy
    report = {
        "format": FORMAT,
        "version": 1,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(llm.device),
        "torch": torch.__version__,
        "commit": _commit(),
        "model": model,
        "engine": {"device": str(llm.device), "max_batch_size": lim.max_batch_size,
                   "max_num_tokens": lim.max_num_tokens, "max_seq_len": lim.max_seq_len,
                   "page_size": lim.page_size, "num_pages": cfg.num_pages,
                   "kv_tokens": (cfg.num_pages - 1) * lim.page_size,
                   "policy": policy if isinstance(policy, str) else getattr(policy, "__name__", repr(policy)),
                   "chunked_prefill": cfg.scheduler.enable_chunked_prefill,
                   "prefix_cache": cfg.enable_prefix_cache, "overlap": cfg.overlap,
                   "cuda_graph_buckets": llm.buckets is not None},
        "cost_model": {k: v for k, v in cost.to_json().items() if k != "points"},
        "tolerance": tolerance,
        "workloads": workloads,
        "passed": all(ok for w in workloads.values() for ok in w["pass"].values()),
        "timings_s": timings,
    }
    steps = {"offline": [s.row() for s in served_offline.samples],
             "poisson": [s.row() for s in served_poisson.samples]}
    return report, cost, steps


def machine(device: torch.device) -> dict[str, Any]:
    """Where the run happened."""
    return {"hostname": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def _commit() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip()


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The comparison as an aligned table."""
    lines = [f"{'workload':<9} {'metric':<17} {'engine':>12} {'sim':>12} {'error':>8}  result"]
    for name, w in report["workloads"].items():
        for m in METRICS:
            e = w["relative_error"][m]
            lines.append(f"{name:<9} {m:<17} {w['engine'][m]:>12.4g} {w['sim'][m]:>12.4g} {e:>+8.1%}  "
                         f"{'pass' if w['pass'][m] else 'FAIL'}")
        d = w["diagnostics"]
        lines.append(f"{'':<9} steps engine/sim {d['engine_steps']}/{d['sim_steps']}, busy {d['engine_busy_s']:.3f}/"
                     f"{d['sim_busy_s']:.3f} s, cost model on the engine's own steps "
                     f"{d['cost_model_on_engine_steps_error']:+.1%}")
    verdict = "PASS" if report["passed"] else "FAIL"
    lines.append(f"{verdict}: every figure within {report['tolerance']:.0%}" if report["passed"]
                 else f"{verdict}: some figure is off by more than {report['tolerance']:.0%}")
    return lines


# Defaults: PERF.md's workload and a grid that spans it on a GPU; a quick, smaller check on a CPU.
GPU_DEFAULTS = {"num_requests": 256, "lengths": "100:1024",
                "batch_sizes": "1,8,32,64,128,256", "context_lens": "128,1024,1900",
                "prefill_lens": "128,512,1024,2048,4096,8192"}
CPU_DEFAULTS = {"num_requests": 48, "lengths": "16:160",
                "batch_sizes": "1,4,16,48", "context_lens": "32,256",
                "prefill_lens": "32,256,1024"}


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise ValueError(f"{flag} must be comma-separated integers >= 1, got {text!r}")
    return values


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sim_validation", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tinyllama-1.1b", help="preset (dummy weights) or checkpoint dir")
    p.add_argument("--out", required=True, help="folder for sim_validation.json, profile.json, served_steps.json")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--num-requests", type=int, default=None, help="offline requests (default 256 on GPU, 48 on CPU)")
    p.add_argument("--lengths", default=None, help="LOW:HIGH prompt and output lengths (default 100:1024 on GPU)")
    p.add_argument("--poisson-requests", type=int, default=None, help="default: --num-requests")
    p.add_argument("--load", type=float, default=0.7, help="Poisson rate as a fraction of the offline request rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerance", type=float, default=0.10, help="largest relative error that passes")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed offline warm-up run")
    p.add_argument("--batch-sizes", default=None, help="profile: decode batch sizes")
    p.add_argument("--context-lens", default=None, help="profile: decode context lengths")
    p.add_argument("--prefill-lens", default=None, help="profile: prompt tokens of one prefill step")
    p.add_argument("--decode-steps", type=int, default=8, help="profile: timed decode steps per shape")
    p.add_argument("--disable-overlap-scheduler", action="store_true", help="validate the engine without overlap")
    p.add_argument("--prefix-cache", action="store_true",
                   help="keep KV block reuse on; off by default: the workloads share no prefixes, and the pages "
                        "earlier phases leave cached make the engine's later steps slower")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the validation; exit code 0 when every figure is within the tolerance, 1 when not."""
    from llmfx.llm import LLM

    args = parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    pick = (lambda name: getattr(args, name) if getattr(args, name) is not None else defaults[name])
    lengths = parse_length(pick("lengths"), "--lengths")
    if isinstance(lengths, int):
        lengths = (lengths, lengths)
    num_requests = pick("num_requests")
    grid = {"batch_sizes": _ints(pick("batch_sizes"), "--batch-sizes"),
            "context_lens": _ints(pick("context_lens"), "--context-lens"),
            "prefill_lens": _ints(pick("prefill_lens"), "--prefill-lens"), "decode_steps": args.decode_steps}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True))
    started = time.perf_counter()
    # bench.offline's engine: the longest prompt plus the longest output, with room to spare.
    with LLM(args.model, dtype=args.dtype, device=device, load_format="dummy", skip_tokenizer_init=True,
             max_seq_len=2 * lengths[1] + 64, disable_overlap_scheduler=args.disable_overlap_scheduler,
             kv_cache_config=KvCacheConfig(enable_block_reuse=args.prefix_cache)) as llm:
        build_s = time.perf_counter() - started
        log(f"engine built in {build_s:.1f} s ({', '.join(f'{k} {v:.1f} s' for k, v in llm.startup_seconds.items())})")
        report, cost, steps = validate(
            llm, model=args.model, num_requests=num_requests, lengths=lengths,
            poisson_requests=args.poisson_requests or num_requests, load=args.load, seed=args.seed,
            warmup=not args.no_warmup, tolerance=args.tolerance, grid=grid, log=log)
    report["timings_s"] = {"build_s": build_s, **report["timings_s"], "total_s": time.perf_counter() - started}
    report["startup_s"] = dict(llm.startup_seconds)
    save_cost_model(cost, out / "profile.json")
    (out / "served_steps.json").write_text(json.dumps(steps) + "\n")
    (out / "sim_validation.json").write_text(json.dumps(report, indent=1) + "\n")
    for line in summary_lines(report):
        print(line)
    print(f"wrote {out / 'sim_validation.json'}, {out / 'profile.json'}, {out / 'served_steps.json'}")
    return 0 if report["passed"] else 1
