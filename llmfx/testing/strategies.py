"""Hypothesis strategies for llmfx, and a state machine that property-tests a capacity policy.

Test your own policy in a few lines::

    from llmfx.testing.strategies import SchedulerMachine

    class MyPolicyMachine(SchedulerMachine):
        policy = my_policy  # policy(state, limits) -> Plan, or a built-in name

    TestMyPolicy = MyPolicyMachine.TestCase

The machine adds random requests (beam searches among them), steps the real schedule/postprocess
with a fake model whose token depends only on (request id, position) and whose beam candidates
depend only on the beam's tokens, aborts requests, and checks after every step: pages are conserved,
each page's refcount is the number of running sequences that hold it, no page is written while
shared, every position a step attends to holds the sequence's own token (page copies included),
token budget and batch rows hold, scheduled tokens are the sequence's own, outputs are a prefix of
the request's reference output and beam searches find the hypotheses of their search run alone (so
preemption changes nothing), and at teardown every request finishes and every page is free.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from llmfx.beam_search import BeamConfig, BeamRow, Candidates, Hypothesis, beam_step
from llmfx.kv_cache import KvCacheConfig, PagePool, new_page_pool
from llmfx.sampling_params import SamplingParams
from llmfx.scheduler import (
    POLICY_NAMES,
    Request,
    ScheduledBatch,
    SchedulerConfig,
    SchedulerLimits,
    SchedulerState,
    abort,
    has_work,
    new_scheduler_state,
    postprocess,
    rows_in_use,
    schedule,
    worst_case_pages,
)
from llmfx.sim.arrivals import SimRequest

VOCAB = 13  # small, so that stop tokens and EOS actually occur
EOS = 0


# --- strategies ---


def token_ids(*, vocab: int = VOCAB, min_size: int = 1, max_size: int = 16) -> st.SearchStrategy[tuple[int, ...]]:
    """Prompt token tuples (ids below vocab)."""
    return st.lists(st.integers(0, vocab - 1), min_size=min_size, max_size=max_size).map(tuple)


@st.composite
def sampling_params(draw, *, max_tokens: int = 16, vocab: int = VOCAB, greedy: bool | None = None) -> SamplingParams:
    """Valid SamplingParams: max_tokens in [1, max_tokens], min_tokens <= max_tokens, stop ids, EOS on or off."""
    n = draw(st.integers(1, max_tokens))
    greedy = draw(st.booleans()) if greedy is None else greedy
    return SamplingParams(
        max_tokens=n,
        min_tokens=draw(st.integers(0, n)),
        temperature=0.0 if greedy else draw(st.floats(0.1, 2.0)),
        seed=None if greedy else draw(st.integers(0, 2**31 - 1)),
        stop_token_ids=tuple(draw(st.sets(st.integers(0, vocab - 1), max_size=2))),
        ignore_eos=draw(st.booleans()),
        detokenize=False,
    )


@st.composite
def requests(draw, *, request_id: int | None = None, vocab: int = VOCAB, max_prompt_len: int = 16,
             max_tokens: int = 16, prefixes: tuple[tuple[int, ...], ...] = ((), (1, 2, 3, 4, 5, 6))) -> Request:
    """A Request; prompts often start with a shared prefix so that the prefix cache is exercised."""
    prompt = draw(st.sampled_from(prefixes)) + draw(token_ids(vocab=vocab, min_size=0, max_size=max_prompt_len))
    prompt = (prompt or (1,))[:max_prompt_len]
    rid = draw(st.integers(0, 2**31)) if request_id is None else request_id
    return Request(request_id=rid, prompt_token_ids=prompt, params=draw(sampling_params(max_tokens=max_tokens,
                                                                                         vocab=vocab)),
                   eos_token_ids=frozenset({EOS}))


@st.composite
def beam_requests(draw, *, request_id: int, vocab: int = VOCAB, max_prompt_len: int = 12, max_tokens: int = 8,
                  max_width: int = 3) -> Request:
    """A beam-search Request with beam ids request_id, request_id + 1, ...; prompts share prefixes as in requests."""
    plain = draw(requests(request_id=request_id, vocab=vocab, max_prompt_len=max_prompt_len, max_tokens=max_tokens))
    width = draw(st.integers(2, max_width))
    params = SamplingParams(
        max_tokens=plain.params.max_tokens, min_tokens=plain.params.min_tokens, temperature=0.0,
        stop_token_ids=plain.params.stop_token_ids, ignore_eos=plain.params.ignore_eos, detokenize=False,
        use_beam_search=True, beam_width=width, n=draw(st.integers(1, width)),
        length_penalty=draw(st.sampled_from([0.0, 1.0, 2.0, -0.5])),
        early_stopping=draw(st.sampled_from([True, False, "never"])))
    return Request(request_id=request_id, prompt_token_ids=plain.prompt_token_ids, params=params,
                   eos_token_ids=plain.eos_token_ids, beam_ids=tuple(range(request_id, request_id + width)))


def request_lists(*, min_size: int = 1, max_size: int = 8, **kw) -> st.SearchStrategy[list[Request]]:
    """Requests with ids 0..n-1."""
    return st.integers(min_size, max_size).flatmap(
        lambda n: st.tuples(*(requests(request_id=i, **kw) for i in range(n))).map(list))


@st.composite
def arrival_traces(draw, *, min_size: int = 1, max_size: int = 20, max_prompt_len: int = 64,
                   max_output_len: int = 32, max_gap: float = 1.0) -> list[SimRequest]:
    """Simulator requests with non-decreasing arrival times (bursts included: gaps may be 0)."""
    n = draw(st.integers(min_size, max_size))
    t, out = 0.0, []
    for i in range(n):
        t += draw(st.one_of(st.just(0.0), st.floats(0.0, max_gap, allow_nan=False)))
        out.append(SimRequest(request_id=i, arrival_time=t, prompt_len=draw(st.integers(1, max_prompt_len)),
                              output_len=draw(st.integers(1, max_output_len))))
    return out


@st.composite
def scheduler_limits(draw, *, max_seq_len: int | None = None) -> SchedulerLimits:
    """SchedulerLimits with small budgets, so that chunking and batch caps bind."""
    return SchedulerLimits(max_batch_size=draw(st.integers(1, 6)), max_num_tokens=draw(st.integers(1, 24)),
                           max_seq_len=max_seq_len or draw(st.integers(8, 48)), page_size=draw(st.integers(1, 4)))


def scheduler_configs(policies=POLICY_NAMES) -> st.SearchStrategy[SchedulerConfig]:
    """SchedulerConfig over the given policies, chunked prefill on or off."""
    return st.builds(SchedulerConfig, capacity_scheduler_policy=st.sampled_from(tuple(policies)),
                     enable_chunked_prefill=st.booleans())


def min_pages(reqs, limits: SchedulerLimits) -> int:
    """The smallest pool (null page included) that admits every request."""
    return max((worst_case_pages(r, limits) for r in reqs), default=1) + 1


def kv_cache_configs(reqs, limits: SchedulerLimits, *, max_extra_pages: int = 12) -> st.SearchStrategy[KvCacheConfig]:
    """KvCacheConfig sizes (max_tokens) that admit every request: from the tightest pool upward."""
    return st.integers(0, max_extra_pages).map(lambda extra: KvCacheConfig(
        max_tokens=(min_pages(reqs, limits) + extra) * limits.page_size, page_size=limits.page_size))


@dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    """Requests and an engine configuration that can serve all of them."""

    requests: tuple[Request, ...]
    limits: SchedulerLimits
    scheduler: SchedulerConfig
    num_pages: int  # null page included
    enable_prefix_cache: bool


@st.composite
def workloads(draw, *, policies=POLICY_NAMES, max_requests: int = 7) -> Workload:
    """Requests plus limits, scheduler config and pool size under which every request is admissible."""
    limits = draw(scheduler_limits())
    cfg = draw(scheduler_configs(policies))
    reqs = draw(request_lists(max_size=max_requests, max_prompt_len=limits.max_seq_len - 1, max_tokens=12))
    if not cfg.enable_chunked_prefill:
        longest = max(len(r.prompt_token_ids) for r in reqs)
        limits = SchedulerLimits(max_batch_size=limits.max_batch_size,
                                 max_num_tokens=max(limits.max_num_tokens, longest),
                                 max_seq_len=limits.max_seq_len, page_size=limits.page_size)
    kv = draw(kv_cache_configs(reqs, limits))
    return Workload(requests=tuple(reqs), limits=limits, scheduler=cfg, num_pages=kv.max_tokens // kv.page_size,
                    enable_prefix_cache=draw(st.booleans()))


# --- invariant checks ---


def check_pool(pool: PagePool) -> None:
    """Every page but the null page is exactly one of free, held or evictable."""
    free, held, evictable = set(pool.free), set(pool.refcounts), set(pool.evictable)
    assert len(free) == len(pool.free), "a page is free twice"
    assert not (free & held) and not (free & evictable) and not (held & evictable), "a page is in two states"
    assert free | held | evictable == set(range(1, pool.num_pages)), "pages were lost or invented"
    assert all(c >= 1 for c in pool.refcounts.values())


def check_page_references(state: SchedulerState) -> None:
    """Each held page's refcount is the number of running sequences (beams included) whose page list holds it."""
    held = Counter(p for s in state.running for p in s.pages)
    assert held == Counter(dict(state.pool.refcounts)), "page refcounts disagree with the sequences holding them"


