"""The pure scheduler: continuous batching, chunked prefill, prefix-cache admission, capacity policies, beam groups."""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple
from types import MappingProxyType

import numpy as np

from llmfx.batch import BatchColumns
from llmfx.beam_search import BeamConfig, BeamRow, Candidates, Hypothesis, beam_step
from llmfx.kv_cache import (
    PagePool,
    allocate,
    match_prefix,
    num_available,
    pages_for_tokens,
    register_pages,
    release,
    share,
)
from llmfx.records import positional_builder
from llmfx.running import EMPTY_RUNNING, Running
from llmfx.sampling_params import MAX_LOGPROBS
from llmfx.sequence import (  # noqa: F401  (re-exported: the scheduler's records are imported from here)
    PLACEHOLDER,
    Beam,
    Request,
    SequenceState,
    TokenPrefix,
    one_token,
    token_slice,
    tokens_between,
)

POLICY_NAMES = ("guaranteed_no_evict", "max_utilization")
FINISH_REASONS = ("stop", "length", "abort", "error")


@dataclass(frozen=True, slots=True, kw_only=True)
class SchedulerConfig:
    """User-facing scheduler settings (TensorRT-LLM names)."""

    capacity_scheduler_policy: str | Callable = "guaranteed_no_evict"
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        p = self.capacity_scheduler_policy
        if not callable(p) and p not in POLICY_NAMES:
            raise ValueError(
                f"SchedulerConfig.capacity_scheduler_policy must be one of {POLICY_NAMES} or a function "
                f"policy(state, limits) -> Plan, got {p!r}"
            )
        if not isinstance(self.enable_chunked_prefill, bool):
            raise ValueError(f"SchedulerConfig.enable_chunked_prefill must be a bool, got {self.enable_chunked_prefill!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class SchedulerLimits:
    """Engine-derived limits."""

    max_batch_size: int  # sequences running at once
    max_num_tokens: int  # new tokens per step
    max_seq_len: int  # prompt + output
    page_size: int

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_num_tokens", "max_seq_len", "page_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"SchedulerLimits.{name} must be an integer >= 1, got {v!r}")



@dataclass(frozen=True, slots=True, kw_only=True)
class SchedulerState:
    """Everything the scheduler knows between steps."""

    pool: PagePool
    waiting: tuple[SequenceState, ...] = ()  # FCFS queue; preempted sequences go back to the front
    running: Running = EMPTY_RUNNING  # oldest admission first, as columns (llmfx/running.py)
    step: int = 0
    num_preemptions: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.running, Running):  # records, from a caller building a state by hand
            object.__setattr__(self, "running", Running.of(self.running))


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """A capacity policy's decision: which waiting requests may be admitted, which running ones to preempt."""

    admit: tuple[int, ...] = ()  # tried in order; admission stops at the first that does not fit this step
    preempt: tuple[int, ...] = ()  # applied before anything is scheduled


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduledSeq:
    """One sequence's share of a step."""

    request_id: int  # the sequence's id (SequenceState.request_id)
    token_ids: tuple[int, ...]  # a prefill chunk, or the last token for decode
    start_pos: int  # position of token_ids[0] == tokens already in the KV cache
    pages: tuple[int, ...]  # the whole page list, covering start_pos + len(token_ids)
    sample: bool  # the chunk reaches the end of the known tokens: a new token is sampled



class ScheduledBatch:
    """What one step computes, as records (`seqs`) and as arrays (`columns`), each made from the other when first
    read: the scheduler makes columns, which staging and postprocess use; tests and tools build from records.

    A value: never changed once made (a lazily made view is cached, which changes nothing observable).
    """

    __slots__ = ("_seqs", "_columns", "preempted", "page_copies")

    def __init__(self, seqs: Sequence[ScheduledSeq] | None = None, *, preempted: tuple[int, ...] = (),
                 page_copies: tuple[tuple[int, int], ...] = (), columns: BatchColumns | None = None) -> None:
        if seqs is not None and columns is not None:
            raise ValueError("ScheduledBatch takes seqs or columns, not both")
        self._seqs = tuple(seqs) if seqs is not None else None if columns is not None else ()
        self._columns = columns
        self.preempted = preempted  # sequence ids preempted this step (their KV pages are gone)
        # (src, dst): copy KV page src to the fresh page dst before the step runs (a forked beam's partial page).
        self.page_copies = page_copies

    @property
    def seqs(self) -> tuple[ScheduledSeq, ...]:
        """One record per sequence, in batch order."""
        if self._seqs is None:
            c = self._columns
            flat = c.tokens.tolist()
            ends = np.cumsum(c.counts).tolist()
            tokens = [one_token(flat[e - 1]) if n == 1 else tuple(flat[e - n: e])
                      for e, n in zip(ends, c.counts.tolist())]
            self._seqs = tuple(map(_scheduled_seq, c.ids.tolist(), tokens, c.starts.tolist(), c.pages,
                                   c.samples.tolist()))
        return self._seqs

    @property
    def columns(self) -> BatchColumns:
        """The sequences as arrays, in batch order."""
        if self._columns is None:
            seqs = self._seqs
            self._columns = BatchColumns.of(seqs, [s.request_id for s in seqs], [s.sample for s in seqs])
        return self._columns

    @property
    def num_seqs(self) -> int:
        return len(self._seqs) if self._seqs is not None else len(self._columns.ids)

    @property
    def num_tokens(self) -> int:
        """Tokens fed this step."""
        if self._seqs is not None:
            return sum(len(s.token_ids) for s in self._seqs)
        return int(self._columns.counts.sum())

    def __eq__(self, other) -> bool:
        if not isinstance(other, ScheduledBatch):
            return NotImplemented
        return (self.seqs, self.preempted, self.page_copies) == (other.seqs, other.preempted, other.page_copies)

    def __hash__(self) -> int:
        return hash((self.seqs, self.preempted, self.page_copies))

    def __repr__(self) -> str:
        return f"ScheduledBatch(seqs={self.seqs!r}, preempted={self.preempted!r}, page_copies={self.page_copies!r})"


