"""The pure scheduler: continuous batching, chunked prefill, prefix-cache admission, capacity policies."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from llmfx.kv_cache import PagePool, allocate, match_prefix, num_available, pages_for_tokens, register_pages, release
from llmfx.sampling_params import SamplingParams

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
class SequenceState:
    """One request inside the scheduler."""

    request: Request
    output_token_ids: tuple[int, ...] = ()
    num_computed_tokens: int = 0  # tokens whose KV is written or scheduled to be written
    pages: tuple[int, ...] = ()  # covers num_computed_tokens
    num_inflight: int = 0  # tokens sampled by a launched step that postprocess has not seen yet

    @property
    def request_id(self) -> int:
        """The request's id."""
        return self.request.request_id

    @property
    def num_known_tokens(self) -> int:
        """Prompt plus output tokens whose values the host has."""
        return len(self.request.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus output tokens, in-flight ones included."""
        return self.num_known_tokens + self.num_inflight

    def finishing(self, limits: SchedulerLimits) -> bool:
        """True when the in-flight tokens already reach max_tokens or max_seq_len: nothing more to schedule."""
        outputs = len(self.output_token_ids) + self.num_inflight
        return self.num_inflight > 0 and (outputs >= self.request.params.max_tokens
                                          or self.num_tokens >= limits.max_seq_len)


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

    request_id: int
    token_ids: tuple[int, ...]  # a prefill chunk, or the last token for decode
    start_pos: int  # position of token_ids[0] == tokens already in the KV cache
    pages: tuple[int, ...]  # the whole page list, covering start_pos + len(token_ids)
    sample: bool  # the chunk reaches the end of the known tokens: a new token is sampled


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduledBatch:
    """What one step computes."""

    seqs: tuple[ScheduledSeq, ...] = ()
    preempted: tuple[int, ...] = ()  # request ids preempted this step (their KV pages are gone)

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


def new_scheduler_state(pool: PagePool) -> SchedulerState:
    """An idle scheduler over a page pool."""
    return SchedulerState(pool=pool)


def has_work(state: SchedulerState) -> bool:
    """True while any request waits or runs."""
    return bool(state.waiting or state.running)


def worst_case_pages(request: Request, limits: SchedulerLimits) -> int:
    """Pages a request holds at most: prompt + max_tokens capped by max_seq_len (one spare slot for overlap)."""
    total = min(len(request.prompt_token_ids) + request.params.max_tokens, limits.max_seq_len)
    return pages_for_tokens(total, limits.page_size)


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
    known = {s.request_id for s in state.waiting} | {s.request_id for s in state.running}
    for r in requests:
        validate_request(r, limits, cfg, state.pool.num_pages)
        if r.request_id in known:
            raise ValueError(f"request_id {r.request_id} is already in the scheduler")
        known.add(r.request_id)
    new = tuple(SequenceState(request=r) for r in requests)
    return dataclasses.replace(state, waiting=state.waiting + new)


def token_slice(seq: SequenceState, start: int, stop: int) -> tuple[int, ...]:
    """Tokens [start, stop) of prompt + output without building the whole list; in-flight ones are PLACEHOLDER."""
    known = seq.num_known_tokens
    if stop > known:
        return token_slice(seq, start, known) + (PLACEHOLDER,) * (stop - max(start, known))
    prompt, p = seq.request.prompt_token_ids, len(seq.request.prompt_token_ids)
    if stop <= p:
        return prompt[start:stop]
    if start >= p:
        return seq.output_token_ids[start - p : stop - p]
    return prompt[start:] + seq.output_token_ids[: stop - p]


# --- capacity policies: policy(state, limits) -> Plan; schedule enforces budgets ---


def guaranteed_no_evict(state: SchedulerState, limits: SchedulerLimits) -> Plan:
    """Strict FCFS; admit only if the whole worst case fits beside what running requests reserved; never preempt."""
    if not state.waiting or len(state.running) >= limits.max_batch_size:
        return Plan()  # nothing could be admitted: skip summing the running requests' reservations
    pool = state.pool
    reserved = sum(max(0, worst_case_pages(s.request, limits) - len(s.pages)) for s in state.running)
    seats = limits.max_batch_size - len(state.running)
    admit: list[int] = []
    for seq in state.waiting[: max(seats, 0)]:
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
    # Every running sequence can progress by one token; that may need one new page.
    needs = [pages_for_tokens(s.num_computed_tokens + 1, ps) - len(s.pages) for s in state.running]
    available, total = num_available(pool), sum(needs)
    preempt: list[int] = []
    victims = list(state.running)
    while total > available and len(victims) > 1:
        victim = victims.pop()
        total -= needs.pop()
        available += sum(1 for p in victim.pages if pool.refcounts[p] == 1)
        preempt.append(victim.request_id)
    if preempt:
        return Plan(preempt=tuple(preempt))  # admitting now would only thrash
    available -= total
    seats = limits.max_batch_size - len(state.running)
    admit: list[int] = []
    for seq in state.waiting[: max(seats, 0)]:
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


def _preempt(state: SchedulerState, request_ids: Iterable[int]) -> tuple[SchedulerState, tuple[int, ...]]:
    """Recompute-preemption: free pages, requeue at the front of waiting, keep generated tokens."""
    ids = set(request_ids)
    if not ids:
        return state, ()
    gone = tuple(s for s in state.running if s.request_id in ids)
    if len(gone) != len(ids):
        raise ValueError(f"capacity policy asked to preempt request ids that are not running: {sorted(ids)}")
    # Tail pages first, so that shared prefixes stay cached longest.
    pool = release(state.pool, (p for s in gone for p in reversed(s.pages)))
    # An in-flight token is dropped: the recompute samples it again at the same position.
    requeued = tuple(dataclasses.replace(s, num_computed_tokens=0, pages=(), num_inflight=0) for s in gone)
    state = dataclasses.replace(
        state,
        pool=pool,
        running=tuple(s for s in state.running if s.request_id not in ids),
        waiting=requeued + state.waiting,
        num_preemptions=state.num_preemptions + len(gone),
    )
    return state, tuple(s.request_id for s in gone)


def _plan_running(state: SchedulerState, limits: SchedulerLimits) -> tuple[list[tuple[int, int, int]], int, bool]:
    """(running index, tokens, new pages) per scheduled sequence, total new pages, and whether any starved for pages."""
    ps, budget, available = limits.page_size, limits.max_num_tokens, num_available(state.pool)
    decodes: list[tuple[int, int, int]] = []
    prefills: list[tuple[int, int, int]] = []
    for i, s in enumerate(state.running):
        if s.finishing(limits):
            continue  # its last token is in flight; postprocess will finish it
        computed = s.num_computed_tokens
        left = s.num_tokens - computed
        if left == 1:
            decodes.append((i, computed, len(s.pages)))
        elif left > 1:
            prefills.append((i, computed, left))
    plan: list[tuple[int, int, int]] = []
    new_pages = 0
    for i, computed, num_pages in decodes:
        need = 1 if computed == num_pages * ps else 0
        if need > available or budget == 0:
            continue
        plan.append((i, 1, need))
        budget, available, new_pages = budget - 1, available - need, new_pages + need
    stalled = len(plan) < len(decodes) and budget > 0
    for i, computed, left in prefills:
        num_pages = len(state.running[i].pages)
        # Running prefills are always chunkable: a non-chunked prompt ran whole at admission.
        n = min(left, budget, (num_pages + available) * ps - computed)
        if n <= 0:
            stalled |= budget > 0
            continue
        need = pages_for_tokens(computed + n, ps) - num_pages
        plan.append((i, n, need))
        budget, available, new_pages = budget - n, available - need, new_pages + need
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
    while stalled and not chunks and len(state.running) > 1:
        # Liveness guard for policies that let every running sequence starve for pages.
        state, more = _preempt(state, (state.running[-1].request_id,))
        preempted += more
        chunks, new_pages, stalled = _plan_running(state, limits)
    pool, fresh = allocate(state.pool, new_pages)
    running = list(state.running)
    scheduled: list[ScheduledSeq] = []
    budget, used = limits.max_num_tokens, 0
    for i, n, need in chunks:
        s = running[i]
        pages = s.pages + fresh[used : used + need] if need else s.pages
        used += need
        chunk = _scheduled(s, n, pages)
        running[i] = SequenceState(
            request=s.request,
            output_token_ids=s.output_token_ids,
            num_computed_tokens=s.num_computed_tokens + n,
            pages=pages,
            num_inflight=s.num_inflight + chunk.sample,
        )
        scheduled.append(chunk)
        budget -= n
    assert used == len(fresh)

    waiting = state.waiting
    admitted: list[SequenceState] = []
    if not preempted:  # admitting right after preempting would only thrash
        by_id = {s.request_id: s for s in waiting} if plan.admit else {}
        for rid in plan.admit:
            if len(running) >= limits.max_batch_size or budget <= 0:
                break
            s = by_id.get(rid)
            if s is None:
                raise ValueError(f"capacity policy asked to admit request id {rid}, which is not waiting")
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
        if admitted:
            ids = {s.request_id for s in admitted}
            k = len(admitted)
            if all(waiting[j].request_id in ids for j in range(k)):  # the FCFS common case
                waiting = waiting[k:]
            else:
                waiting = tuple(s for s in waiting if s.request_id not in ids)
    state = dataclasses.replace(state, pool=pool, running=tuple(running), waiting=waiting, step=state.step + 1)
    return state, ScheduledBatch(seqs=tuple(scheduled), preempted=preempted)


def _scheduled(seq: SequenceState, n: int, pages: tuple[int, ...]) -> ScheduledSeq:
    start = seq.num_computed_tokens
    return ScheduledSeq(
        request_id=seq.request.request_id,
        token_ids=token_slice(seq, start, start + n),
        start_pos=start,
        pages=pages,
        sample=start + n == len(seq.request.prompt_token_ids) + len(seq.output_token_ids) + seq.num_inflight,
    )


def _stop(seq: SequenceState, token: int, limits: SchedulerLimits) -> tuple[str, int | None] | None:
    """(finish_reason, stop_reason) once seq (which already ends with token) must finish, else None."""
    request = seq.request
    params = request.params
    num_out = len(seq.output_token_ids)  # locals, not properties: this runs for every sequence every step
    if num_out >= params.min_tokens:
        if not params.ignore_eos and token in request.eos_token_ids:
            return "stop", None
        if token in params.stop_token_ids:
            return "stop", token
    if num_out >= params.max_tokens or len(request.prompt_token_ids) + num_out >= limits.max_seq_len:
        return "length", None
    return None


def postprocess(
    state: SchedulerState, batch: ScheduledBatch, sampled: Mapping[int, int], limits: SchedulerLimits
) -> tuple[SchedulerState, tuple[TokenEvent, ...]]:
    """Append sampled tokens, register computed full pages, finish stopped requests and free their pages."""
    index = {s.request_id: i for i, s in enumerate(state.running)}
    running = list(state.running)
    ps = limits.page_size
    to_register: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    events: list[TokenEvent] = []
    finished: set[int] = set()
    for ss in batch.seqs:
        i = index.get(ss.request_id)
        if i is None:
            continue  # aborted or preempted since it was scheduled
        s = running[i]
        end = ss.start_pos + len(ss.token_ids)
        if state.pool.enable_prefix_cache and end // ps > ss.start_pos // ps:
            to_register.append((token_slice(s, 0, end), s.pages))
        if not ss.sample:
            continue
        token = sampled[ss.request_id]
        assert s.num_inflight > 0, "postprocess got a token the scheduler did not expect"
        s = SequenceState(
            request=s.request,
            output_token_ids=s.output_token_ids + (token,),
            num_computed_tokens=s.num_computed_tokens,
            pages=s.pages,
            num_inflight=s.num_inflight - 1,
        )
        running[i] = s
        stop = _stop(s, token, limits)
        if stop is not None:
            finished.add(i)
        events.append(
            TokenEvent(
                request_id=s.request_id,
                new_token_ids=(token,),
                finish_reason=None if stop is None else stop[0],
                stop_reason=None if stop is None else stop[1],
            )
        )
    pool = register_pages(state.pool, to_register)
    if finished:
        pool = release(pool, (p for i in sorted(finished) for p in reversed(running[i].pages)))
        running = [s for i, s in enumerate(running) if i not in finished]
    return dataclasses.replace(state, pool=pool, running=tuple(running)), tuple(events)


def abort(
    state: SchedulerState, request_ids: Iterable[int], reason: str = "abort"
) -> tuple[SchedulerState, tuple[TokenEvent, ...]]:
    """End waiting or running requests and free their pages; unknown ids are ignored."""
    if reason not in ("abort", "error"):
        raise ValueError(f"abort reason must be 'abort' or 'error', got {reason!r}")
    ids = set(request_ids)
    gone_running = [s for s in state.running if s.request_id in ids]
    gone_waiting = [s for s in state.waiting if s.request_id in ids]
    if not gone_running and not gone_waiting:
        return state, ()
    # Not registered: after a failed step the KV of these pages may be garbage.
    pool = release(state.pool, (p for s in gone_running for p in reversed(s.pages)))
    state = dataclasses.replace(
        state,
        pool=pool,
        running=tuple(s for s in state.running if s.request_id not in ids),
        waiting=tuple(s for s in state.waiting if s.request_id not in ids),
    )
    events = tuple(
        TokenEvent(request_id=s.request_id, new_token_ids=(), finish_reason=reason)
        for s in gone_running + gone_waiting
    )
    return state, events
