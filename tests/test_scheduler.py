"""Specifications of the pure scheduler, checked against a fake model whose tokens depend only on position."""

from __future__ import annotations

import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from llmfx.kv_cache import allocate, new_page_pool, num_available, register_pages, release
from llmfx.sampling_params import SamplingParams
from llmfx.sequence import PLACEHOLDER
from llmfx.scheduler import (
    Plan,
    Request,
    SchedulerConfig,
    SchedulerLimits,
    SchedulerState,
    SequenceState,
    TokenPrefix,
    abort,
    has_work,
    new_scheduler_state,
    one_token,
    postprocess,
    schedule,
    token_slice,
    worst_case_pages,
)

VOCAB = 13
EOS = 0


def check_pool(pool) -> None:
    """Every page but the null page is exactly one of free, held or evictable."""
    free, held, evictable = set(pool.free), set(pool.refcounts), set(pool.evictable)
    assert len(free) == len(pool.free) and not (free & held) and not (free & evictable) and not (held & evictable)
    assert free | held | evictable == set(range(1, pool.num_pages))
    assert all(c >= 1 for c in pool.refcounts.values())
    assert set(pool.canonical) == set(pool.cached.values())  # the pages a release keeps without reading the maps


def pool_contents(pool) -> tuple:
    """A plain-data copy of everything a pool holds, to check later that it has not changed."""
    return (list(pool.free), dict(pool.refcounts), list(pool.evictable), dict(pool.page_keys), dict(pool.cached),
            dict(pool.canonical))


def fake_token(request_id: int, pos: int) -> int:
    """The fake model: the token sampled after `pos` tokens depends on nothing else."""
    return (request_id * 31 + pos) % VOCAB


def req(rid: int, prompt, **params) -> Request:
    return Request(
        request_id=rid,
        prompt_token_ids=tuple(prompt),
        params=SamplingParams(**params),
        eos_token_ids=frozenset({EOS}),
    )


def limits(**kw) -> SchedulerLimits:
    base = dict(max_batch_size=8, max_num_tokens=64, max_seq_len=64, page_size=2)
    return SchedulerLimits(**(base | kw))


def state_for(lim: SchedulerLimits, num_pages: int = 64, reuse: bool = True) -> SchedulerState:
    return new_scheduler_state(new_page_pool(num_pages, lim.page_size, reuse))


def reference(r: Request, lim: SchedulerLimits) -> tuple[tuple[int, ...], str, int | None]:
    """Output tokens, finish_reason and stop_reason of a request run alone with the fake model."""
    p, out = r.params, []
    n = len(r.prompt_token_ids)
    while True:
        t = fake_token(r.request_id, n + len(out))
        out.append(t)
        if len(out) >= p.min_tokens:
            if not p.ignore_eos and t in r.eos_token_ids:
                return tuple(out), "stop", None
            if t in p.stop_token_ids:
                return tuple(out), "stop", t
        if len(out) >= p.max_tokens or n + len(out) >= lim.max_seq_len:
            return tuple(out), "length", None