class TokenEvent(NamedTuple):
    """New tokens of one request, and why it finished if it did.

    A named tuple, not a dataclass: one is made per sequence per step, and a tuple can be made by a
    C-level map (`_token_events`) where a dataclass costs a Python call each.
    """

    request_id: int
    new_token_ids: tuple[int, ...]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop token id; None for EOS, length and aborts
    hypotheses: tuple[Hypothesis, ...] = ()  # beam search, on its final event: the best hypotheses, best first


# A positional constructor for the record built per sequence when a batch's records are read (llmfx/records.py).
_scheduled_seq = positional_builder(ScheduledSeq)  # request_id, token_ids, start_pos, pages, sample
# TokenEvent from a tuple of its five fields, with no Python frame.
_token_event_of = functools.partial(tuple.__new__, TokenEvent)


def new_scheduler_state(pool: PagePool) -> SchedulerState:
    """An idle scheduler over a page pool."""
    return SchedulerState(pool=pool)


def has_work(state: SchedulerState) -> bool:
    """True while any request waits or runs."""
    return bool(state.waiting or state.running)


def worst_case_pages(request: Request, limits: SchedulerLimits) -> int:
    """Pages a request holds at most: prompt + max_tokens capped by max_seq_len (one spare slot for overlap).

    A beam group's beams share the prompt's full pages and may each hold all the rest.
    """
    total = min(len(request.prompt_token_ids) + request.params.max_tokens, limits.max_seq_len)
    pages = pages_for_tokens(total, limits.page_size)
    if not request.params.use_beam_search:
        return pages
    shared = len(request.prompt_token_ids) // limits.page_size
    return shared + request.params.beam_width * (pages - shared)


def rows_in_use(running: Running) -> int:
    """Batch rows the running requests may occupy: one a sequence, beam_width a beam group from its admission."""
    beams = running.beams
    rows = beams.count(None)
    if rows < len(beams):
        groups = {r.request_id: r.batch_rows for r, b in zip(running.requests, beams) if b is not None}
        rows += sum(groups.values())
    return rows


def reserved_pages(running: Running, limits: SchedulerLimits) -> int:
    """Pages the running requests may still allocate: worst case less the distinct pages each holds."""
    total = 0
    groups: dict[int, tuple[Request, set[int]]] = {}
    for request, beam, pages in zip(running.requests, running.beams, running.pages):
        if beam is None:
            total += max(0, worst_case_pages(request, limits) - len(pages))
        else:
            groups.setdefault(request.request_id, (request, set()))[1].update(pages)
    return total + sum(max(0, worst_case_pages(r, limits) - len(held)) for r, held in groups.values())


def validate_request(request: Request, limits: SchedulerLimits, cfg: SchedulerConfig, num_pages: int) -> None:
    """Raise ValueError, naming the limit, for a request that could never run in a pool of num_pages."""
    n = len(request.prompt_token_ids)
    if n == 0:
        raise ValueError(f"request {request.request_id}: prompt_token_ids must not be empty")
    if n >= limits.max_seq_len:
        raise ValueError(
            f"request {request.request_id}: prompt of {n} tokens must be shorter than max_seq_len={limits.max_seq_len}"
        )
    if not cfg.enable_chunked_prefill and n > limits.max_num_tokens:
        raise ValueError(
            f"request {request.request_id}: prompt of {n} tokens exceeds max_num_tokens={limits.max_num_tokens}; "
            f"set enable_chunked_prefill=True or raise max_num_tokens"
        )
    params = request.params
    if params.use_beam_search:
        ids = request.beam_ids
        if len(ids) != params.beam_width or len(set(ids)) != len(ids) or ids[0] != request.request_id:
            raise ValueError(f"request {request.request_id}: Request.beam_ids must hold beam_width={params.beam_width} "
                             f"distinct ids, request_id first, got {ids}")
        if params.beam_width > limits.max_batch_size:
            raise ValueError(f"request {request.request_id}: beam_width={params.beam_width} exceeds "
                             f"max_batch_size={limits.max_batch_size} (every beam is a batch row)")
        # A row's candidates must hold its beam_width best continuations that do not finish.
        finishing = set(params.stop_token_ids) | (set() if params.ignore_eos else set(request.eos_token_ids))
        if len(finishing) > MAX_LOGPROBS - params.beam_width:
            raise ValueError(f"request {request.request_id}: beam search with beam_width={params.beam_width} allows "
                             f"at most {MAX_LOGPROBS - params.beam_width} EOS and stop token ids, got {len(finishing)}")
    elif request.beam_ids:
        raise ValueError(f"request {request.request_id}: Request.beam_ids needs SamplingParams.use_beam_search=True")
    need = worst_case_pages(request, limits)
    if need > num_pages - 1:
        raise ValueError(
            f"request {request.request_id}: needs {need} KV pages (prompt + max_tokens, capped by max_seq_len) but the "
            f"pool has {num_pages - 1}; lower max_tokens or raise KvCacheConfig.max_tokens"
        )


