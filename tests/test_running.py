"""The columnar running table: a value that reads back as the records it was built from, through every update."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmfx.batch import BatchColumns
from llmfx.kv_cache import new_page_pool, num_available, pages_for_tokens
from llmfx.running import EMPTY_RUNNING, Running
from llmfx.sampling_params import SamplingParams
from llmfx.scheduler import (
    Beam,
    Plan,
    Request,
    ScheduledBatch,
    ScheduledSeq,
    SchedulerConfig,
    SchedulerLimits,
    SchedulerState,
    SequenceState,
    new_scheduler_state,
    _plan_running,
    postprocess,
    schedule,
)
from llmfx.testing.strategies import SchedulerMachine, fake_candidates, requests

small = st.integers(0, 50)


@st.composite
def sequences(draw, seq_id: int) -> SequenceState:
    request = draw(requests(request_id=seq_id))
    out = tuple(draw(st.lists(small, max_size=6)))
    pages = tuple(draw(st.lists(st.integers(1, 40), max_size=5)))
    beam = draw(st.none() | st.builds(Beam, seq_id=st.just(seq_id), cumulative_logprob=st.floats(-5, 0)))
    return SequenceState(request=request, output_token_ids=out, num_computed_tokens=draw(small), pages=pages,
                         num_inflight=draw(st.integers(0, 1)), beam=beam)


@st.composite
def tables(draw, max_size: int = 6) -> list[SequenceState]:
    n = draw(st.integers(0, max_size))
    return [draw(sequences(seq_id)) for seq_id in range(n)]


@given(tables())
def test_a_table_reads_back_as_its_records(seqs):
    table = Running.of(seqs)
    assert len(table) == len(seqs) and list(table) == seqs and table == Running.of(seqs)
    assert table.ids.tolist() == [s.request_id for s in seqs]
    assert [table.by_id()[s.request_id] for s in seqs] == seqs
    for name in ("ids", "computed", "inflight", "num_out", "num_pages", "last"):
        with pytest.raises(ValueError):  # read-only: an update makes a new table
            getattr(table, name)[:1] = 7
    if seqs:
        assert table[-1] == seqs[-1] and table[1:] == tuple(seqs[1:])


@given(tables(), tables(), st.data())
def test_take_without_and_concatenation_act_on_rows_as_on_lists(a, b, data):
    table = Running.of(a)
    rows = data.draw(st.lists(st.integers(0, max(len(a) - 1, 0)), max_size=len(a), unique=True)) if a else []
    assert list(table.take(rows)) == [a[i] for i in rows]
    assert list(table.without(rows)) == [s for i, s in enumerate(a) if i not in rows]
    other = Running.of([SequenceState(request=s.request, output_token_ids=s.output_token_ids, beam=None) for s in b])
    assert list(table + other) == a + list(other)
    assert (table + EMPTY_RUNNING) is table and list(EMPTY_RUNNING + table) == a
    assert table + () == tuple(a) and () + table == tuple(a)  # with a tuple of records, a tuple


@given(tables(max_size=4), st.data())
def test_replace_keeps_the_rows_and_changes_only_the_columns_given(seqs, data):
    table = Running.of(seqs)
    computed = np.array([data.draw(small) for _ in seqs], dtype=np.int64)
    changed = table.replace(computed=computed)
    assert [s.num_computed_tokens for s in changed] == computed.tolist()
    assert [(s.request, s.output_token_ids, s.pages, s.beam) for s in changed] == [
        (s.request, s.output_token_ids, s.pages, s.beam) for s in seqs]
    assert list(table) == seqs  # the old table is unchanged


def _steady_state(batch_size: int = 4, prompt_len: int = 5):
    limits = SchedulerLimits(max_batch_size=batch_size, max_num_tokens=64, max_seq_len=64, page_size=4)
    cfg = SchedulerConfig()
    params = SamplingParams(max_tokens=20, ignore_eos=True, detokenize=False)
    reqs = [Request(request_id=i, prompt_token_ids=tuple(range(1 + i, 1 + i + prompt_len)), params=params)
            for i in range(batch_size)]
    state, batch = schedule(new_scheduler_state(new_page_pool(64, 4)), reqs, limits, cfg)
    return state, batch, limits, cfg


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.integers(3, 40), min_size=4, max_size=4), min_size=1, max_size=4),
       st.lists(st.lists(st.integers(3, 40), min_size=4, max_size=4), min_size=1, max_size=4))
def test_two_histories_grown_from_one_state_keep_their_own_tokens(left, right):
    """Output lists are shared by a table's versions: a second history from an old state must not see the first."""
    start, batch, limits, cfg = _steady_state()

    def run(tokens_per_step):
        state, b = start, batch
        for tokens in tokens_per_step:
            state, _ = postprocess(state, b, dict(enumerate(tokens)), limits)
            state, b = schedule(state, (), limits, cfg)
        return state

    first = run(left)
    snapshot = [s.output_token_ids for s in first.running]
    second = run(right)
    assert [tuple(s.output_token_ids) for s in first.running] == [tuple(o) for o in snapshot]
    assert [tuple(s.output_token_ids) for s in first.running] == [tuple(t[i] for t in left) for i in range(4)]
    assert [tuple(s.output_token_ids) for s in second.running] == [tuple(t[i] for t in right) for i in range(4)]
    assert [s.output_token_ids for s in run(left).running] == snapshot  # replaying gives the same table


