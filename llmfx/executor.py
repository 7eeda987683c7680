"""PyExecutor: the step function over explicit state, and the background thread that drives it.

`step(state, inbox, engine, cfg) -> (state, StepOutput)` is deterministic and can be driven by
hand (tests, notebooks, the simulator); `PyExecutor` runs the same step in a loop on its own thread,
fed by a thread-safe queue. No policy and no model code live here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from llmfx.kv_pool import KVPool
from llmfx.model_engine import InFlight, ModelEngine, SampledToken, StepFailed
from llmfx.scheduler import (
    Request,
    ScheduledBatch,
    SchedulerConfig,
    SchedulerLimits,
    SchedulerState,
    TokenEvent,
    abort,
    add_requests,
    has_work,
    postprocess,
    schedule,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AddRequest:
    """Inbox message: start serving a request."""

    request: Request


@dataclass(frozen=True, slots=True)
class AbortRequest:
    """Inbox message: end requests now ("abort"), or fail them ("error")."""

    request_ids: tuple[int, ...]
    reason: str = "abort"


Message = AddRequest | AbortRequest

# TensorRT-LLM's default for its executor loop (TorchLlmArgs.garbage_collection_gen0_threshold). At Python's 700 a
# batch-256 step runs young collections, and now and then one grows into a full one that walks every object in
# the process (torch, the compiled graphs): a decode step stalls for it (docs/ARCHITECTURE.md, "GC threshold").
DEFAULT_GC_GEN0_THRESHOLD = 20000


def check_gc_gen0_threshold(value: int | None) -> None:
    """Raise ValueError unless value is None (Python's thresholds left alone) or an integer >= 1."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"garbage_collection_gen0_threshold must be an integer >= 1 or None (leave Python's "
                         f"threshold), got {value!r}")


class _GcThresholds:
    """The serving loops' gen-0 thresholds: the newest running loop's holds; Python's returns with the last.

    Thresholds are process-wide and loops (one per LLM) start and stop in any order, so each one
    restoring what it found would leave a stopped loop's value behind, or drop a running loop's.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: list[tuple[object, int]] = []  # (loop token, its threshold), oldest first
        self._python: tuple[int, ...] = gc.get_threshold()

    def enter(self, token: object, value: int) -> None:
        with self._lock:
            if not self._active:
                self._python = gc.get_threshold()
            self._active.append((token, value))
            gc.set_threshold(value, *self._python[1:])

    def leave(self, token: object) -> None:
        with self._lock:
            self._active = [a for a in self._active if a[0] is not token]
            gc.set_threshold(*(self._python if not self._active else (self._active[-1][1], *self._python[1:])))


_GC_THRESHOLDS = _GcThresholds()


@contextlib.contextmanager
def gc_gen0_threshold(value: int | None):
    """Run the block with the cyclic GC's generation-0 threshold at value (process-wide); restore it after.

    Starts with one full collection: the warm-up's garbage goes and the GC's counters start from zero.
    Without it, the counts compiling at Python's 700 left behind can still bring a full collection
    early in serving: on the H200 one of three offline runs stalled 528 ms in one; with it, three
    runs had none. None: Python's GC is left alone.
    Blocks may overlap (several LLMs): the newest still running sets the threshold, and Python's
    comes back when the last one ends.
    """
    check_gc_gen0_threshold(value)
    if value is None:
        yield
        return
    gc.collect()
    token = object()
    _GC_THRESHOLDS.enter(token, value)
    try:
        yield
    finally:
        _GC_THRESHOLDS.leave(token)


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecutorConfig:
    """What the step needs besides state: engine limits and the scheduler's settings."""

    limits: SchedulerLimits
    scheduler: SchedulerConfig
    overlap: bool = True  # postprocess step n while step n+1 runs on the device


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecutorState:
    """The loop's state between steps. `kv` is DONATED: stepping this state spends it."""

    sched: SchedulerState
    kv: KVPool
    inflight: InFlight | None = None  # with overlap: the launched step whose tokens are not yet processed


@dataclass(frozen=True, slots=True, kw_only=True)
class StepOutput:
    """What one step produced: token events (with their logprobs), errors of failed requests, the batch launched."""

    events: tuple[TokenEvent, ...] = ()
    errors: Mapping[int, str] = dataclasses.field(default_factory=lambda: MappingProxyType({}))
    batch: ScheduledBatch = dataclasses.field(default_factory=ScheduledBatch)
    sampled: Mapping[int, SampledToken] = dataclasses.field(default_factory=lambda: MappingProxyType({}))
    collected: ScheduledBatch | None = None  # the batch postprocessed this step: the previous one with overlap
    launch_s: float = 0.0  # seconds in engine.launch (the whole computation where launching is synchronous: CPU)
    collect_s: float = 0.0  # seconds in engine.collect: waiting for the device, then reading the tokens