def add_requests(
    state: SchedulerState, requests: Iterable[Request], limits: SchedulerLimits, cfg: SchedulerConfig
) -> SchedulerState:
    """Append requests to the waiting queue; raises ValueError for requests that could never run."""
    requests = tuple(requests)
    if not requests:
        return state
    assert limits.page_size == state.pool.page_size, "limits.page_size must match the pool's page size"
    known = {i for r in itertools.chain((s.request for s in state.waiting), state.running.requests)
             for i in r.sequence_ids}
    for r in requests:
        validate_request(r, limits, cfg, state.pool.num_pages)
        for i in r.sequence_ids:
            if i in known:
                raise ValueError(f"request_id {i} is already in the scheduler")
            known.add(i)
    new = tuple(_new_sequence(r) for r in requests)
    return dataclasses.replace(state, waiting=state.waiting + new)


def _new_sequence(request: Request) -> SequenceState:
    """A request's first sequence; a beam search starts as one beam, its prompt."""
    beam = Beam(seq_id=request.request_id) if request.params.use_beam_search else None
    return SequenceState(request=request, beam=beam)



# --- capacity policies: policy(state, limits) -> Plan; schedule enforces budgets ---


def guaranteed_no_evict(state: SchedulerState, limits: SchedulerLimits) -> Plan:
    """Strict FCFS; admit only if the whole worst case fits beside what running requests reserved; never preempt."""
    if not state.waiting or len(state.running) >= limits.max_batch_size:
        return Plan()  # nothing could be admitted: skip summing the running requests' reservations
    rows = rows_in_use(state.running)
    pool = state.pool
    reserved = reserved_pages(state.running, limits)
    admit: list[int] = []
    for seq in state.waiting:
        rows += seq.request.batch_rows
        if rows > limits.max_batch_size:
            break
        # A hit on a held page costs nothing; a hit on an evictable one costs one available page, like a fresh one.
        hit_pool, hit, _ = match_prefix(pool, token_slice(seq, 0, seq.num_tokens))
        need = worst_case_pages(seq.request, limits) - len(hit)
        if num_available(hit_pool) - reserved < need:
            break
        pool, reserved = hit_pool, reserved + need
        admit.append(seq.request_id)
    return Plan(admit=tuple(admit))



def max_utilization(state: SchedulerState, limits: SchedulerLimits) -> Plan:
    """Admit while the next step's pages fit; when running requests lack pages, preempt the newest."""
    pool, ps, run = state.pool, limits.page_size, state.running
    # Every running sequence can progress by one token; that may need one new page, or a copy of a shared one.
    needs = run.computed // ps + 1 - run.num_pages
    copied: dict[int, int] = {}
    for i in _beam_rows(run):
        source = _copy_source(pool, run.pages[i], int(run.computed[i]), ps, copied)
        if source is not None:
            copied[source] = copied.get(source, 0) + 1
            needs[i] += 1
    available, total = num_available(pool), int(needs.sum())
    preempt: list[int] = []
    groups = _request_groups(run) if total > available else []  # a beam group is preempted whole: one victim
    while total > available and len(groups) > 1:  # the oldest request always keeps running
        members = groups.pop()
        total -= int(needs[members].sum())
        held = collections.Counter(p for i in members for p in run.pages[i])
        available += sum(1 for p, n in held.items() if pool.refcounts[p] == n)  # pages only this request holds
        preempt.append(int(run.ids[members[0]]))
    if preempt:
        return Plan(preempt=tuple(preempt))  # admitting now would only thrash
    available -= total
    rows = rows_in_use(run)
    admit: list[int] = []
    for seq in state.waiting:
        rows += seq.request.batch_rows
        if rows > limits.max_batch_size:
            break
        hit_pool, hit, cached = match_prefix(pool, token_slice(seq, 0, seq.num_tokens))
        chunk = min(seq.num_tokens - cached, limits.max_num_tokens)
        need = pages_for_tokens(cached + chunk, ps) - len(hit)
        spent = num_available(pool) - num_available(hit_pool)
        if need + spent > available:
            break
        pool, available = hit_pool, available - need - spent
        admit.append(seq.request_id)
    return Plan(admit=tuple(admit))


