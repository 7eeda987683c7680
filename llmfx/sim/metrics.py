"""Simulation results: per-request latencies, per-step timelines, summaries; pandas only if asked for."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestRecord:
    """One request's timeline (seconds of simulated time; None where it never happened)."""

    request_id: int
    arrival_time: float
    prompt_len: int
    output_len: int  # the target
    num_output_tokens: int
    first_scheduled_time: float | None
    first_token_time: float | None
    finish_time: float | None
    finish_reason: str | None
    num_preemptions: int

    @property
    def ttft(self) -> float | None:
        """Time to first token."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        if self.finish_time is None or self.first_token_time is None or self.num_output_tokens < 2:
            return None
        return (self.finish_time - self.first_token_time) / (self.num_output_tokens - 1)

    @property
    def e2e(self) -> float | None:
        """End-to-end latency: arrival to last token."""
        return None if self.finish_time is None else self.finish_time - self.arrival_time

    @property
    def queue_time(self) -> float | None:
        """Arrival to first scheduled."""
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    def row(self) -> dict[str, Any]:
        """A flat dict with the derived latencies."""
        return {**dataclasses.asdict(self), "ttft": self.ttft, "tpot": self.tpot, "e2e": self.e2e,
                "queue_time": self.queue_time}


@dataclass(frozen=True, slots=True, kw_only=True)
class StepRecord:
    """One simulated step and the queues after it."""

    step: int
    start_time: float
    duration: float
    num_seqs: int
    prefill_tokens: int
    decode_seqs: int
    context_tokens: int
    num_waiting: int
    num_running: int
    kv_pages_used: int  # held by running requests (cached-but-evictable pages count as free)
    kv_pages_cached: int  # evictable prefix-cache pages
    kv_usage: float  # kv_pages_used / usable pages
    preempted: int  # preemptions this step
    finished: int  # requests finished this step

    def row(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation; nan for no values."""
    xs = sorted(values)
    if not xs:
        return math.nan
    k = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _stats(name: str, values: Sequence[float]) -> dict[str, float]:
    mean = sum(values) / len(values) if values else math.nan
    return {f"{name}_mean": mean, f"{name}_p50": percentile(values, 50), f"{name}_p90": percentile(values, 90),
            f"{name}_p99": percentile(values, 99)}


@dataclass(frozen=True, slots=True, kw_only=True)
class SimResult:
    """What simulate() returns: request and step records, as lists of dicts or pandas DataFrames."""

    requests: tuple[RequestRecord, ...]
    steps: tuple[StepRecord, ...]
    policy: str
    batches: tuple = ()  # the ScheduledBatch of every step, when simulate(keep_batches=True)

    def request_rows(self) -> list[dict[str, Any]]:
        """One dict per request (ttft, tpot, e2e, queue_time included)."""
        return [r.row() for r in self.requests]

    def step_rows(self) -> list[dict[str, Any]]:
        """One dict per step (queue lengths, KV usage, preemptions over time)."""
        return [s.row() for s in self.steps]

    def to_pandas(self, table: str = "requests"):
        """A DataFrame of `table` ("requests" or "steps"); needs pandas."""
        if table not in ("requests", "steps"):
            raise ValueError(f"table must be 'requests' or 'steps', got {table!r}")
        try:
            import pandas as pd
        except ImportError as err:
            raise ImportError("SimResult.to_pandas needs pandas (pip install pandas); "
                              "request_rows()/step_rows() work without it") from err
        return pd.DataFrame(self.request_rows() if table == "requests" else self.step_rows())

    def summary(self) -> dict[str, Any]:
        """Throughput, latency percentiles (seconds), preemptions and KV usage of the whole run."""
        done = [r for r in self.requests if r.finish_time is not None]
        start = min((r.arrival_time for r in self.requests), default=0.0)
        end = max((r.finish_time for r in done), default=start)
        duration = end - start
        out_tokens = sum(r.num_output_tokens for r in self.requests)
        in_tokens = sum(r.prompt_len for r in done)
        rate = (lambda x: x / duration if duration > 0 else math.nan)
        return {
            "policy": self.policy,
            "num_requests": len(self.requests),
            "num_finished": sum(r.finish_reason in ("length", "stop") for r in self.requests),
            "num_aborted": sum(r.finish_reason == "abort" for r in self.requests),
            "num_steps": len(self.steps),
            "duration_s": duration,
            "output_tokens": out_tokens,
            "output_tok_per_s": rate(out_tokens),
            "total_tok_per_s": rate(out_tokens + in_tokens),
            "requests_per_s": rate(len(done)),
            **_stats("ttft_s", [r.ttft for r in self.requests if r.ttft is not None]),
            **_stats("tpot_s", [r.tpot for r in self.requests if r.tpot is not None]),
            **_stats("e2e_s", [r.e2e for r in done]),
            "preemptions": sum(s.preempted for s in self.steps),
            "max_kv_usage": max((s.kv_usage for s in self.steps), default=0.0),
            "mean_batch_size": (sum(s.num_seqs for s in self.steps) / len(self.steps)) if self.steps else 0.0,
            "max_waiting": max((s.num_waiting for s in self.steps), default=0),
        }