@dataclass(frozen=True, slots=True, kw_only=True)
class TracedBatch:
    """A batch as a step trace keeps it: counts, not sequences (keeping every batch alive would slow the GC)."""

    num_seqs: int
    num_tokens: int
    num_decode: int  # sequences fed exactly one token
    context_tokens: int  # sum over sequences of start_pos + tokens fed
    launch_s: float | None  # seconds engine.launch took; None when it was launched before the trace began

    @staticmethod
    def of(batch: ScheduledBatch, launch_s: float | None) -> TracedBatch:
        """The counts of a scheduled batch."""
        num_tokens, num_decode, context_tokens = batch.columns.token_counts()
        return TracedBatch(num_seqs=batch.num_seqs, num_tokens=num_tokens, num_decode=num_decode,
                           context_tokens=context_tokens, launch_s=launch_s)


@dataclass(frozen=True, slots=True, kw_only=True)
class StepTiming:
    """One iteration of the executor loop, as a trace records it (time.perf_counter seconds)."""

    start: float  # the inbox was drained (after any wait for work)
    end: float  # the step returned; its outputs were delivered after this
    waited_for_work: bool  # the loop had nothing to do and blocked on the inbox before this iteration
    launched: TracedBatch | None  # None: nothing was launched
    collected: TracedBatch | None  # None: nothing was postprocessed
    collect_s: float


def step(state: ExecutorState, inbox: Iterable[Message], engine: ModelEngine,
         cfg: ExecutorConfig) -> tuple[ExecutorState, StepOutput]:
    """Apply the inbox, schedule, launch; then postprocess the previous step (overlap) or this one.

    With overlap the host's stop checks and responses for step n run while the device runs step
    n+1; a request that finished at step n has run one extra step, whose token is dropped. Only a
    failing step's requests fail.
    """
    sched, kv = state.sched, state.kv
    events: list[TokenEvent] = []
    errors: dict[int, str] = {}
    for message in inbox:
        if isinstance(message, AbortRequest):
            sched, ended = abort(sched, message.request_ids, message.reason)
            events.extend(ended)
            continue
        try:
            sched = add_requests(sched, (message.request,), cfg.limits, cfg.scheduler)
        except ValueError as err:  # the front end validates first; this guards direct callers
            events.append(TokenEvent(request_id=message.request.request_id, new_token_ids=(), finish_reason="error"))
            errors[message.request.request_id] = str(err)
    sched, batch = schedule(sched, (), cfg.limits, cfg.scheduler)
    launched = None
    launch_s = 0.0
    if batch.num_seqs:
        sequences = sched.running.by_id()  # records built only for the rows the engine reads
        started = time.perf_counter()
        try:
            kv, launched = engine.launch(kv, batch, sequences)
        except StepFailed as failure:
            kv = failure.kv
            log.exception("step %d failed; failing its %d requests", sched.step, batch.num_seqs)
            failed = tuple(dict.fromkeys(sequences[i].request.request_id for i in batch.columns.ids.tolist()))
            sched, ended = abort(sched, failed, "error")
            events.extend(ended)
            errors.update({rid: str(failure) for rid in failed})
        launch_s = time.perf_counter() - started
    done, pending = (state.inflight, launched) if cfg.overlap else (launched, None)
    sampled: Mapping[int, SampledToken] = MappingProxyType({})
    collect_s = 0.0
    if done is not None:
        started = time.perf_counter()
        collected = engine.collect(done)
        collect_s = time.perf_counter() - started
        # Beams pick their next tokens from the top-20 (read back for beam rows and logprobs rows only).
        sched, produced = postprocess(sched, done.batch, collected.tokens, cfg.limits, collected.candidates)
        events.extend(produced)
        sampled = MappingProxyType(collected.sampled)  # read-only for the consumer; nothing else keeps the dict
    out = StepOutput(events=tuple(events), errors=MappingProxyType(errors), batch=batch,
                     sampled=sampled, collected=None if done is None else done.batch,
                     launch_s=launch_s, collect_s=collect_s)
    return ExecutorState(sched=sched, kv=kv, inflight=pending), out


def has_pending_work(state: ExecutorState) -> bool:
    """True while any request waits or runs, or a launched step awaits postprocessing."""
    return has_work(state.sched) or state.inflight is not None