_POLICIES: Mapping[str, Callable[[SchedulerState, SchedulerLimits], Plan]] = {
    "guaranteed_no_evict": guaranteed_no_evict,
    "max_utilization": max_utilization,
}


def resolve_policy(cfg: SchedulerConfig) -> Callable[[SchedulerState, SchedulerLimits], Plan]:
    """The policy function named or given by cfg.capacity_scheduler_policy."""
    p = cfg.capacity_scheduler_policy
    return p if callable(p) else _POLICIES[p]


# --- the step functions ---


def _without_gated(state: SchedulerState) -> SchedulerState:
    """The state minus waiting siblings whose first sibling has not finished its prompt yet."""
    if all(s.request.prefill_after is None for s in state.waiting):
        return state
    # A sibling's prompt is in the cache once it has a known output token (registered at postprocess).
    run = state.running
    prefilling = {s.request_id for s in state.waiting}
    prefilling.update(run.ids[run.num_out == 0].tolist())
    waiting = tuple(s for s in state.waiting if s.request.prefill_after not in prefilling)
    return dataclasses.replace(state, waiting=waiting)


def _beam_rows(run: Running) -> list[int]:
    """Rows of beam-search sequences (none, without a beam request: one C-level count)."""
    beams = run.beams
    if beams.count(None) == len(beams):
        return []
    return [i for i, b in enumerate(beams) if b is not None]


def _request_groups(run: Running) -> list[list[int]]:
    """Rows per request, oldest first: a beam group's sequences form one entry."""
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(run.requests):
        groups.setdefault(r.request_id, []).append(i)
    return list(groups.values())


def _preempt(state: SchedulerState, seq_ids: Iterable[int]) -> tuple[SchedulerState, tuple[int, ...]]:
    """Recompute-preemption: free pages, requeue at the front of waiting, keep generated tokens.

    A beam is preempted with its whole group, which restarts its search from the prompt: the search
    is deterministic, so it finds the same hypotheses again.
    """
    ids = set(seq_ids)
    if not ids:
        return state, ()
    run = state.running
    row_of = run.row_of()
    unknown = ids - row_of.keys()
    if unknown:
        raise ValueError(f"capacity policy asked to preempt request ids that are not running: {sorted(unknown)}")
    groups = {run.requests[row_of[i]].request_id for i in ids if run.beams[row_of[i]] is not None}
    gone = [i for i, (r, b) in enumerate(zip(run.requests, run.beams))
            if int(run.ids[i]) in ids or (b is not None and r.request_id in groups)]
    # Tail pages first, so that shared prefixes stay cached longest.
    pool = release(state.pool, (p for i in gone for p in reversed(run.pages[i])))
    requeued: list[SequenceState] = []
    for i in gone:
        s = run[i]
        if s.beam is None:
            # An in-flight token is dropped: the recompute samples it again at the same position.
            requeued.append(dataclasses.replace(s, num_computed_tokens=0, pages=(), num_inflight=0))
        elif s.request.request_id in groups:
            groups.discard(s.request.request_id)
            requeued.append(_new_sequence(s.request))
    state = dataclasses.replace(
        state,
        pool=pool,
        running=run.without(gone),
        waiting=tuple(requeued) + state.waiting,
        num_preemptions=state.num_preemptions + len(gone),
    )
    return state, tuple(run.ids[gone].tolist())


def _copy_source(pool: PagePool, pages: tuple[int, ...], computed: int, ps: int,
                 copied: Mapping[int, int]) -> int | None:
    """A beam's partial last page if another sequence still holds it (the beam must write a copy), else None.

    Only forked beams share a partial page (prefix hits share full pages only), so only beam rows
    ask. `copied` counts the holders already planned to copy a page this step: the last holder
    writes in place.
    """
    if computed % ps == 0:
        return None
    page = pages[-1]
    return page if pool.refcounts[page] - copied.get(page, 0) > 1 else None


@dataclass(frozen=True, slots=True)
class _RunningPlan:
    """Which running rows a step advances: decodes (one token each) and prefill chunks, and their new pages."""

    decodes: np.ndarray  # rows, ascending
    decode_pages: np.ndarray  # new pages per decode row: 0 or 1
    decode_copies: np.ndarray  # bool per decode row: it writes a private copy of its shared last page
    prefills: list[tuple[int, int, int]]  # (row, tokens, new pages), rows ascending
    num_tokens: np.ndarray  # per table row: prompt + output + in-flight tokens (a chunk reaching it samples)
    new_pages: int
    stalled: bool  # some sequence could not progress for lack of pages


