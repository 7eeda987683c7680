"""The pure scheduler: continuous batching, chunked prefill, prefix-cache admission, capacity policies, beam groups."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

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
from llmfx.persistent import TokenTape, append_token
from llmfx.records import positional_builder
from llmfx.sampling_params import MAX_LOGPROBS, SamplingParams

POLICY_NAMES = ("guaranteed_no_evict", "max_utilization")
# A decode input whose value only the device knows yet: the token a launched step is sampling.
PLACEHOLDER = -1
FINISH_REASONS = ("stop", "length", "abort", "error")


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """What enters the engine."""

    request_id: int
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()  # ignored when params.ignore_eos
    arrival_time: float = 0.0
    # A sibling of an n / best_of request waits until this request's prompt is computed and its
    # full pages are in the prefix cache, then shares them instead of computing the prompt again.
    prefill_after: int | None = None
    # Beam search: the ids of its beam_width sequences, request_id first (each beam is a batch row).
    beam_ids: tuple[int, ...] = ()

    @property
    def sequence_ids(self) -> tuple[int, ...]:
        """The ids this request's sequences may take."""
        return self.beam_ids or (self.request_id,)

    @property
    def batch_rows(self) -> int:
        """Rows of a step's batch the request may occupy at once: beam_width for beam search, else 1."""
        return self.params.beam_width if self.params.use_beam_search else 1


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
class Beam:
    """A beam-search sequence's part in its group's search."""

    seq_id: int  # one of Request.beam_ids
    cumulative_logprob: float = 0.0
    candidates: Candidates | None = None  # its next token's top continuations, held until every beam has its own
    hypotheses: tuple[Hypothesis, ...] = ()  # the group's finished hypotheses, best first (every beam holds them)