def test_a_batch_made_from_columns_reads_back_as_records_and_back():
    columns = BatchColumns(ids=np.array([7, 3]), starts=np.array([0, 9]), counts=np.array([3, 1]),
                           samples=np.array([False, True]), tokens=np.array([5, 6, 8, -1]), pages=((1,), (2, 3, 4)))
    batch = ScheduledBatch(columns=columns)
    expected = (ScheduledSeq(request_id=7, token_ids=(5, 6, 8), start_pos=0, pages=(1,), sample=False),
                ScheduledSeq(request_id=3, token_ids=(-1,), start_pos=9, pages=(2, 3, 4), sample=True))
    assert batch.seqs == expected and batch.num_seqs == 2 and batch.num_tokens == 4
    again = ScheduledBatch(expected).columns
    for name in ("ids", "starts", "counts", "samples", "tokens"):
        assert getattr(again, name).tolist() == getattr(columns, name).tolist(), name
    assert again.pages == columns.pages and ScheduledBatch(expected) == batch
    with pytest.raises(ValueError, match="seqs or columns"):
        ScheduledBatch(expected, columns=columns)


# --- the vectorized running plan against the per-sequence loop it replaced ---


def reference_plan(state, limits):
    """_plan_running's decisions, one sequence at a time, as the record-based scheduler made them (5e05cfb)."""
    ps, budget, available = limits.page_size, limits.max_num_tokens, num_available(state.pool)
    copied: dict[int, int] = {}
    decodes, prefills = [], []
    num_decodes = 0
    for i, s in enumerate(state.running):
        outputs, params = len(s.output_token_ids), s.request.params
        num_tokens = len(s.request.prompt_token_ids) + outputs + s.num_inflight
        if s.num_inflight and (s.beam is not None or outputs + s.num_inflight >= params.max_tokens
                               or num_tokens >= limits.max_seq_len):
            continue
        left = num_tokens - s.num_computed_tokens
        if left > 1:
            prefills.append((i, s.num_computed_tokens, left))
            continue
        if left < 1:
            continue
        num_decodes += 1
        source = None
        if s.beam is not None and s.num_computed_tokens % ps:
            page = s.pages[-1]
            source = page if state.pool.refcounts[page] - copied.get(page, 0) > 1 else None
        need = 1 if s.num_computed_tokens == len(s.pages) * ps or source is not None else 0
        if need > available or budget == 0:
            continue
        if source is not None:
            copied[source] = copied.get(source, 0) + 1
        decodes.append((i, need, source is not None))
        budget, available = budget - 1, available - need
    stalled = len(decodes) < num_decodes and budget > 0
    planned = []
    for i, computed, left in prefills:
        num_pages = len(state.running[i].pages)
        n = min(left, budget, (num_pages + available) * ps - computed)
        if n <= 0:
            stalled |= budget > 0
            continue
        need = pages_for_tokens(computed + n, ps) - num_pages
        planned.append((i, n, need))
        budget, available = budget - n, available - need
    return decodes, planned, stalled