def _plan_running(state: SchedulerState, limits: SchedulerLimits) -> _RunningPlan:
    """The running rows a step advances, under max_num_tokens and the pool's available pages, oldest first."""
    run, ps = state.running, limits.page_size
    budget, available = limits.max_num_tokens, num_available(state.pool)
    num_tokens = run.prompt_lens + run.num_out + run.inflight
    left = num_tokens - run.computed
    is_beam = np.fromiter((b is not None for b in run.beams), bool, len(run)) if _beam_rows(run) else None
    # Nothing to schedule while a token is in flight that already reaches max_tokens or max_seq_len,
    # or while a beam's is (its next token is chosen once its group's candidates are back).
    blocked = (run.num_out + run.inflight >= run.max_tokens) | (num_tokens >= limits.max_seq_len)
    if is_beam is not None:
        blocked |= is_beam
    blocked &= run.inflight > 0
    decodes = np.flatnonzero((left == 1) & ~blocked)
    need = (run.computed[decodes] == run.num_pages[decodes] * ps).astype(np.int64)
    copies = np.zeros(len(decodes), dtype=bool)
    passes = need == 0
    # A decode that needs a page takes one if any is left, in order; rows past the token budget are cut
    # below, and since every later row is cut too, the pages they would take change nothing.
    ask = need.astype(bool) if is_beam is None else need.astype(bool) | is_beam[decodes]
    copied: dict[int, int] = {}
    left_pages = available
    for k in np.flatnonzero(ask).tolist():
        row = int(decodes[k])
        source = None
        if run.beams[row] is not None:
            source = _copy_source(state.pool, run.pages[row], int(run.computed[row]), ps, copied)
        n = 1 if need[k] or source is not None else 0
        if n > left_pages:
            passes[k] = False
            continue
        passes[k] = True
        if source is not None:
            copied[source] = copied.get(source, 0) + 1
            copies[k] = True
        need[k] = n
        left_pages -= n
    taken = passes & (np.cumsum(passes) <= budget)
    decode_pages = need[taken]
    new_pages = int(decode_pages.sum())
    budget -= int(taken.sum())
    available -= new_pages
    stalled = bool(taken.sum() < len(decodes)) and budget > 0
    prefills: list[tuple[int, int, int]] = []
    for i in np.flatnonzero((left > 1) & ~blocked).tolist():
        computed, num_pages = int(run.computed[i]), int(run.num_pages[i])
        # Running prefills are always chunkable: a non-chunked prompt ran whole at admission.
        n = min(int(left[i]), budget, (num_pages + available) * ps - computed)
        if n <= 0:
            stalled |= budget > 0
            continue
        pages = pages_for_tokens(computed + n, ps) - num_pages
        prefills.append((i, n, pages))
        budget, available, new_pages = budget - n, available - pages, new_pages + pages
    return _RunningPlan(decodes=decodes[taken], decode_pages=decode_pages, decode_copies=copies[taken],
                        prefills=prefills, num_tokens=num_tokens, new_pages=new_pages, stalled=stalled)


def schedule(
    state: SchedulerState, inbox: Iterable[Request], limits: SchedulerLimits, cfg: SchedulerConfig
) -> tuple[SchedulerState, ScheduledBatch]:
    """One step: admit, preempt and allocate pages under max_num_tokens and max_batch_size."""
    state = add_requests(state, inbox, limits, cfg)
    policy = resolve_policy(cfg)
    # Policies see only the waiting requests that may start now.
    plan = policy(_without_gated(state), limits)
    state, preempted = _preempt(state, plan.preempt)
    chunks = _plan_running(state, limits)
    while chunks.stalled and not (len(chunks.decodes) or chunks.prefills) and len(_request_groups(state.running)) > 1:
        # Liveness guard for policies that let every running sequence starve for pages.
        state, more = _preempt(state, (int(state.running.ids[-1]),))
        preempted += more
        chunks = _plan_running(state, limits)
    pool, fresh = allocate(state.pool, chunks.new_pages)
    running, columns, copies = _advance(state.running, chunks, fresh)
    if copies:  # each copier gives up its reference; a holder stays, so nothing is freed here
        pool = release(pool, (src for src, _ in copies))
    budget = limits.max_num_tokens - int(columns.counts.sum())

    waiting = state.waiting
    admitted: list[SequenceState] = []
    admitted_seqs: list[ScheduledSeq] = []
    if not preempted:  # admitting right after preempting would only thrash
        by_id = {s.request_id: s for s in waiting} if plan.admit else {}
        rows = rows_in_use(running) if plan.admit else 0
        for rid in plan.admit:
            s = by_id.get(rid)
            if s is None:
                raise ValueError(f"capacity policy asked to admit request id {rid}, which is not waiting")
            if rows + s.request.batch_rows > limits.max_batch_size or budget <= 0:
                break
            hit_pool, hit, cached = match_prefix(pool, token_slice(s, 0, s.num_tokens))
            n = s.num_tokens - cached
            chunkable = cfg.enable_chunked_prefill or bool(s.output_token_ids)  # a recompute may always be chunked
            if chunkable:
                n = min(n, budget, (len(hit) + num_available(hit_pool)) * limits.page_size - cached)
            need = pages_for_tokens(cached + n, limits.page_size) - len(hit)
            if n <= 0 or n > budget or need > num_available(hit_pool):
                break
            pool, fresh = allocate(hit_pool, need)
            s = dataclasses.replace(s, pages=hit + fresh, num_computed_tokens=cached)
            chunk = _scheduled(s, n, s.pages)
            admitted_seqs.append(chunk)
            admitted.append(dataclasses.replace(s, num_computed_tokens=cached + n,
                                                num_inflight=s.num_inflight + chunk.sample))
            budget -= n
            rows += s.request.batch_rows
        if admitted:
            running = running + Running.of(admitted)
            ids = {s.request_id for s in admitted}
            k = len(admitted)
            if all(waiting[j].request_id in ids for j in range(k)):  # the FCFS common case
                waiting = waiting[k:]
            else:
                waiting = tuple(s for s in waiting if s.request_id not in ids)
            extra = BatchColumns.of(admitted_seqs, [c.request_id for c in admitted_seqs],
                                    [c.sample for c in admitted_seqs])
            columns = _concat(columns, extra)
    state = dataclasses.replace(state, pool=pool, running=running, waiting=waiting, step=state.step + 1)
    return state, ScheduledBatch(preempted=preempted, page_copies=copies, columns=columns)


