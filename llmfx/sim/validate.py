"""The simulator against the engine it models, in one process on one engine build.

1. Build the LLM as serving does and profile it (`profile_llm`): the cost model.
2. Serve PERF.md's offline workload (all requests at once, after an untimed warm-up run on other
   tokens, so the timed run gets no prefix-cache hits): output tok/s and mean end-to-end latency
   from the RequestOutputs' metrics.
3. Serve Poisson arrivals at `load` x the offline run's request rate, each request submitted at
   its arrival time.
4. Simulate both with the fitted cost model and the engine's own limits, policy, KV pool and
   overlap setting, each request arriving when the engine received it, and compare.

`benchmarks/sim_validation.py` is the command line: it builds the LLM, calls `validate`, and writes
the report, the fitted cost model and the served steps.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import platform
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmfx.bench import offline_workload, source_commit
from llmfx.sampling_params import SamplingParams
from llmfx.sim.arrivals import SimRequest, poisson
from llmfx.sim.cli import describe
from llmfx.sim.cost_model import CostModel, StepSample
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
        "commit": source_commit(),
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