class Driver:
    """Runs schedule/postprocess with the fake model and checks every step's invariants, including KV contents."""

    def __init__(self, lim, cfg, num_pages, reuse=True):
        self.lim, self.cfg = lim, cfg
        self.state = state_for(lim, num_pages, reuse)
        self.tokens: dict[int, list[int]] = {}  # rid -> prompt + outputs
        self.outputs: dict[int, list[int]] = {}
        self.finished: dict[int, tuple[str, int | None]] = {}
        self.kv: dict[tuple[int, int], int] = {}  # (page, offset) -> token whose KV it holds
        self.first_admitted: list[int] = []
        self.first_start_pos: dict[int, int] = {}
        self.preempted: list[int] = []

    def step(self, inbox=()):
        lim, ps = self.lim, self.lim.page_size
        for r in inbox:
            self.tokens[r.request_id] = list(r.prompt_token_ids)
            self.outputs[r.request_id] = []
        before, contents = self.state, pool_contents(self.state.pool)
        self.state, batch = schedule(self.state, inbox, lim, self.cfg)
        check_pool(self.state.pool)
        assert batch.num_tokens <= lim.max_num_tokens
        assert len(batch.seqs) <= lim.max_batch_size and len(self.state.running) <= lim.max_batch_size
        assert len({s.request_id for s in batch.seqs}) == len(batch.seqs)
        self.preempted += batch.preempted
        if self.cfg.capacity_scheduler_policy == "guaranteed_no_evict":
            assert batch.preempted == ()
            reserved = sum(worst_case_pages(s.request, lim) - len(s.pages) for s in self.state.running)
            assert reserved <= num_available(self.state.pool)
        written = set()
        for s in batch.seqs:
            toks, end = self.tokens[s.request_id], s.start_pos + len(s.token_ids)
            assert s.token_ids and tuple(toks[s.start_pos : end]) == s.token_ids
            assert s.sample == (end == len(toks))
            assert len(s.pages) == -(-end // ps) and 0 not in s.pages and len(set(s.pages)) == len(s.pages)
            for pos in range(s.start_pos):  # the cached prefix really holds this sequence's tokens
                assert self.kv[(s.pages[pos // ps], pos % ps)] == toks[pos]
            for pos in range(s.start_pos, end):
                page = s.pages[pos // ps]
                assert self.state.pool.refcounts[page] == 1, "writing into a shared page"
                assert (page, pos % ps) not in written
                written.add((page, pos % ps))
                self.kv[(page, pos % ps)] = toks[pos]
            if s.request_id not in self.first_start_pos:
                self.first_admitted.append(s.request_id)
                self.first_start_pos[s.request_id] = s.start_pos
        sampled = {s.request_id: fake_token(s.request_id, s.start_pos + len(s.token_ids)) for s in batch.seqs if s.sample}
        self.state, events = postprocess(self.state, batch, sampled, lim)
        check_pool(self.state.pool)
        # Policies try admissions on the pool and drop the result, and callers may keep old states.
        assert pool_contents(before.pool) == contents, "a step changed the state it was given"
        self.record(events)
        return batch, events

    def record(self, events):
        for e in events:
            assert e.request_id not in self.finished
            self.outputs[e.request_id] += e.new_token_ids
            self.tokens[e.request_id] += e.new_token_ids
            if e.finish_reason is not None:
                self.finished[e.request_id] = (e.finish_reason, e.stop_reason)

    def run(self, requests, per_step=2, max_steps=2000):
        pending = list(requests)
        for _ in range(max_steps):
            inbox, pending = tuple(pending[:per_step]), pending[per_step:]
            self.step(inbox)
            if not pending and not has_work(self.state):
                break
        assert not has_work(self.state), "requests did not finish within the step bound"
        assert not self.state.pool.refcounts, "finished requests still hold pages"


# --- configuration and admission checks ---


def test_unknown_policy_name_lists_the_allowed_names():
    with pytest.raises(ValueError, match="guaranteed_no_evict.*max_utilization"):
        SchedulerConfig(capacity_scheduler_policy="fastest")


def test_prompt_not_shorter_than_max_seq_len_is_rejected():
    lim = limits(max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len"):
        schedule(state_for(lim), (req(1, range(8)),), lim, SchedulerConfig())


def test_request_whose_worst_case_exceeds_the_pool_is_rejected():
    lim = limits(page_size=2)
    with pytest.raises(ValueError, match="pages"):
        schedule(state_for(lim, num_pages=4), (req(1, [1] * 4, max_tokens=4),), lim, SchedulerConfig())


def test_unchunked_prompt_over_max_num_tokens_is_rejected():
    lim = limits(max_num_tokens=4)
    with pytest.raises(ValueError, match="max_num_tokens"):
        schedule(state_for(lim), (req(1, [1] * 5),), lim, SchedulerConfig(enable_chunked_prefill=False))


def test_duplicate_request_id_is_rejected():
    lim = limits()
    state, _ = schedule(state_for(lim), (req(1, [1, 2]),), lim, SchedulerConfig())
    with pytest.raises(ValueError, match="request_id 1"):
        schedule(state, (req(1, [3]),), lim, SchedulerConfig())


# --- batching ---


def test_chunked_prefill_splits_a_long_prompt_under_the_token_budget():
    lim = limits(max_num_tokens=4)
    d = Driver(lim, SchedulerConfig(), 64)
    chunks = []
    for inbox in [(req(1, range(1, 11)),), (), ()]:
        batch, _ = d.step(inbox)
        chunks += [(s.start_pos, s.token_ids, s.sample) for s in batch.seqs]
    assert chunks == [(0, (1, 2, 3, 4), False), (4, (5, 6, 7, 8), False), (8, (9, 10), True)]


def test_without_chunking_a_prompt_runs_whole_and_waits_for_budget():
    lim = limits(max_num_tokens=6)
    d = Driver(lim, SchedulerConfig(enable_chunked_prefill=False), 64)
    batch, _ = d.step((req(1, [1] * 4, max_tokens=3), req(2, [2] * 4, max_tokens=3)))
    assert [(s.request_id, len(s.token_ids)) for s in batch.seqs] == [(1, 4)]
    batch, _ = d.step()
    assert [(s.request_id, len(s.token_ids)) for s in batch.seqs] == [(1, 1), (2, 4)]


def test_decodes_are_scheduled_before_prefill_chunks_and_batch_size_caps_running():
    lim = limits(max_num_tokens=5, max_batch_size=2)
    d = Driver(lim, SchedulerConfig(), 64)
    d.step((req(1, [1], max_tokens=9, ignore_eos=True),))
    batch, _ = d.step((req(2, [2] * 9, max_tokens=9), req(3, [3], max_tokens=9)))
    assert [(s.request_id, len(s.token_ids)) for s in batch.seqs] == [(1, 1), (2, 4)]
    batch, _ = d.step()
    assert [(s.request_id, len(s.token_ids)) for s in batch.seqs] == [(1, 1), (2, 4)]
    assert [s.request_id for s in d.state.waiting] == [3]


def test_guaranteed_no_evict_admits_strictly_fcfs_head_of_line():
    lim = limits(page_size=1, max_seq_len=64)
    d = Driver(lim, SchedulerConfig(), num_pages=13)  # 12 usable pages
    d.step((req(1, [1] * 2, max_tokens=6),))  # reserves 8
    batch, _ = d.step((req(2, [2] * 2, max_tokens=8), req(3, [3], max_tokens=1)))  # 2 needs 10: blocks 3
    assert [s.request_id for s in batch.seqs] == [1]
    assert [s.request_id for s in d.state.waiting] == [2, 3]
    d.run([])
    assert d.first_admitted == [1, 2, 3]


def test_max_utilization_preempts_the_newest_and_outputs_are_unchanged():
    lim = limits(page_size=1, max_seq_len=64)
    cfg = SchedulerConfig(capacity_scheduler_policy="max_utilization")
    d = Driver(lim, cfg, num_pages=11)
    rs = [req(i, [i + 1] * 2, max_tokens=6, ignore_eos=True) for i in (1, 2, 3)]
    d.step(tuple(rs))
    for _ in range(20):
        batch, _ = d.step()
        if batch.preempted:
            break
    assert batch.preempted == (3,)
    assert d.state.waiting[0].request_id == 3 and d.state.waiting[0].output_token_ids
    d.run([])
    assert d.state.num_preemptions >= 1
    for r in rs:
        assert tuple(d.outputs[r.request_id]) == reference(r, lim)[0]


def test_a_finished_prompt_is_a_prefix_hit_for_the_next_request():
    lim = limits(page_size=2)
    d = Driver(lim, SchedulerConfig(), 64)
    d.run([req(1, range(1, 8), max_tokens=1)])
    batch, _ = d.step((req(2, list(range(1, 8)) + [9], max_tokens=1),))
    (s,) = batch.seqs
    assert s.start_pos == 6 and s.token_ids == (7, 9)


def test_pages_filled_by_decode_are_registered_for_later_prompts():
    lim = limits(page_size=2)
    d = Driver(lim, SchedulerConfig(), 64)
    first = req(1, [1, 2, 3], max_tokens=3, ignore_eos=True)
    d.run([first])
    follow_up = tuple(d.tokens[1]) + (9,)  # a chat turn that resends the conversation so far
    batch, _ = d.step((req(2, follow_up, max_tokens=1),))
    (s,) = batch.seqs
    assert s.start_pos == 4  # pages [1, 2] from prefill and [3, out0] from the first decode; out2 had no KV


def test_custom_policy_function_can_be_plugged_in():
    def newest_first(state, lim):
        return Plan(admit=tuple(s.request_id for s in reversed(state.waiting)))

    lim = limits(max_batch_size=1)
    d = Driver(lim, SchedulerConfig(capacity_scheduler_policy=newest_first), 64)
    d.run([req(i, [i], max_tokens=2) for i in range(1, 5)], per_step=4)
    assert d.first_admitted == [4, 3, 2, 1]


def test_a_policy_that_never_preempts_cannot_starve_the_batch():
    def admit_all(state, lim):
        return Plan(admit=tuple(s.request_id for s in state.waiting))

    lim = limits(page_size=1)
    rs = [req(i, [i] * 3, max_tokens=8, ignore_eos=True) for i in range(1, 5)]
    d = Driver(lim, SchedulerConfig(capacity_scheduler_policy=admit_all), num_pages=13)
    d.run(rs, per_step=4)
    assert d.preempted  # the liveness guard stepped in
    assert all(tuple(d.outputs[r.request_id]) == reference(r, lim)[0] for r in rs)


def test_policy_naming_an_unknown_request_raises():
    lim = limits()
    cfg = SchedulerConfig(capacity_scheduler_policy=lambda state, lim: Plan(admit=(99,)))
    with pytest.raises(ValueError, match="99"):
        schedule(state_for(lim), (req(1, [1]),), lim, cfg)


def test_a_decode_step_allocates_no_more_memory_with_thousands_of_cached_pages():
    """The pool's maps are updated by path copying, not copied whole, so a step's cost ignores the cache size."""
    lim = limits(page_size=4, max_batch_size=8, max_seq_len=256)

    def step_bytes(cached_pages: int) -> int:
        pool = new_page_pool(8_000, lim.page_size)
        if cached_pages:  # distinct full pages, registered and released: the prefix cache holds them all
            pool, pages = allocate(pool, cached_pages)
            tokens = [100 + i for i in range(cached_pages * lim.page_size)]
            pool = release(register_pages(pool, [(tokens, pages)]), pages)
            assert len(pool.evictable) == cached_pages
        d = Driver(lim, SchedulerConfig(), 8_000)
        d.state = new_scheduler_state(pool)
        d.step(tuple(req(i, [i] * 7, max_tokens=200, ignore_eos=True) for i in range(1, 9)))
        for _ in range(4):
            d.step()
        worst = 0
        tracemalloc.start()
        try:
            for _ in range(lim.page_size):  # every phase of a page: a step allocates, registers or only writes
                start, _ = tracemalloc.get_traced_memory()
                tracemalloc.reset_peak()
                state, batch = schedule(d.state, (), lim, d.cfg)
                d.state, _ = postprocess(state, batch, {s.request_id: 5 for s in batch.seqs}, lim)
                worst = max(worst, tracemalloc.get_traced_memory()[1] - start)
        finally:
            tracemalloc.stop()
        return worst

    small, large = step_bytes(0), step_bytes(6_000)
    # Copying the cache's maps costs ~500 KB here; copying paths through a two levels deeper trie, ~10 KB.
    assert large - small < 64 * 1024, (small, large)



@given(prompt=st.lists(st.integers(0, 9), min_size=1, max_size=8), out=st.lists(st.integers(0, 9), max_size=5),
       inflight=st.integers(0, 1), data=st.data())
def test_a_token_prefix_slices_like_the_tokens_it_stands_for(prompt, out, inflight, data):
    seq = SequenceState(request=req(1, prompt), output_token_ids=tuple(out), num_inflight=inflight)
    end = data.draw(st.integers(0, seq.num_tokens))
    view, tokens = TokenPrefix(seq.request.prompt_token_ids, seq.output_token_ids, end), token_slice(seq, 0, end)
    start, stop = data.draw(st.integers(-10, 10)), data.draw(st.integers(-10, 10))
    assert len(view) == len(tokens) and view[start:stop] == tokens[start:stop] and tuple(view) == tokens
    if tokens:
        assert view[start % len(tokens)] == tokens[start % len(tokens)] and view[-1] == tokens[-1]


def test_a_token_prefix_output_slice_past_the_known_tokens_reads_placeholders():
    # Hypothesis found it once in many runs: the output-only fast path used to drop the in-flight token.
    view = TokenPrefix((0,), (0, 0, 0), 5)
    assert view[1:5] == (0, 0, 0, PLACEHOLDER) and view[4:5] == (PLACEHOLDER,)


@given(token=st.integers(-1, 2**20 - 1))
def test_one_token_is_the_one_tuple_shared_by_equal_tokens(token):
    t = one_token(token)
    assert t == (token,) and type(t) is tuple and one_token(int(str(token))) is t


@given(token=st.integers(-2**70, 2**70).filter(lambda t: not -1 <= t < 2**20))
def test_one_token_does_not_cache_tokens_outside_any_vocabulary(token):
    """The simulator's fake tokens are unique per request and position: caching them would grow without bound."""
    table = one_token.__self__
    size = len(table)
    assert one_token(token) == (token,) and len(table) == size


def test_decode_chunks_and_token_events_share_their_token_tuple():
    lim, cfg = limits(), SchedulerConfig()
    state, batch = schedule(state_for(lim), (req(1, [1, 2, 3], max_tokens=5),), lim, cfg)  # the whole prompt
    state, events = postprocess(state, batch, {1: 7}, lim)
    _, batch = schedule(state, (), lim, cfg)
    assert events[0].new_token_ids == (7,) and batch.seqs[0].token_ids is events[0].new_token_ids


# --- abort ---


def test_abort_frees_pages_of_running_and_drops_waiting():
    lim = limits(max_batch_size=1)
    d = Driver(lim, SchedulerConfig(), 64)
    d.step((req(1, [1] * 5), req(2, [2])))
    assert d.state.pool.refcounts
    state, events = abort(d.state, [1, 2, 77])
    assert not has_work(state) and not state.pool.refcounts
    assert num_available(state.pool) == 63
    assert {(e.request_id, e.finish_reason, e.new_token_ids) for e in events} == {(1, "abort", ()), (2, "abort", ())}
    _, events = abort(d.state, [1], reason="error")
    assert events[0].finish_reason == "error"
    with pytest.raises(ValueError, match="abort"):
        abort(d.state, [1], reason="oops")


def test_postprocess_ignores_a_request_aborted_after_scheduling():
    lim = limits()
    state, batch = schedule(state_for(lim), (req(1, [1]),), lim, SchedulerConfig())
    state, _ = abort(state, [1])
    state, events = postprocess(state, batch, {1: 5}, lim)
    assert events == () and not has_work(state)


# --- stop conditions, with chosen sampled tokens ---


def run_tokens(r: Request, tokens, lim=None):
    lim = lim or limits()
    state, events = state_for(lim), []
    state, batch = schedule(state, (r,), lim, SchedulerConfig())
    for t in tokens:
        state, ev = postprocess(state, batch, {r.request_id: t}, lim)
        events += ev
        if ev and ev[0].finish_reason:
            assert not state.running and not state.pool.refcounts
            break
        state, batch = schedule(state, (), lim, SchedulerConfig())
    out = tuple(t for e in events for t in e.new_token_ids)
    return out, events[-1].finish_reason, events[-1].stop_reason


def test_eos_stops_with_the_token_included_and_no_stop_reason():
    assert run_tokens(req(1, [1], max_tokens=9), [5, EOS, 6]) == ((5, EOS), "stop", None)


def test_eos_before_min_tokens_is_an_ordinary_token():
    assert run_tokens(req(1, [1], max_tokens=9, min_tokens=3), [EOS, 4, EOS, 7]) == ((EOS, 4, EOS), "stop", None)


def test_stop_token_id_is_the_stop_reason_and_respects_min_tokens():
    r = req(1, [1], max_tokens=9, min_tokens=2, stop_token_ids=(7,))
    assert run_tokens(r, [7, 7, 3]) == ((7, 7), "stop", 7)


def test_ignore_eos_runs_to_max_tokens():
    assert run_tokens(req(1, [1], max_tokens=3, ignore_eos=True), [EOS] * 5) == ((EOS,) * 3, "length", None)


def test_max_seq_len_ends_with_length():
    assert run_tokens(req(1, [1] * 5, max_tokens=9), [3] * 9, limits(max_seq_len=7)) == ((3, 3), "length", None)


# --- properties over random workloads ---

PREFIXES = ((), (1, 2, 3, 4, 5, 6), (7, 7, 8, 8, 9))


@st.composite
def workloads(draw):
    page_size = draw(st.integers(1, 4))
    max_seq_len = draw(st.integers(4, 40))
    chunked = draw(st.booleans())
    requests = []
    for rid in range(1, draw(st.integers(1, 7)) + 1):
        prompt = draw(st.sampled_from(PREFIXES)) + tuple(draw(st.lists(st.integers(1, VOCAB - 1), max_size=8)))
        prompt = (prompt or (1,))[: max_seq_len - 1]
        max_tokens = draw(st.integers(1, 12))
        params = dict(
            max_tokens=max_tokens,
            min_tokens=draw(st.integers(0, max_tokens)),
            stop_token_ids=tuple(draw(st.sets(st.integers(0, VOCAB - 1), max_size=2))),
            ignore_eos=draw(st.booleans()),
        )
        requests.append(req(rid, prompt, **params))
    longest = max(len(r.prompt_token_ids) for r in requests)
    max_num_tokens = draw(st.integers(1, 24))
    lim = SchedulerLimits(
        max_batch_size=draw(st.integers(1, 5)),
        max_num_tokens=max_num_tokens if chunked else max(max_num_tokens, longest),
        max_seq_len=max_seq_len,
        page_size=page_size,
    )
    worst = max(worst_case_pages(r, lim) for r in requests)
    num_pages = worst + 1 + draw(st.integers(0, 12))
    policy = draw(st.sampled_from(("guaranteed_no_evict", "max_utilization")))
    cfg = SchedulerConfig(capacity_scheduler_policy=policy, enable_chunked_prefill=chunked)
    return requests, lim, cfg, num_pages, draw(st.integers(1, 4))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(), st.booleans())
def test_every_request_finishes_with_the_reference_output(workload, reuse):
    requests, lim, cfg, num_pages, per_step = workload
    d = Driver(lim, cfg, num_pages, reuse)
    d.run(requests, per_step=per_step)
    assert d.first_admitted == [r.request_id for r in requests]  # both built-in policies admit FCFS
    for r in requests:
        out, finish, stop = reference(r, lim)
        assert (tuple(d.outputs[r.request_id]), *d.finished[r.request_id]) == (out, finish, stop)


def test_shared_prefixes_hit_the_cache_and_match_outputs_without_reuse():
    lim = limits(page_size=2, max_batch_size=2)
    shared = tuple(range(1, 11))
    requests = [req(i, shared + (i,), max_tokens=4, ignore_eos=True) for i in range(1, 7)]
    runs = {}
    for reuse in (True, False):
        d = Driver(lim, SchedulerConfig(), 64, reuse)
        d.run(requests, per_step=1)
        runs[reuse] = d
    assert runs[True].outputs == runs[False].outputs
    assert sum(runs[True].first_start_pos.values()) > 0
    assert sum(runs[False].first_start_pos.values()) == 0


class SchedulerMachine(RuleBasedStateMachine):
    """Random arrivals, steps and aborts keep pages conserved and outputs a prefix of the reference."""

    def __init__(self):
        super().__init__()
        self.next_id = 1
        self.lim = None

    @precondition(lambda self: self.lim is None)
    @rule(
        page_size=st.integers(1, 3),
        num_pages=st.integers(20, 40),
        policy=st.sampled_from(("guaranteed_no_evict", "max_utilization")),
        max_num_tokens=st.integers(1, 12),
        max_batch_size=st.integers(1, 4),
        reuse=st.booleans(),
    )
    def setup(self, page_size, num_pages, policy, max_num_tokens, max_batch_size, reuse):
        self.lim = SchedulerLimits(
            max_batch_size=max_batch_size, max_num_tokens=max_num_tokens, max_seq_len=20, page_size=page_size
        )
        self.d = Driver(self.lim, SchedulerConfig(capacity_scheduler_policy=policy), num_pages, reuse)
        self.requests = {}

    @precondition(lambda self: self.lim is not None)
    @rule(prefix=st.sampled_from(PREFIXES), suffix=st.lists(st.integers(1, 12), max_size=5), max_tokens=st.integers(1, 8))
    def arrive(self, prefix, suffix, max_tokens):
        r = req(self.next_id, (prefix + tuple(suffix) or (1,))[:10], max_tokens=max_tokens)
        self.next_id += 1
        self.requests[r.request_id] = r
        self.d.step((r,))

    @precondition(lambda self: self.lim is not None)
    @rule(n=st.integers(1, 5))
    def steps(self, n):
        for _ in range(n):
            self.d.step()

    @precondition(lambda self: self.lim is not None and has_work(self.d.state))
    @rule(data=st.data())
    def abort_one(self, data):
        live = [s.request_id for s in self.d.state.waiting + self.d.state.running]
        rid = data.draw(st.sampled_from(live))
        self.d.state, events = abort(self.d.state, [rid])
        assert [(e.request_id, e.finish_reason) for e in events] == [(rid, "abort")]
        self.d.record(events)

    @invariant()
    def outputs_follow_the_reference(self):
        if self.lim is None:
            return
        check_pool(self.d.state.pool)
        held = sum(len(s.pages) for s in self.d.state.running)
        assert held >= len(self.d.state.pool.refcounts)
        for rid, out in self.d.outputs.items():
            ref = reference(self.requests[rid], self.lim)
            assert tuple(out) == ref[0][: len(out)]
            if rid in self.d.finished and self.d.finished[rid][0] != "abort":
                assert tuple(out) == ref[0]

    def teardown(self):
        if self.lim is not None:
            self.d.run([], max_steps=500)


TestSchedulerMachine = SchedulerMachine.TestCase
TestSchedulerMachine.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)