def _advance(run: Running, plan: _RunningPlan,
             fresh: tuple[int, ...]) -> tuple[Running, BatchColumns, tuple[tuple[int, int], ...]]:
    """The table after the planned rows advance, their chunks (row order) and the page copies to make.

    Fresh pages go to rows in row order, as many as each needs.
    """
    pages, num_pages = list(run.pages), run.num_pages.copy()
    copies: list[tuple[int, int]] = []
    paged = plan.decode_pages > 0
    grown = list(zip(plan.decodes[paged].tolist(), plan.decode_pages[paged].tolist(),
                     plan.decode_copies[paged].tolist()))
    grown += [(r, need, False) for r, _, need in plan.prefills if need]
    used = 0
    for row, need, copy in sorted(grown):
        p = pages[row]
        if copy:  # the step writes into a private copy of the shared partial page, made before it runs
            copies.append((p[-1], fresh[used]))
            p = p[:-1]
        pages[row] = p + fresh[used: used + need]
        num_pages[row] = len(pages[row])
        used += need
    assert used == len(fresh)
    rows = plan.decodes
    counts = np.ones(len(rows), dtype=np.int64)
    if plan.prefills:
        prefill_rows = np.array([r for r, _, _ in plan.prefills], dtype=np.int64)
        order = np.argsort(np.concatenate([rows, prefill_rows]), kind="stable")
        rows = np.concatenate([rows, prefill_rows])[order]
        counts = np.concatenate([counts, [n for _, n, _ in plan.prefills]]).astype(np.int64)[order]
        is_prefill = (order >= len(plan.decodes))
    starts = run.computed[rows]
    inflight_before = run.inflight[rows]
    samples = starts + counts == plan.num_tokens[rows]
    # A decode's one token: in flight (its value is on the device), else the last known one.
    tokens = np.where(inflight_before > 0, PLACEHOLDER, run.last[rows])
    row_list = rows.tolist()
    if plan.prefills:
        per_row: list[Sequence[int]] = [(t,) for t in tokens.tolist()]
        for k in np.flatnonzero(is_prefill).tolist():
            r = row_list[k]
            per_row[k] = tokens_between(run.requests[r].prompt_token_ids, run.output_of(r), int(starts[k]),
                                        int(starts[k] + counts[k]))
        tokens = np.fromiter(itertools.chain.from_iterable(per_row), np.int64, int(counts.sum()))
    computed, inflight = run.computed.copy(), run.inflight.copy()
    computed[rows] += counts
    inflight[rows] += samples
    table = run.replace(pages=tuple(pages), num_pages=num_pages, computed=computed, inflight=inflight)
    columns = BatchColumns(ids=run.ids[rows], starts=starts, counts=counts, samples=samples, tokens=tokens,
                           pages=tuple(map(pages.__getitem__, row_list)))
    return table, columns, tuple(copies)


def _concat(a: BatchColumns, b: BatchColumns) -> BatchColumns:
    return BatchColumns(*(np.concatenate([x, y]) for x, y in zip(a[:-1], b[:-1])), pages=a.pages + b.pages)


def _scheduled(seq: SequenceState, n: int, pages: tuple[int, ...]) -> ScheduledSeq:
    start, request = seq.num_computed_tokens, seq.request
    known = len(request.prompt_token_ids) + len(seq.output_token_ids)
    return _scheduled_seq(request.request_id if seq.beam is None else seq.beam.seq_id,
                          token_slice(seq, start, start + n), start, pages, start + n == known + seq.num_inflight)


def _stop_token(request: Request, token: int, num_out: int) -> tuple[str, int | None] | None:
    """("stop", stop_reason) when token, the request's output token number num_out, stops it by its value."""
    params = request.params
    if num_out >= params.min_tokens:
        if not params.ignore_eos and token in request.eos_token_ids:
            return "stop", None
        if token in params.stop_token_ids:
            return "stop", token
    return None



