"""benchmarks/served_trace.py's per-step summary of a chrome trace (the GPU runs the trace; this checks the
arithmetic on hand-made and generated events)."""

from __future__ import annotations

import runpy
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

TRACE = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "served_trace.py"), run_name="not_main")
step_spans = TRACE["step_spans"]


def kernel(name, ts, dur, correlation):
    return {"cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"correlation": correlation}}


def test_spans_group_kernels_by_their_launchs_step_and_count_overlaps_once():
    events = [kernel("a", 0, 10, 1), kernel("b", 5, 10, 1),  # overlapping (PDL): busy 15 of span 15
              kernel("c", 30, 5, 2),  # step 0's second launch (its sampler graph): a gap of 15
              kernel("d", 100, 4, 3), kernel("a", 110, 2, 3),  # step 1
              kernel("x", 0, 50, 99),  # a launch outside the steps
              {"cat": "ac2g", "name": "flow", "ts": 0}]  # no args: ignored
    spans = step_spans(events, {1: 0, 2: 0, 3: 1})
    assert spans[0] == {"span_us": 35, "busy_us": 20, "kernels": 3, "by_name": {"a": 10, "b": 10, "c": 5}}
    assert spans[1] == {"span_us": 12, "busy_us": 6, "kernels": 2, "by_name": {"d": 4, "a": 2}}


@given(st.lists(st.tuples(st.integers(0, 100), st.integers(1, 20)), min_size=1, max_size=12))
def test_busy_is_the_union_of_the_kernels_intervals(intervals):
    events = [kernel(f"k{i}", ts, dur, 7) for i, (ts, dur) in enumerate(intervals)]
    spans = step_spans(events, {7: 0})[0]
    covered = {t for ts, dur in intervals for t in range(ts, ts + dur)}  # unit cells of the union
    assert spans["busy_us"] == len(covered)
    assert spans["span_us"] == max(ts + dur for ts, dur in intervals) - min(ts for ts, _ in intervals)
    assert sum(spans["by_name"].values()) == sum(dur for _, dur in intervals)