class PyExecutor:
    """Drives `step` on a background thread; messages arrive through a thread-safe queue."""

    def __init__(self, state: ExecutorState, engine: ModelEngine, cfg: ExecutorConfig,
                 on_output: Callable[[StepOutput], None],
                 gc_gen0_threshold: int | None = DEFAULT_GC_GEN0_THRESHOLD) -> None:
        check_gc_gen0_threshold(gc_gen0_threshold)
        self._gc_gen0_threshold = gc_gen0_threshold  # applied while the loop serves, after warm-up
        self._state = state
        self._engine = engine
        self._cfg = cfg
        self._on_output = on_output
        self._queue: queue.Queue[Message | None] = queue.Queue()
        self._stopping = threading.Event()
        self._failure: Exception | None = None
        self._ready = threading.Event()
        self._trace: list[StepTiming] | None = None  # appended to by the loop's thread while tracing
        self._thread = threading.Thread(target=self._loop, name="llmfx-executor", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._failure is not None:
            raise RuntimeError(f"engine warm-up failed: {self._failure}") from self._failure

    @property
    def state(self) -> ExecutorState:
        """The state after the latest step (read-only: its KV handle belongs to the loop)."""
        return self._state

    def submit(self, request: Request) -> None:
        """Queue a request; it enters the scheduler at the next step."""
        if self._failure is not None or self._stopping.is_set():
            raise RuntimeError(f"the executor is stopped ({self._failure or 'shut down'}); create a new LLM")
        self._queue.put(AddRequest(request))

    def abort(self, request_ids: Iterable[int], reason: str = "abort") -> None:
        """Queue the end of requests; their pages are freed at the next step."""
        self._queue.put(AbortRequest(tuple(request_ids), reason))

    def start_trace(self) -> list[StepTiming]:
        """Record every loop iteration from now on into the returned list, which the loop's thread fills."""
        if self._trace is not None:
            raise RuntimeError("a step trace is already recording; stop it before starting another")
        trace: list[StepTiming] = []
        self._trace = trace
        return trace

    def stop_trace(self) -> None:
        """Stop recording; the list start_trace returned keeps what was recorded."""
        self._trace = None

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the loop; requests still waiting or running end with finish_reason "abort"."""
        self._stopping.set()
        self._queue.put(None)  # wakes the loop if it is blocked waiting for work
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError(f"the executor thread did not stop within {timeout} s")

    def _drain(self, block: bool) -> list[Message]:
        messages: list[Message] = []
        try:
            item = self._queue.get(block=block)
            while True:
                if item is not None:
                    messages.append(item)
                item = self._queue.get_nowait()
        except queue.Empty:
            return messages

    def _loop(self) -> None:
        # CUDA-graph trees keep per-thread state: compile, capture and replay all on this thread.
        try:
            self._state = dataclasses.replace(self._state, kv=self._engine.warmup(self._state.kv))
        except Exception as err:
            log.exception("engine warm-up failed")
            self._failure = err
            self._ready.set()
            return
        state = self._state
        inbox: list[Message] = []
        traced: tuple[ScheduledBatch, TracedBatch | None] | None = None  # the batch last launched while tracing
        try:
            with gc_gen0_threshold(self._gc_gen0_threshold):
                self._ready.set()  # set inside: the threshold holds once the constructor returns
                while True:
                    idle = not has_pending_work(state)
                    inbox = self._drain(block=idle)
                    if self._stopping.is_set():
                        break
                    start = time.perf_counter()
                    state, out = step(state, inbox, self._engine, self._cfg)
                    self._state = state  # published for inspection; the loop owns it
                    inbox = []
                    if self._trace is not None:
                        traced = self._record(out, start, idle, traced)
                    self._deliver(out)
        except Exception as err:  # a bug outside the model step: end every request rather than hang them
            log.exception("the executor loop failed; ending all requests")
            self._failure = err
        self._state = state
        self._abort_everything(inbox + self._drain(block=False))

    def _record(self, out: StepOutput, start: float, idle: bool,
                last: tuple[ScheduledBatch, TracedBatch | None] | None) -> tuple[ScheduledBatch, TracedBatch | None]:
        """Append this iteration to the trace (before delivery, so a caller woken by the outputs sees it)."""
        end = time.perf_counter()
        launched = TracedBatch.of(out.batch, out.launch_s) if out.batch.num_seqs else None
        if out.collected is None:
            collected = None
        elif out.collected is out.batch:  # without overlap a step collects what it launched
            collected = launched
        elif last is not None and out.collected is last[0]:
            collected = last[1]
        else:  # launched before the trace began
            collected = TracedBatch.of(out.collected, None)
        trace = self._trace
        if trace is not None:
            trace.append(StepTiming(start=start, end=end, waited_for_work=idle, launched=launched,
                                    collected=collected, collect_s=out.collect_s))
        return out.batch, launched

    def _abort_everything(self, inbox: list[Message]) -> None:
        sched = self._state.sched
        ids = list(dict.fromkeys([r.request_id for r in sched.running.requests]
                                 + [s.request.request_id for s in sched.waiting]))
        ids += [m.request.request_id for m in inbox if isinstance(m, AddRequest)]
        sched, ended = abort(sched, ids, "abort")
        pending = {e.request_id for e in ended}
        # Requests still in the inbox never reached the scheduler: end them here.
        extra = tuple(TokenEvent(request_id=rid, new_token_ids=(), finish_reason="abort") for rid in ids
                      if rid not in pending)
        self._state = dataclasses.replace(self._state, sched=sched)
        self._deliver(StepOutput(events=ended + extra))

    def _deliver(self, out: StepOutput) -> None:
        if not out.events:
            return
        try:
            self._on_output(out)
        except Exception:  # a broken consumer must not stop the engine
            log.exception("output handler failed")