def postprocess(
    state: SchedulerState, batch: ScheduledBatch, sampled: Mapping[int, int], limits: SchedulerLimits,
    candidates: Mapping[int, Candidates] = MappingProxyType({}),
) -> tuple[SchedulerState, tuple[TokenEvent, ...]]:
    """Append sampled tokens, register computed full pages, finish stopped requests and free their pages.

    Beams take their step's candidates (sequence id -> top tokens) instead of a token; once every
    beam of a group has them, the group chooses its next beams (`_step_beams`).
    """
    run, ps, max_seq_len = state.running, limits.page_size, limits.max_seq_len
    cols = batch.columns
    # Each batch row's table row; -1 for sequences aborted or preempted since they were scheduled.
    if np.array_equal(cols.ids, run.ids):  # a steady decode: the batch is the table
        rows = np.arange(len(run), dtype=np.int64)
    else:
        rows = np.fromiter(map(run.row_of().get, cols.ids.tolist(), itertools.repeat(-1)), np.int64, len(cols.ids))
    live = rows >= 0
    pool = state.pool
    if pool.enable_prefix_cache:  # pages this step filled: their tokens are all known now
        ends = cols.starts + cols.counts
        full = np.flatnonzero(live & (ends // ps > cols.starts // ps))
        pool = register_pages(pool, [(TokenPrefix(run.requests[r].prompt_token_ids, run.outputs[r], e), run.pages[r])
                                     for r, e in zip(rows[full].tolist(), ends[full].tolist())])
    sampling = rows[live & cols.samples]
    assert (run.inflight[sampling] > 0).all(), "postprocess got a token the scheduler did not expect"
    beams = _beam_rows(run)
    if beams:
        is_beam = np.isin(sampling, beams)
        beam_rows, sampling = sampling[is_beam], sampling[~is_beam]
    ids = run.ids[sampling].tolist()
    tokens = np.fromiter(map(sampled.__getitem__, ids), np.int64, len(ids))
    token_list = tokens.tolist()
    inflight, num_out, last = run.inflight.copy(), run.num_out.copy(), run.last.copy()
    inflight[sampling] -= 1
    if beams:
        inflight[beam_rows] -= 1  # a beam's token is chosen by its group's step, from the candidates below
    num_out[sampling] += 1
    last[sampling] = tokens
    outputs = _append_outputs(run, sampling, token_list)
    # Finish reasons: a stop token (checked exactly only for tokens that stop some row), else length.
    counts = num_out[sampling]
    reasons: list[str | None] = [None] * len(ids)
    stop_reasons: list[int | None] = [None] * len(ids)
    if len(run.stop_ids):
        for k in np.flatnonzero(_any_of(tokens, run.stop_ids)).tolist():
            stop = _stop_token(run.requests[int(sampling[k])], token_list[k], int(counts[k]))
            if stop is not None:
                reasons[k], stop_reasons[k] = stop
    at_length = (counts >= run.max_tokens[sampling]) | (run.prompt_lens[sampling] + counts >= max_seq_len)
    for k in np.flatnonzero(at_length).tolist():
        if reasons[k] is None:
            reasons[k] = "length"
    events = list(map(_token_event_of, zip(ids, map(one_token, token_list), reasons, stop_reasons,
                                          itertools.repeat(()))))
    finished = sorted(int(sampling[k]) for k, reason in enumerate(reasons) if reason is not None)
    if finished:
        pool = release(pool, (p for i in finished for p in reversed(run.pages[i])))
    table = run.replace(outputs=outputs, num_out=num_out, inflight=inflight, last=last)
    replaced: dict[int, list[SequenceState]] = {}  # row -> what takes its place
    if beams and len(beam_rows):
        new_beams = list(run.beams)
        for r in beam_rows.tolist():
            seq_id = int(run.ids[r])
            assert seq_id in candidates, f"beam {seq_id} got no candidates"
            new_beams[r] = dataclasses.replace(new_beams[r], candidates=candidates[seq_id])
        table = table.replace(beams=tuple(new_beams))
        stepped = {run.requests[r].request_id for r in beam_rows.tolist()}
        members: dict[int, list[int]] = {}
        for i in beams:
            if table.requests[i].request_id in stepped:
                members.setdefault(table.requests[i].request_id, []).append(i)
        for group in members.values():
            group_beams = [table[i] for i in group]
            if any(b.beam.candidates is None for b in group_beams):
                continue  # a beam of the group has not run this token yet
            pool, forks, event = _step_beams(pool, group_beams, limits)
            replaced.update({i: [] for i in group})
            replaced[group[0]] = forks  # the group keeps its place in the admission order
            if event is not None:
                events.append(event)
    if finished or replaced:
        table = _splice(table, set(finished), replaced)
    return dataclasses.replace(state, pool=pool, running=table), tuple(events)


def _any_of(values: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """values' members of ids, as a bool mask; a few comparisons where ids are few (np.isin sorts)."""
    if len(ids) > 8:
        return np.isin(values, ids)
    mask = values == ids[0]
    for i in ids[1:].tolist():
        mask |= values == i
    return mask


def _append_outputs(run: Running, rows: np.ndarray, tokens: list[int]) -> tuple[list[int], ...]:
    """run.outputs with tokens appended to these rows' lists; a list another version of the table grew past
    this one's length is first replaced by a copy of this version's prefix (as TokenTape.appended does)."""
    outputs = run.outputs
    every = len(rows) == len(outputs) and np.array_equal(rows, np.arange(len(outputs)))
    lists = outputs if every else [outputs[r] for r in rows.tolist()]
    lengths = np.fromiter(map(len, lists), np.int64, len(lists))
    forked = np.flatnonzero(lengths != run.num_out[rows]).tolist()
    if forked:
        new, lists = list(outputs), list(lists)
        for k in forked:
            r = int(rows[k])
            new[r] = lists[k] = outputs[r][: int(run.num_out[r])]
        outputs = tuple(new)
    collections.deque(map(list.append, lists, tokens), maxlen=0)  # a C-level loop
    return outputs


def _splice(table: Running, dropped: set[int], replaced: Mapping[int, list[SequenceState]]) -> Running:
    """The table less the dropped rows, each replaced row swapped for its records (in its place)."""
    if not replaced:
        return table.without(dropped)
    parts: list[Running] = []
    kept: list[int] = []
    for i in range(len(table)):
        if i in replaced:
            parts += [table.take(kept), Running.of(replaced[i])]
            kept = []
        elif i not in dropped:
            kept.append(i)
    parts.append(table.take(kept))
    return sum(parts[1:], parts[0])


def _step_beams(pool: PagePool, beams: Sequence[SequenceState],
                limits: SchedulerLimits) -> tuple[PagePool, list[SequenceState], TokenEvent | None]:
    """A beam group's next beams, forked onto their parents' pages, or its final event; the old beams let go."""
    request = beams[0].request
    params = request.params
    prompt_len, num_out = len(request.prompt_token_ids), len(beams[0].output_token_ids) + 1
    at_length = num_out >= params.max_tokens or prompt_len + num_out >= limits.max_seq_len

    def finish(token: int) -> tuple[str, int | None] | None:
        return _stop_token(request, token, num_out) or (("length", None) if at_length else None)

    cfg = BeamConfig(width=params.beam_width, length_penalty=params.length_penalty,
                     early_stopping=params.early_stopping,
                     max_new_tokens=min(params.max_tokens, limits.max_seq_len - prompt_len))
    rows = [BeamRow(output_token_ids=b.output_token_ids, cumulative_logprob=b.beam.cumulative_logprob,
                    candidates=b.beam.candidates) for b in beams]
    children, hypotheses, done = beam_step(rows, beams[0].beam.hypotheses, finish, cfg)
    if not done:  # children take their references first, so pages that live on are never freed
        pool = share(pool, (p for c in children for p in beams[c.parent].pages))
    # Tail pages first, so that shared prefixes stay cached longest; a dropped beam's own pages are freed now.
    pool = release(pool, (p for b in beams for p in reversed(b.pages)))
    if done:
        best = hypotheses[0]
        return pool, [], TokenEvent(request_id=request.request_id, new_token_ids=(), finish_reason=best.finish_reason,
                                    stop_reason=best.stop_reason, hypotheses=hypotheses)
    # A parent's first child keeps the parent's id; further children take ids no beam holds.
    keeper: dict[int, int] = {}
    for k, c in enumerate(children):
        keeper.setdefault(c.parent, k)
    held = {beams[p].beam.seq_id for p in keeper}
    spare = iter(i for i in request.beam_ids if i not in held)
    forks = []
    for k, c in enumerate(children):
        parent = beams[c.parent]
        seq_id = parent.beam.seq_id if keeper[c.parent] == k else next(spare)
        forks.append(SequenceState(
            request=request, output_token_ids=parent.output_token_ids + (c.token,),
            num_computed_tokens=parent.num_computed_tokens, pages=parent.pages,
            beam=Beam(seq_id=seq_id, cumulative_logprob=c.cumulative_logprob, hypotheses=hypotheses)))
    return pool, forks, None



def abort(
    state: SchedulerState, request_ids: Iterable[int], reason: str = "abort"
) -> tuple[SchedulerState, tuple[TokenEvent, ...]]:
    """End waiting or running requests (a beam group whole) and free their pages; unknown ids are ignored."""
    if reason not in ("abort", "error"):
        raise ValueError(f"abort reason must be 'abort' or 'error', got {reason!r}")
    ids = set(request_ids)
    run = state.running
    gone_running = [i for i, r in enumerate(run.requests) if r.request_id in ids]
    gone_waiting = [s for s in state.waiting if s.request.request_id in ids]
    if not gone_running and not gone_waiting:
        return state, ()
    # Not registered: after a failed step the KV of these pages may be garbage.
    pool = release(state.pool, (p for i in gone_running for p in reversed(run.pages[i])))
    state = dataclasses.replace(
        state,
        pool=pool,
        running=run.without(gone_running),
        waiting=tuple(s for s in state.waiting if s.request.request_id not in ids),
    )
    ended = dict.fromkeys([run.requests[i].request_id for i in gone_running] +
                          [s.request.request_id for s in gone_waiting])
    return state, tuple(TokenEvent(request_id=rid, new_token_ids=(), finish_reason=reason) for rid in ended)