@dataclass(frozen=True, slots=True, kw_only=True)
class SequenceState:
    """One sequence inside the scheduler: a request, or one beam of a beam-search request."""

    request: Request
    output_token_ids: tuple[int, ...] | TokenTape = ()  # a TokenTape once postprocess appends (equal to its tuple)
    num_computed_tokens: int = 0  # tokens whose KV is written or scheduled to be written
    pages: tuple[int, ...] = ()  # covers num_computed_tokens
    num_inflight: int = 0  # tokens sampled by a launched step that postprocess has not seen yet
    beam: Beam | None = None  # set on every sequence of a beam-search request

    @property
    def request_id(self) -> int:
        """The sequence's id: its request's, or a beam's own id from Request.beam_ids."""
        return self.request.request_id if self.beam is None else self.beam.seq_id

    @property
    def num_known_tokens(self) -> int:
        """Prompt plus output tokens whose values the host has."""
        return len(self.request.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus output tokens, in-flight ones included."""
        return self.num_known_tokens + self.num_inflight


@dataclass(frozen=True, slots=True, kw_only=True)
class SchedulerState:
    """Everything the scheduler knows between steps."""

    pool: PagePool
    waiting: tuple[SequenceState, ...] = ()  # FCFS queue; preempted sequences go back to the front
    running: tuple[SequenceState, ...] = ()  # oldest admission first
    step: int = 0
    num_preemptions: int = 0


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


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduledBatch:
    """What one step computes."""

    seqs: tuple[ScheduledSeq, ...] = ()
    preempted: tuple[int, ...] = ()  # sequence ids preempted this step (their KV pages are gone)
    # (src, dst): copy KV page src to the fresh page dst before the step runs (a forked beam's partial page).
    page_copies: tuple[tuple[int, int], ...] = ()

    @property
    def num_tokens(self) -> int:
        """Tokens fed this step."""
        return sum(len(s.token_ids) for s in self.seqs)


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenEvent:
    """New tokens of one request, and why it finished if it did."""

    request_id: int
    new_token_ids: tuple[int, ...]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop token id; None for EOS, length and aborts
    hypotheses: tuple[Hypothesis, ...] = ()  # beam search, on its final event: the best hypotheses, best first


# Positional constructors for the records built for every sequence on every step (llmfx/records.py says why).
_sequence = positional_builder(SequenceState)  # request, output_token_ids, num_computed_tokens, pages, num_inflight, beam
_scheduled_seq = positional_builder(ScheduledSeq)  # request_id, token_ids, start_pos, pages, sample
_token_event = positional_builder(TokenEvent)  # request_id, new_token_ids, finish_reason, stop_reason, hypotheses


class _TokenTuples(dict):
    """token -> (token,), filled on first use; a hit is one C-level lookup, no Python frame."""

    def __missing__(self, token: int) -> tuple[int]:
        t = self[token] = (token,)
        return t


# one_token(token) -> (token,), the same tuple object for equal tokens. Decode chunks (token_slice) and token
# events share these: one tuple per vocabulary entry instead of two new ones per sequence per step. Every new
# tuple counts toward the cyclic GC's next collection; a cached tuple of ints is untracked by the first
# collection that sees it.
one_token = _TokenTuples().__getitem__


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


def rows_in_use(running: Iterable[SequenceState]) -> int:
    """Batch rows the running requests may occupy: one a sequence, beam_width a beam group from its admission."""
    rows, groups = 0, set()
    for s in running:
        if s.beam is None:
            rows += 1
        elif s.request.request_id not in groups:
            groups.add(s.request.request_id)
            rows += s.request.batch_rows
    return rows


def reserved_pages(running: Iterable[SequenceState], limits: SchedulerLimits) -> int:
    """Pages the running requests may still allocate: worst case less the distinct pages each holds."""
    total = 0
    groups: dict[int, tuple[Request, set[int]]] = {}
    for s in running:
        if s.beam is None:
            total += max(0, worst_case_pages(s.request, limits) - len(s.pages))
        else:
            groups.setdefault(s.request.request_id, (s.request, set()))[1].update(s.pages)
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
    known = {i for s in state.waiting + state.running for i in s.request.sequence_ids}
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


def token_slice(seq: SequenceState, start: int, stop: int) -> tuple[int, ...]:
    """Tokens [start, stop) of prompt + output without building the whole list; in-flight ones are PLACEHOLDER."""
    prompt, output = seq.request.prompt_token_ids, seq.output_token_ids
    p = len(prompt)
    known = p + len(output)
    if stop == start + 1 and stop <= known:  # a decode's token: its interned tuple, no new object
        return one_token(output[start - p] if start >= p else prompt[start])
    if stop > known:  # a decode under overlap: its one token is still in flight ((x,) * 1 is x: no new object)
        tail = (PLACEHOLDER,) * (stop - max(start, known))
        return tail if start >= known else token_slice(seq, start, known) + tail
    if stop <= p:
        return prompt[start:stop]
    if start >= p:
        return output[start - p : stop - p]
    return prompt[start:] + output[: stop - p]



@dataclass(frozen=True, slots=True)
class _TokenPrefix(Sequence):
    """Tokens [0, end) of a sequence, sliced on demand: registering a new page reads only its own tokens,
    not the whole context."""

    seq: SequenceState
    end: int

    def __len__(self) -> int:
        return self.end

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(self.end)
            assert step == 1, "_TokenPrefix slices with step 1 only"
            return token_slice(self.seq, start, max(start, stop))
        if not -self.end <= index < self.end:
            raise IndexError(index)
        index %= self.end
        return token_slice(self.seq, index, index + 1)[0]

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
    pool, ps = state.pool, limits.page_size
    # Every running sequence can progress by one token; that may need one new page, or a copy of a shared one.
    needs: list[int] = []
    copied: dict[int, int] = {}
    for s in state.running:
        source = _copy_source(pool, s, ps, copied)
        if source is not None:
            copied[source] = copied.get(source, 0) + 1
        needs.append(pages_for_tokens(s.num_computed_tokens + 1, ps) - len(s.pages) + (source is not None))
    available, total = num_available(pool), sum(needs)
    preempt: list[int] = []
    groups = _request_groups(state.running)  # a beam group is preempted whole, so it is one victim
    while total > available and len(groups) > 1:  # the oldest request always keeps running
        members = groups.pop()
        total -= sum(needs[i] for i in members)
        held = collections.Counter(p for i in members for p in state.running[i].pages)
        available += sum(1 for p, n in held.items() if pool.refcounts[p] == n)  # pages only this request holds
        preempt.append(state.running[members[0]].request_id)
    if preempt:
        return Plan(preempt=tuple(preempt))  # admitting now would only thrash
    available -= total
    rows = rows_in_use(state.running)
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
    prefilling = {s.request_id for s in state.waiting}
    prefilling.update(s.request_id for s in state.running if not s.output_token_ids)
    waiting = tuple(s for s in state.waiting if s.request.prefill_after not in prefilling)
    return dataclasses.replace(state, waiting=waiting)


def _request_groups(running: Sequence[SequenceState]) -> list[list[int]]:
    """Indices into running per request, oldest first: a beam group's sequences form one entry."""
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(running):
        groups.setdefault(s.request.request_id, []).append(i)
    return list(groups.values())


def _preempt(state: SchedulerState, seq_ids: Iterable[int]) -> tuple[SchedulerState, tuple[int, ...]]:
    """Recompute-preemption: free pages, requeue at the front of waiting, keep generated tokens.

    A beam is preempted with its whole group, which restarts its search from the prompt: the search
    is deterministic, so it finds the same hypotheses again.
    """
    ids = set(seq_ids)
    if not ids:
        return state, ()
    unknown = ids - {s.request_id for s in state.running}
    if unknown:
        raise ValueError(f"capacity policy asked to preempt request ids that are not running: {sorted(unknown)}")
    groups = {s.request.request_id for s in state.running if s.beam is not None and s.request_id in ids}
    gone = tuple(s for s in state.running if s.request_id in ids or (s.beam is not None
                                                                        and s.request.request_id in groups))
    # Tail pages first, so that shared prefixes stay cached longest.
    pool = release(state.pool, (p for s in gone for p in reversed(s.pages)))
    requeued: list[SequenceState] = []
    for s in gone:
        if s.beam is None:
            # An in-flight token is dropped: the recompute samples it again at the same position.
            requeued.append(dataclasses.replace(s, num_computed_tokens=0, pages=(), num_inflight=0))
        elif s.request.request_id in groups:
            groups.discard(s.request.request_id)
            requeued.append(_new_sequence(s.request))
    gone_ids = {s.request_id for s in gone}
    state = dataclasses.replace(
        state,
        pool=pool,
        running=tuple(s for s in state.running if s.request_id not in gone_ids),
        waiting=tuple(requeued) + state.waiting,
        num_preemptions=state.num_preemptions + len(gone),
    )
    return state, tuple(s.request_id for s in gone)


def _copy_source(pool: PagePool, seq: SequenceState, ps: int, copied: Mapping[int, int]) -> int | None:
    """The partial last page seq writes next if another sequence still holds it (seq must write a copy), else None.

    Only forked beams share a partial page (prefix hits share full pages only), so other sequences
    skip the refcount lookup. `copied` counts the holders already planned to copy a page this step:
    the last holder writes in place.
    """
    if seq.beam is None or seq.num_computed_tokens % ps == 0:
        return None
    page = seq.pages[-1]
    return page if pool.refcounts[page] - copied.get(page, 0) > 1 else None


def _plan_running(state: SchedulerState,
                  limits: SchedulerLimits) -> tuple[list[tuple[int, int, int, bool]], int, bool]:
    """(running index, tokens, new pages, copies its last page) per scheduled sequence, total new pages, and
    whether any starved for pages."""
    ps, budget, available = limits.page_size, limits.max_num_tokens, num_available(state.pool)
    max_seq_len = limits.max_seq_len
    # Decodes are planned as they are met, in running order, so they come before every prefill.
    plan: list[tuple[int, int, int, bool]] = []
    prefills: list[tuple[int, int, int]] = []
    num_decodes = new_pages = 0
    copied: dict[int, int] = {}
    for i, s in enumerate(state.running):
        # Locals, not properties: this runs per sequence per step.
        inflight, outputs, request = s.num_inflight, len(s.output_token_ids), s.request
        num_tokens = len(request.prompt_token_ids) + outputs + inflight
        # Nothing to schedule while a token is in flight that already reaches max_tokens or max_seq_len,
        # or while a beam's is (its next token is chosen once its group's candidates are back).
        if inflight and (s.beam is not None or outputs + inflight >= request.params.max_tokens
                         or num_tokens >= max_seq_len):
            continue
        computed = s.num_computed_tokens
        left = num_tokens - computed
        if left > 1:
            prefills.append((i, computed, left))
            continue
        if left < 1:
            continue
        num_decodes += 1
        source = None if s.beam is None else _copy_source(state.pool, s, ps, copied)
        need = 1 if computed == len(s.pages) * ps or source is not None else 0
        if need > available or budget == 0:
            continue
        if source is not None:
            copied[source] = copied.get(source, 0) + 1
        plan.append((i, 1, need, source is not None))
        budget, available, new_pages = budget - 1, available - need, new_pages + need
    stalled = len(plan) < num_decodes and budget > 0
    for i, computed, left in prefills:
        num_pages = len(state.running[i].pages)
        # Running prefills are always chunkable: a non-chunked prompt ran whole at admission.
        n = min(left, budget, (num_pages + available) * ps - computed)
        if n <= 0:
            stalled |= budget > 0
            continue
        need = pages_for_tokens(computed + n, ps) - num_pages
        plan.append((i, n, need, False))
        budget, available, new_pages = budget - n, available - need, new_pages + need
    if prefills:
        plan.sort()
    return plan, new_pages, stalled


def schedule(
    state: SchedulerState, inbox: Iterable[Request], limits: SchedulerLimits, cfg: SchedulerConfig
) -> tuple[SchedulerState, ScheduledBatch]:
    """One step: admit, preempt and allocate pages under max_num_tokens and max_batch_size."""
    state = add_requests(state, inbox, limits, cfg)
    policy = resolve_policy(cfg)
    # Policies see only the waiting requests that may start now.
    plan = policy(_without_gated(state), limits)
    state, preempted = _preempt(state, plan.preempt)
    chunks, new_pages, stalled = _plan_running(state, limits)
    while stalled and not chunks and len(_request_groups(state.running)) > 1:
        # Liveness guard for policies that let every running sequence starve for pages.
        state, more = _preempt(state, (state.running[-1].request_id,))
        preempted += more
        chunks, new_pages, stalled = _plan_running(state, limits)
    pool, fresh = allocate(state.pool, new_pages)
    running = list(state.running)
    scheduled: list[ScheduledSeq] = []
    copies: list[tuple[int, int]] = []
    budget, used = limits.max_num_tokens, 0
    for i, n, need, copy in chunks:
        s = running[i]
        pages = s.pages
        if copy:  # the step writes into a private copy of the shared partial page, made before it runs
            copies.append((pages[-1], fresh[used]))
            pages = pages[:-1]
        if need:
            pages = pages + fresh[used : used + need]
        used += need
        chunk = _scheduled(s, n, pages)
        running[i] = _sequence(s.request, s.output_token_ids, s.num_computed_tokens + n, pages,
                               s.num_inflight + chunk.sample, s.beam)
        scheduled.append(chunk)
        budget -= n
    assert used == len(fresh)
    if copies:  # each copier gives up its reference; a holder stays, so nothing is freed here
        pool = release(pool, (src for src, _ in copies))

    waiting = state.waiting
    admitted: list[SequenceState] = []
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
            scheduled.append(chunk)
            s = dataclasses.replace(s, num_computed_tokens=cached + n, num_inflight=s.num_inflight + chunk.sample)
            running.append(s)
            admitted.append(s)
            budget -= n
            rows += s.request.batch_rows
        if admitted:
            ids = {s.request_id for s in admitted}
            k = len(admitted)
            if all(waiting[j].request_id in ids for j in range(k)):  # the FCFS common case
                waiting = waiting[k:]
            else:
                waiting = tuple(s for s in waiting if s.request_id not in ids)
    state = dataclasses.replace(state, pool=pool, running=tuple(running), waiting=waiting, step=state.step + 1)
    return state, ScheduledBatch(seqs=tuple(scheduled), preempted=preempted, page_copies=tuple(copies))


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


def _stop(request: Request, token: int, num_out: int, max_seq_len: int) -> tuple[str, int | None] | None:
    """(finish_reason, stop_reason) once a sequence whose num_out-th output token is token must finish, else None."""
    params = request.params
    # The value checks first only for the tokens that could stop it: this runs for every sequence every step.
    stop = (_stop_token(request, token, num_out)
            if token in request.eos_token_ids or token in params.stop_token_ids else None)
    if stop is None and (num_out >= params.max_tokens or len(request.prompt_token_ids) + num_out >= max_seq_len):
        return "length", None
    return stop


def postprocess(
    state: SchedulerState, batch: ScheduledBatch, sampled: Mapping[int, int], limits: SchedulerLimits,
    candidates: Mapping[int, Candidates] = MappingProxyType({}),
) -> tuple[SchedulerState, tuple[TokenEvent, ...]]:
    """Append sampled tokens, register computed full pages, finish stopped requests and free their pages.

    Beams take their step's candidates (sequence id -> top tokens) instead of a token; once every
    beam of a group has them, the group chooses its next beams (`_step_beams`).
    """
    index = {s.request.request_id if s.beam is None else s.beam.seq_id: i for i, s in enumerate(state.running)}
    running = list(state.running)
    ps, max_seq_len, register = limits.page_size, limits.max_seq_len, state.pool.enable_prefix_cache
    to_register: list[tuple[_TokenPrefix, tuple[int, ...]]] = []
    events: list[TokenEvent] = []
    finished: set[int] = set()
    beam_groups: set[int] = set()
    for ss in batch.seqs:
        i = index.get(ss.request_id)
        if i is None:
            continue  # aborted or preempted since it was scheduled
        s = running[i]
        end = ss.start_pos + len(ss.token_ids)
        if register and end // ps > ss.start_pos // ps:
            to_register.append((_TokenPrefix(s, end), s.pages))
        if not ss.sample:
            continue
        assert s.num_inflight > 0, "postprocess got a token the scheduler did not expect"
        if s.beam is not None:
            assert ss.request_id in candidates, f"beam {ss.request_id} got no candidates"
            running[i] = dataclasses.replace(s, num_inflight=s.num_inflight - 1,
                                             beam=dataclasses.replace(s.beam, candidates=candidates[ss.request_id]))
            beam_groups.add(s.request.request_id)
            continue
        token = sampled[ss.request_id]
        output = append_token(s.output_token_ids, token)
        running[i] = _sequence(s.request, output, s.num_computed_tokens, s.pages, s.num_inflight - 1, None)
        stop = _stop(s.request, token, len(output), max_seq_len)
        if stop is None:
            events.append(_token_event(ss.request_id, one_token(token), None, None, ()))
        else:
            finished.add(i)
            events.append(_token_event(ss.request_id, one_token(token), stop[0], stop[1], ()))
    pool = register_pages(state.pool, to_register)
    if finished:
        pool = release(pool, (p for i in sorted(finished) for p in reversed(running[i].pages)))
    replaced: dict[int, list[SequenceState]] = {}  # running index -> what takes its place
    if beam_groups:
        members: dict[int, list[int]] = {}
        for i, s in enumerate(running):
            if s.beam is not None and s.request.request_id in beam_groups:
                members.setdefault(s.request.request_id, []).append(i)
        for group in members.values():
            beams = [running[i] for i in group]
            if any(b.beam.candidates is None for b in beams):
                continue  # a beam of the group has not run this token yet
            pool, forks, event = _step_beams(pool, beams, limits)
            replaced.update({i: [] for i in group})
            replaced[group[0]] = forks  # the group keeps its place in the admission order
            if event is not None:
                events.append(event)
    if finished or replaced:
        kept: list[SequenceState] = []
        for i, s in enumerate(running):
            if i in replaced:
                kept.extend(replaced[i])
            elif i not in finished:
                kept.append(s)
        running = kept
    return dataclasses.replace(state, pool=pool, running=tuple(running)), tuple(events)


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
    gone_running = [s for s in state.running if s.request.request_id in ids]
    gone_waiting = [s for s in state.waiting if s.request.request_id in ids]
    if not gone_running and not gone_waiting:
        return state, ()
    # Not registered: after a failed step the KV of these pages may be garbage.
    pool = release(state.pool, (p for s in gone_running for p in reversed(s.pages)))
    state = dataclasses.replace(
        state,
        pool=pool,
        running=tuple(s for s in state.running if s.request.request_id not in ids),
        waiting=tuple(s for s in state.waiting if s.request.request_id not in ids),
    )
    ended = dict.fromkeys(s.request.request_id for s in gone_running + gone_waiting)
    return state, tuple(TokenEvent(request_id=rid, new_token_ids=(), finish_reason=reason) for rid in ended)
