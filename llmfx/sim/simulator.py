"""The discrete-event simulator: the engine's own add_requests/schedule/postprocess/abort, with time from a cost model.

Each step is what `llmfx.executor.step` does without the model: requests that arrived by the
step's start enter the scheduler, aborts due by then are applied, `schedule` picks the batch, the
cost model says how long it runs, and `postprocess` takes fake sampled tokens. A simulated request
ends by length (`max_tokens=output_len`) or, given a larger max_tokens, by a stop token sampled at
its output_len-th token, as EOS would; fake tokens are unique per request and position, so they
never create prefix-cache hits and never stop a request early.

With overlap (the engine's default) the order is the executor's: step k schedules batch k, then
postprocesses batch k-1, so finished requests free their pages one step late and a new token is
known one step after its batch was scheduled. Step k lasts cost(batch k-1): it ends when the
device finishes the batch it collects (the cost model's host terms cover the loop's own work).
A batch launched after an idle loop, with nothing to collect yet, takes no time until collected.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from llmfx.kv_cache import new_page_pool, num_available, pages_for_tokens
from llmfx.sampling_params import SamplingParams
from llmfx.scheduler import (
    Request,
    ScheduledBatch,
    SchedulerConfig,
    SchedulerLimits,
    abort,
    add_requests,
    has_work,
    new_scheduler_state,
    postprocess,
    schedule,
    validate_request,
)
from llmfx.sim.arrivals import SimRequest
from llmfx.sim.cost_model import BatchShape, CostModel, default_cost_model
from llmfx.sim.metrics import RequestRecord, SimResult, StepRecord

# Steps in a row that schedule nothing, with no arrival left to wait for, before the run is declared stuck.
_STUCK_STEPS = 1000


@dataclass(frozen=True, slots=True, kw_only=True)
class SimConfig:
    """The engine being simulated: scheduler limits and settings, and the KV pool's size in pages."""

    limits: SchedulerLimits
    scheduler: SchedulerConfig = dataclasses.field(default_factory=SchedulerConfig)
    num_pages: int  # including the null page, as the engine allocates it
    enable_prefix_cache: bool = True
    overlap: bool = True  # the executor's overlap scheduler (LLM's disable_overlap_scheduler=False)

    def __post_init__(self) -> None:
        if isinstance(self.num_pages, bool) or not isinstance(self.num_pages, int) or self.num_pages < 2:
            raise ValueError(f"SimConfig.num_pages must be an integer >= 2 (page 0 is the null page), "
                             f"got {self.num_pages!r}")
        if not isinstance(self.overlap, bool):
            raise ValueError(f"SimConfig.overlap must be a bool, got {self.overlap!r}")

    @staticmethod
    def build(*, policy: str | Callable = "guaranteed_no_evict", max_batch_size: int = 256,
              max_num_tokens: int = 8192, max_seq_len: int = 2048, kv_tokens: int = 65536, page_size: int = 16,
              enable_prefix_cache: bool = True, enable_chunked_prefill: bool = True,
              disable_overlap_scheduler: bool = False) -> SimConfig:
        """A config with LLM(...)'s argument names; kv_tokens is KvCacheConfig.max_tokens."""
        if isinstance(kv_tokens, bool) or not isinstance(kv_tokens, int) or kv_tokens < 1:
            raise ValueError(f"kv_tokens must be an integer >= 1, got {kv_tokens!r}")
        limits = SchedulerLimits(max_batch_size=max_batch_size, max_num_tokens=max_num_tokens,
                                 max_seq_len=max_seq_len, page_size=page_size)
        return SimConfig(limits=limits, num_pages=max(2, pages_for_tokens(kv_tokens, page_size)),
                         enable_prefix_cache=enable_prefix_cache, overlap=not disable_overlap_scheduler,
                         scheduler=SchedulerConfig(capacity_scheduler_policy=policy,
                                                   enable_chunked_prefill=enable_chunked_prefill))


def fake_token(request_id, position):
    """The token 'sampled' at a position: unique per request, continuing SimRequest.tokens() (ints, or int64
    arrays of ids and positions)."""
    return ((request_id + 1) << 32) + position


def to_request(r: SimRequest) -> Request:
    """The engine request a SimRequest stands for: greedy, EOS ignored, ending after output_len tokens by
    length, or (max_tokens given) by the stop token fake_token puts at its last position."""
    stop = () if r.max_tokens is None else (fake_token(r.request_id, r.prompt_len + r.output_len - 1),)
    params = SamplingParams(max_tokens=r.max_tokens or r.output_len, stop_token_ids=stop, ignore_eos=True,
                            temperature=0.0, detokenize=False)
    return Request(request_id=r.request_id, prompt_token_ids=r.tokens(), params=params, arrival_time=r.arrival_time)


