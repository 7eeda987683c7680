"""llmfx.sim.profile: the serving loop's trace becomes the step times the simulator charges."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from llmfx.executor import StepTiming, TracedBatch
from llmfx.scheduler import ScheduledBatch, ScheduledSeq
from llmfx.sim import BatchShape
from llmfx.sim.profile import charge_steps, shape_of


def _batch(n: int, launch_s: float) -> TracedBatch | None:
    """n decoding sequences at position 10, as a trace keeps them."""
    seqs = tuple(ScheduledSeq(request_id=i, token_ids=(1,), start_pos=10, pages=(1,), sample=True) for i in range(n))
    return TracedBatch.of(ScheduledBatch(seqs=seqs), launch_s) if n else None


def _trace(rows, overlap=True):
    """rows: (gap before start, length, waited_for_work, launched seqs, collected seqs or None); times accumulate.

    launch takes a quarter of an iteration, collect half of one that collects something. The batch
    collected is the one launched the iteration before (overlap) or in the same iteration.
    """
    trace, t, previous = [], 0.0, None
    for gap, length, waited, launched, collected in rows:
        start = t + gap
        t = start + length
        batch = _batch(launched, length / 4)
        done = (previous if overlap else batch) if collected else None
        trace.append(StepTiming(start=start, end=t, waited_for_work=waited, launched=batch, collected=done,
                                collect_s=length / 2 if done else 0.0))
        previous = batch
    return trace


def test_worked_by_hand_launch_after_idle_then_steady_steps():
    # idle -> launch 2 [1, 1.5); launch 1, collect the 2 [2, 5) after a 0.5 s delivery gap; collect the 1 [5.25, 7).
    trace = _trace([(1.0, 0.5, True, 2, False), (0.5, 3.0, False, 1, True), (0.25, 1.75, False, 0, True)])
    samples = charge_steps(trace)
    # The launch-only iteration's 0.5 s and the gap are charged to the batch collected next.
    assert [s.seconds for s in samples] == [0.5 + 0.5 + 3.0, 0.25 + 1.75]
    assert [s.shape for s in samples] == [BatchShape(decode_seqs=2, context_tokens=22),
                                          BatchShape(decode_seqs=1, context_tokens=11)]
    assert [s.collect_s for s in samples] == [1.5, 0.875]
    # Host work: the batch's own launch, plus its collecting iteration outside launch and collect.
    assert [s.host for s in samples] == [0.125 + (0.375 + 0.5 + 3.0 - 0.75 - 1.5), 0.75 + (2.0 - 0.875)]


rows = st.lists(st.tuples(st.floats(0.0, 5.0), st.floats(0.01, 5.0), st.booleans(), st.integers(0, 3),
                          st.booleans()), min_size=1, max_size=30)


def _valid(rows, overlap):
    """Make the rows a trace a loop could produce: only a launched, non-empty batch is ever collected."""
    out, previous = [], 0
    for gap, length, waited, launched, collected in rows:
        source = previous if overlap else launched
        out.append((gap, length, waited, launched, collected and source > 0))
        previous = launched
    return out


@given(rows, st.booleans())
def test_charged_time_is_the_busy_time_up_to_each_segments_last_collect(rows, overlap):
    trace = _trace(_valid(rows, overlap), overlap)
    samples = charge_steps(trace)
    collecting = [t for t in trace if t.collected is not None]
    assert [s.shape for s in samples] == [shape_of(t.collected) for t in collecting]
    assert [s.collect_s for s in samples] == [t.collect_s for t in collecting]
    assert all(s.host >= 0 for s in samples)
    # A segment starts at the trace's first iteration or after a wait for work; waits are never charged.
    busy, segment_start, last_collect_end = 0.0, None, None
    for t in trace:
        if segment_start is None or t.waited_for_work:
            if last_collect_end is not None:
                busy += last_collect_end - segment_start
            segment_start, last_collect_end = t.start, None
        if t.collected is not None:
            last_collect_end = t.end
    if last_collect_end is not None:
        busy += last_collect_end - segment_start
    assert math.isclose(sum(s.seconds for s in samples), busy, rel_tol=1e-9, abs_tol=1e-9)