def sequence_tokens(state: SchedulerState, tokens: dict[int, list[int]], seq_id: int) -> Sequence[int]:
    """A scheduled sequence's tokens: a request's from `tokens` (prompt + outputs), a beam's from the state."""
    beam = next((s for s in state.running if s.beam is not None and s.request_id == seq_id), None)
    return tokens[seq_id] if beam is None else beam.request.prompt_token_ids + beam.output_token_ids


def check_batch(state: SchedulerState, batch: ScheduledBatch, limits: SchedulerLimits,
                tokens: dict[int, list[int]]) -> None:
    """Budgets hold and each scheduled chunk is the sequence's own next tokens over pages it alone writes."""
    ps = limits.page_size
    assert batch.num_tokens <= limits.max_num_tokens, "token budget exceeded"
    assert len(batch.seqs) <= limits.max_batch_size and rows_in_use(state.running) <= limits.max_batch_size
    assert len({s.request_id for s in batch.seqs}) == len(batch.seqs), "a request scheduled twice in one step"
    for s in batch.seqs:
        toks, end = sequence_tokens(state, tokens, s.request_id), s.start_pos + len(s.token_ids)
        assert s.token_ids and tuple(toks[s.start_pos:end]) == s.token_ids, "scheduled tokens are not the sequence's"
        assert s.sample == (end == len(toks))
        assert len(s.pages) == -(-end // ps) and 0 not in s.pages and len(set(s.pages)) == len(s.pages)
        for pos in range(s.start_pos, end):
            assert state.pool.refcounts[s.pages[pos // ps]] == 1, "writing into a shared page"


def check_kv(kv: dict[tuple[int, int], int], state: SchedulerState, batch: ScheduledBatch, limits: SchedulerLimits,
             tokens: dict[int, list[int]]) -> None:
    """Run a batch on a model of the KV pool, (page, offset) -> token: page copies first, then every chunk
    checks that the positions it attends to hold its own tokens and writes its new ones."""
    ps = limits.page_size
    for src, dst in batch.page_copies:
        for offset in range(ps):
            kv.pop((dst, offset), None)
            if (src, offset) in kv:
                kv[(dst, offset)] = kv[(src, offset)]
    for s in batch.seqs:
        toks = sequence_tokens(state, tokens, s.request_id)
        for pos in range(s.start_pos):
            assert kv.get((s.pages[pos // ps], pos % ps)) == toks[pos], "the KV cache lost a sequence's token"
        for pos in range(s.start_pos, s.start_pos + len(s.token_ids)):
            kv[(s.pages[pos // ps], pos % ps)] = toks[pos]


def fake_token(request_id: int, position: int, vocab: int = VOCAB) -> int:
    """The fake model: the token sampled after `position` tokens depends on nothing else."""
    return (request_id * 31 + position) % vocab


def reference_output(r: Request, limits: SchedulerLimits, vocab: int = VOCAB) -> tuple[tuple[int, ...], str]:
    """Output tokens and finish_reason of r run alone with the fake model."""
    p, out, n = r.params, [], len(r.prompt_token_ids)
    while True:
        t = fake_token(r.request_id, n + len(out), vocab)
        out.append(t)
        if len(out) >= p.min_tokens and ((not p.ignore_eos and t in r.eos_token_ids) or t in p.stop_token_ids):
            return tuple(out), "stop"
        if len(out) >= p.max_tokens or n + len(out) >= limits.max_seq_len:
            return tuple(out), "length"


def fake_candidates(token_ids: Sequence[int], vocab: int = VOCAB) -> Candidates:
    """The fake model's beam candidates after token_ids: every token, best first, logprobs that depend only on them."""
    key = sum((i + 1) * t for i, t in enumerate(token_ids))
    logprobs = [-(((key * 7 + v * 13) % 23) + v / 100) / 4 for v in range(vocab)]
    ids = sorted(range(vocab), key=lambda v: -logprobs[v])
    return tuple(ids), tuple(logprobs[v] for v in ids)


def reference_beam_search(r: Request, limits: SchedulerLimits, vocab: int = VOCAB) -> tuple[Hypothesis, ...]:
    """The hypotheses of beam-search request r searched alone with the fake model."""
    p, prompt = r.params, r.prompt_token_ids
    max_new = min(p.max_tokens, limits.max_seq_len - len(prompt))
    cfg = BeamConfig(width=p.beam_width, length_penalty=p.length_penalty, early_stopping=p.early_stopping,
                     max_new_tokens=max_new)
    beams = [BeamRow(output_token_ids=(), cumulative_logprob=0.0, candidates=fake_candidates(prompt, vocab))]
    hypotheses: tuple[Hypothesis, ...] = ()
    while True:
        n = len(beams[0].output_token_ids) + 1

        def finish(t: int) -> tuple[str, int | None] | None:
            if n >= p.min_tokens and not p.ignore_eos and t in r.eos_token_ids:
                return "stop", None
            if n >= p.min_tokens and t in p.stop_token_ids:
                return "stop", t
            return ("length", None) if n >= max_new else None

        children, hypotheses, done = beam_step(beams, hypotheses, finish, cfg)
        if done:
            return hypotheses
        beams = [BeamRow(output_token_ids=beams[c.parent].output_token_ids + (c.token,),
                         cumulative_logprob=c.cumulative_logprob,
                         candidates=fake_candidates(prompt + beams[c.parent].output_token_ids + (c.token,), vocab))
                 for c in children]


# --- the state machine ---


class SchedulerMachine(RuleBasedStateMachine):
    """Random arrivals, steps and aborts over the real scheduler; subclass and set `policy` to test yours."""

    policy: ClassVar = "guaranteed_no_evict"  # a built-in name or policy(state, limits) -> Plan
    max_steps: ClassVar[int] = 2000  # teardown bound for "every request finishes"

    def __init__(self) -> None:
        super().__init__()
        self.limits: SchedulerLimits | None = None
        self.next_id = 0

    def check_step(self, batch: ScheduledBatch) -> None:
        """Override to add policy-specific checks; runs after every step."""

    def step_once(self, inbox=()) -> ScheduledBatch:
        """One schedule + fake model + postprocess, checking every invariant."""
        for r in inbox:
            self.tokens[r.request_id] = list(r.prompt_token_ids)
            self.requests[r.request_id] = r
        self.state, batch = schedule(self.state, inbox, self.limits, self.cfg)
        check_pool(self.state.pool)
        check_page_references(self.state)
        check_batch(self.state, batch, self.limits, self.tokens)
        check_kv(self.kv, self.state, batch, self.limits, self.tokens)
        self.check_step(batch)
        sampled = {s.request_id: fake_token(s.request_id, s.start_pos + len(s.token_ids))
                   for s in batch.seqs if s.sample}
        beams = {s.request_id: s for s in self.state.running if s.beam is not None}
        candidates = {s.request_id: fake_candidates(beams[s.request_id].request.prompt_token_ids
                                                    + beams[s.request_id].output_token_ids)
                      for s in batch.seqs if s.sample and s.request_id in beams}
        self.state, events = postprocess(self.state, batch, sampled, self.limits, candidates)
        # The step's batch is postprocessed at once: no sequence may still count a token in flight.
        assert all(s.num_inflight == 0 for s in self.state.running), "a sampled token was not accounted for"
        check_pool(self.state.pool)
        check_page_references(self.state)
        self._record(events)
        return batch

    def _record(self, events) -> None:
        for e in events:
            assert e.request_id not in self.finished, f"request {e.request_id} produced after finishing"
            self.tokens[e.request_id] += e.new_token_ids
            if e.hypotheses:
                self.hypotheses[e.request_id] = e.hypotheses
            if e.finish_reason is not None:
                self.finished[e.request_id] = e.finish_reason

    @precondition(lambda self: self.limits is None)
    @rule(limits=scheduler_limits(max_seq_len=24), extra_pages=st.integers(0, 20), reuse=st.booleans())
    def setup(self, limits: SchedulerLimits, extra_pages: int, reuse: bool) -> None:
        self.limits = limits
        self.cfg = SchedulerConfig(capacity_scheduler_policy=type(self).policy)
        self.state = new_scheduler_state(new_page_pool(-(-limits.max_seq_len // limits.page_size) + 1 + extra_pages,
                                                       limits.page_size, reuse))
        self.tokens: dict[int, list[int]] = {}
        self.requests: dict[int, Request] = {}
        self.finished: dict[int, str] = {}
        self.hypotheses: dict[int, tuple[Hypothesis, ...]] = {}
        self.kv: dict[tuple[int, int], int] = {}

    @precondition(lambda self: self.limits is not None)
    @rule(data=st.data())
    def arrive(self, data) -> None:
        r = data.draw(requests(request_id=self.next_id, max_prompt_len=12, max_tokens=10))
        self.next_id += 1
        self.step_once((r,))

    @precondition(lambda self: self.limits is not None)
    @rule(data=st.data())
    def arrive_beam_search(self, data) -> None:
        r = data.draw(beam_requests(request_id=self.next_id))
        if (r.params.beam_width > self.limits.max_batch_size
                or worst_case_pages(r, self.limits) > self.state.pool.num_pages - 1):
            return  # the engine would refuse it (validate_request)
        self.next_id += r.params.beam_width
        self.step_once((r,))

    @precondition(lambda self: self.limits is not None)
    @rule(n=st.integers(1, 5))
    def steps(self, n: int) -> None:
        for _ in range(n):
            self.step_once()

    @precondition(lambda self: self.limits is not None and has_work(self.state))
    @rule(data=st.data())
    def abort_one(self, data) -> None:
        live = list(dict.fromkeys(s.request.request_id for s in self.state.waiting + self.state.running))
        rid = data.draw(st.sampled_from(live))
        self.state, events = abort(self.state, [rid])
        assert [(e.request_id, e.finish_reason) for e in events] == [(rid, "abort")]
        check_pool(self.state.pool)
        self._record(events)

    @invariant()
    def outputs_follow_the_reference(self) -> None:
        if self.limits is None:
            return
        for rid, r in self.requests.items():
            if r.params.use_beam_search:
                if self.finished.get(rid, "abort") != "abort":
                    assert self.hypotheses[rid] == reference_beam_search(r, self.limits), f"beam search {rid} diverged"
                continue
            out = tuple(self.tokens[rid][len(r.prompt_token_ids):])
            ref, reason = reference_output(r, self.limits)
            assert out == ref[:len(out)], f"request {rid}: output diverged from its reference (preemption bug?)"
            if self.finished.get(rid, "abort") != "abort":
                assert (out, self.finished[rid]) == (ref, reason)

    def teardown(self) -> None:
        if self.limits is None:
            return
        for _ in range(self.max_steps):
            if not has_work(self.state):
                break
            self.step_once()
        assert not has_work(self.state), f"requests did not finish within {self.max_steps} steps"
        assert set(self.finished) == set(self.requests), "a request never finished"
        assert not self.state.pool.refcounts, "finished requests still hold pages"
        self.outputs_follow_the_reference()
