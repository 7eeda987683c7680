"""benchmarks/served_trace.py's per-step summary of a chrome trace (the GPU runs the trace; this checks the
arithmetic on hand-made and generated events)."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

TRACE = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "served_trace.py"), run_name="not_main")
step_spans = TRACE["step_spans"]
summarize = TRACE["summarize"]


def kernel(name, ts, dur, correlation):
    return {"cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"correlation": correlation}}


def test_spans_group_kernels_by_their_launchs_step_and_count_overlaps_once():
    events = [kernel("a", 0, 10, 1), kernel("b", 5, 10, 1),  # overlapping (PDL): busy 15 of span 15
              kernel("c", 30, 5, 2),  # step 0's second launch (its sampler graph): a gap of 15
              kernel("d", 100, 4, 3), kernel("a", 110, 2, 3),  # step 1
              kernel("x", 0, 50, 99),  # a launch outside the steps
              {"cat": "ac2g", "name": "flow", "ts": 0}]  # no args: ignored
    spans = step_spans(events, {1: 0, 2: 0, 3: 1})
    assert spans[0] == {"span_us": 35, "busy_us": 20, "kernels": 3, "by_name": {"a": 10, "b": 10, "c": 5},
                        "critical_by_name": {"a": 10, "b": 5, "c": 5}}  # b's first 5 us hide under a
    assert spans[1] == {"span_us": 12, "busy_us": 6, "kernels": 2, "by_name": {"d": 4, "a": 2},
                        "critical_by_name": {"d": 4, "a": 2}}


@given(st.lists(st.tuples(st.integers(0, 100), st.integers(1, 20)), min_size=1, max_size=12))
def test_busy_is_the_union_of_the_kernels_intervals(intervals):
    events = [kernel(f"k{i}", ts, dur, 7) for i, (ts, dur) in enumerate(intervals)]
    spans = step_spans(events, {7: 0})[0]
    covered = {t for ts, dur in intervals for t in range(ts, ts + dur)}  # unit cells of the union
    assert spans["busy_us"] == len(covered)
    assert spans["span_us"] == max(ts + dur for ts, dur in intervals) - min(ts for ts, _ in intervals)
    assert sum(spans["by_name"].values()) == sum(dur for _, dur in intervals)
    assert sum(spans["critical_by_name"].values()) == spans["busy_us"]
    assert all(0 < us <= spans["by_name"][name] for name, us in spans["critical_by_name"].items())


def launch(ts, correlation):
    return {"cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": ts, "args": {"correlation": correlation}}


def test_summarize_pairs_launches_into_steps_and_tables_the_mixed_and_the_extreme_decode_steps():
    events = [launch(0, 1), launch(1, 2), launch(50, 3), launch(51, 4), launch(90, 5), launch(91, 6),
              kernel("gemm", 2, 20, 1), kernel("sample", 22, 3, 2),  # step 0: mixed, 8 seqs
              kernel("gemm", 52, 10, 3), kernel("attn", 55, 10, 3), kernel("sample", 65, 1, 4),  # step 1: 4 seqs
              kernel("gemm", 92, 4, 5), kernel("sample", 96, 1, 6)]  # step 2: 1 seq
    rows, tables = summarize(events, [(8, 30), (4, 0), (1, 0)])
    assert [(r["step"], r["seqs"], r["prefill_tokens"], r["busy_us"]) for r in rows] == [
        (0, 8, 30, 23), (1, 4, 0, 14), (2, 1, 0, 5)]
    assert tables["mixed_step_kernels"] == [{"kernel": "gemm", "us_per_mixed_step": 20},
                                            {"kernel": "sample", "us_per_mixed_step": 3}]
    largest, smallest = tables["critical_path_largest_decode"], tables["critical_path_smallest_decode"]
    assert (largest["step"], largest["seqs"], smallest["step"], smallest["seqs"]) == (1, 4, 2, 1)
    assert largest["kernels"] == [{"kernel": "gemm", "critical_us": 10}, {"kernel": "attn", "critical_us": 3},
                                  {"kernel": "sample", "critical_us": 1}]


def test_summarize_refuses_a_trace_whose_launches_do_not_pair_with_the_steps():
    with pytest.raises(SystemExit, match="3 graph launches for 2 steps"):
        summarize([launch(0, 1), launch(1, 2), launch(2, 3)], [(1, 0), (1, 0)])