def simulate(requests: Iterable[SimRequest], cfg: SimConfig, cost_model: CostModel | None = None, *,
             keep_batches: bool = False) -> SimResult:
    """Run requests through the real scheduler in simulated time; cost_model defaults to the shipped profile."""
    cost_model = cost_model or default_cost_model()
    reqs = sorted(requests, key=lambda r: r.arrival_time)
    if not reqs:
        raise ValueError("simulate needs at least one request")
    ids = [r.request_id for r in reqs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"request ids must be unique; {next(i for i in ids if ids.count(i) > 1)} repeats")
    engine_reqs = [to_request(r) for r in reqs]
    for r in engine_reqs:  # fail before simulating anything, naming the request and the limit
        validate_request(r, cfg.limits, cfg.scheduler, cfg.num_pages)
    aborts = sorted((r.abort_time, r.request_id) for r in reqs if r.abort_time is not None)

    lim = cfg.limits
    state = new_scheduler_state(new_page_pool(cfg.num_pages, lim.page_size, cfg.enable_prefix_cache))
    track = {r.request_id: dict(first_scheduled_time=None, first_token_time=None, finish_time=None,
                                finish_reason=None, num_output_tokens=0, num_preemptions=0) for r in reqs}
    unscheduled = set(track)  # requests not scheduled yet: their first_scheduled_time is still to set
    steps: list[StepRecord] = []
    batches: list[ScheduledBatch] = []
    t, i, a, idle = 0.0, 0, 0, 0
    pending: ScheduledBatch | None = None  # overlap: launched, not yet postprocessed
    preempted = 0  # preemptions of a launch-only iteration, reported with the next step
    usable = cfg.num_pages - 1
    while True:
        start = i
        while i < len(reqs) and reqs[i].arrival_time <= t:
            i += 1
        state = add_requests(state, engine_reqs[start:i], lim, cfg.scheduler)
        due = []
        while a < len(aborts) and aborts[a][0] <= t:
            due.append(aborts[a][1])
            a += 1
        if due:
            state, ended = abort(state, due)
            for e in ended:
                track[e.request_id].update(finish_time=t, finish_reason=e.finish_reason)
        if not has_work(state) and pending is None:
            if i == len(reqs):
                break
            t = reqs[i].arrival_time
            continue
        state, batch = schedule(state, (), lim, cfg.scheduler)
        preempted += len(batch.preempted)
        for rid in batch.preempted:
            track[rid]["num_preemptions"] += 1
        for rid in unscheduled.intersection(batch.columns.ids.tolist()):
            track[rid]["first_scheduled_time"] = t
            unscheduled.discard(rid)
        if keep_batches:
            batches.append(batch)
        if cfg.overlap:
            done, pending = pending, (batch if batch.num_seqs else None)
            if done is None and pending is not None:
                continue  # launched after an idle loop: its time is charged when the next step collects it
        else:
            done = batch
        # `done` is the batch this step waits for and postprocesses; None or empty: the loop idles.
        shape = BatchShape.of(done) if done is not None else BatchShape()
        duration = cost_model.step_time(shape)
        end = t + duration
        finished = 0
        if done is not None and done.num_seqs:
            idle = 0
            c = done.columns
            ids = c.ids[c.samples]
            sampled = dict(zip(ids.tolist(), fake_token(ids, (c.starts + c.counts)[c.samples]).tolist()))
            state, events = postprocess(state, done, sampled, lim)
            for e in events:
                rec = track[e.request_id]
                if e.new_token_ids:
                    rec["num_output_tokens"] += len(e.new_token_ids)
                    if rec["first_token_time"] is None:
                        rec["first_token_time"] = end
                if e.finish_reason is not None:
                    rec.update(finish_time=end, finish_reason=e.finish_reason)
                    finished += 1
        else:
            idle += 1
            if idle >= 2 and i < len(reqs):  # the policy waits: let time pass until the next arrival
                end = max(end, reqs[i].arrival_time)
            elif idle >= _STUCK_STEPS:
                raise RuntimeError(
                    f"simulation stuck: the capacity policy scheduled nothing for {idle} steps with "
                    f"{len(state.waiting)} waiting and {len(state.running)} running requests and no more arrivals")
        pool = state.pool
        steps.append(StepRecord(
            step=len(steps), start_time=t, duration=duration, num_seqs=0 if done is None else done.num_seqs,
            prefill_tokens=shape.prefill_tokens, decode_seqs=shape.decode_seqs, context_tokens=shape.context_tokens,
            num_waiting=len(state.waiting), num_running=len(state.running), kv_pages_used=len(pool.refcounts),
            kv_pages_cached=len(pool.evictable), kv_usage=(usable - num_available(pool)) / usable,
            preempted=preempted, finished=finished))
        preempted = 0
        t = end

    records = tuple(RequestRecord(request_id=r.request_id, arrival_time=r.arrival_time, prompt_len=r.prompt_len,
                                  output_len=r.output_len, **track[r.request_id]) for r in reqs)
    p = cfg.scheduler.capacity_scheduler_policy
    return SimResult(requests=records, steps=tuple(steps), batches=tuple(batches),
                     policy=p if isinstance(p, str) else getattr(p, "__name__", repr(p)))