def admit_everyone(state, limits):
    """A greedy policy: admit every waiting request, so that running sequences starve for pages."""
    return Plan(admit=tuple(s.request_id for s in state.waiting))


class PlanMachine(SchedulerMachine):
    """The scheduler machine, checking before every step that the plan equals the reference's."""

    policy = admit_everyone

    def step_once(self, inbox=()):
        if self.limits is not None and len(self.state.running):
            plan = _plan_running(self.state, self.limits)
            decodes, prefills, stalled = reference_plan(self.state, self.limits)
            assert list(zip(plan.decodes.tolist(), plan.decode_pages.tolist(), plan.decode_copies.tolist())) == decodes
            assert plan.prefills == prefills and plan.stalled == stalled
            assert plan.new_pages == sum(n for _, n, _ in decodes) + sum(n for _, _, n in prefills)
        return super().step_once(inbox)


TestPlanMachine = PlanMachine.TestCase
TestPlanMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


class MaxUtilizationPlanMachine(PlanMachine):
    policy = "max_utilization"


TestMaxUtilizationPlanMachine = MaxUtilizationPlanMachine.TestCase
TestMaxUtilizationPlanMachine.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)


def test_a_beam_waiting_for_the_rest_of_its_group_has_no_token_in_flight():
    """A token budget of 1 runs one beam a step: it holds its candidates until its sibling has run too."""
    limits = SchedulerLimits(max_batch_size=4, max_num_tokens=1, max_seq_len=32, page_size=4)
    params = SamplingParams(use_beam_search=True, beam_width=2, n=2, temperature=0.0, max_tokens=6, ignore_eos=True,
                            detokenize=False)
    request = Request(request_id=0, prompt_token_ids=(1,), params=params, beam_ids=(0, 1))
    state, batch = schedule(new_scheduler_state(new_page_pool(32, 4)), [request], limits, SchedulerConfig())
    waited = 0
    for _ in range(6):
        seqs = state.running.by_id()
        candidates = {s.request_id: fake_candidates(request.prompt_token_ids + tuple(seqs[s.request_id].output_token_ids))
                      for s in batch.seqs if s.sample}
        state, _ = postprocess(state, batch, {}, limits, candidates)
        assert [s.num_inflight for s in state.running] == [0] * len(state.running)
        waited += any(s.beam.candidates is not None for s in state.running)
        state, batch = schedule(state, (), limits, SchedulerConfig())
    assert waited >= 2  # the case under test happened


@given(tables())
def test_a_state_built_by_hand_from_records_holds_them_as_a_table(seqs):
    state = SchedulerState(pool=new_page_pool(8, 4), running=tuple(seqs))
    assert isinstance(state.running, Running) and list(state.running) == seqs


def test_the_step_path_reads_host_arrays_only():
    """The scheduler's and staging's .tolist() calls are on these columns: numpy arrays in host memory, so none
    of them can wait for a device (tests/test_step_path_syncs.py catches tensor reads on the executor thread)."""
    state, batch, limits, cfg = _steady_state()
    state, _ = postprocess(state, batch, dict.fromkeys(range(4), 9), limits)
    state, batch = schedule(state, (), limits, cfg)
    columns = batch.columns
    assert all(type(getattr(columns, name)) is np.ndarray for name in ("ids", "starts", "counts", "samples", "tokens"))
    assert all(type(getattr(state.running, name)) is np.ndarray
               for name in ("ids", "prompt_lens", "max_tokens", "num_out", "computed", "inflight", "num_pages", "last"))
