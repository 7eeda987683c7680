"""LLM: the user-facing entry point. Tokenizes, validates, submits to the executor, detokenizes.

This is the only module that touches the tokenizer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import queue
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from llmfx.beam_search import Hypothesis
from llmfx.detokenizer import DetokenizerState, detokenize, flush, new_detokenizer
from llmfx.buckets import Buckets
from llmfx.executor import (
    DEFAULT_GC_GEN0_THRESHOLD,
    ExecutorConfig,
    PyExecutor,
    StepOutput,
    StepTiming,
    check_gc_gen0_threshold,
)
from llmfx.kv_cache import KvCacheConfig
from llmfx.model_engine import SampledToken
from llmfx.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from llmfx.prompt_logprobs import score_prompt
from llmfx.sampling_params import SamplingParams, child_seed
from llmfx.scheduler import Request, SchedulerConfig, TokenEvent, validate_request
from llmfx.startup import build_engine
from llmfx.tokenizer import ByteTokenizer
from llmfx.weights import ModelSource, resolve_model

Prompt = str | Sequence[int]
log = logging.getLogger(__name__)


class _Sequence:
    """One generated sequence of a request: its tokens, text, logprobs and how it ended.

    Accumulates in lists and builds an immutable CompletionOutput only when one is published, so a
    non-streaming request costs O(1) per token instead of copying its whole output every step.
    """

    def __init__(self, index: int, request: Request, tokenizer) -> None:
        self.index = index
        self.request = request
        self._tokenizer = tokenizer
        params = request.params
        self._detok: DetokenizerState | None = (
            new_detokenizer(request.prompt_token_ids, params) if params.detokenize else None)
        self._token_ids: list[int] = []
        self._text: list[str] = []
        self._logprobs: list[dict[int, Logprob]] | None = None if params.logprobs is None else []
        self.cumulative_logprob = 0.0
        self.score: float | None = None
        self._last_ids: tuple[int, ...] = ()  # what the latest update added
        self._last_text = ""
        self.finish_reason: str | None = None
        self._stop_reason: int | str | None = None
        self._error: str | None = None

    @staticmethod
    def of_hypothesis(index: int, request: Request, tokenizer, hypothesis: Hypothesis) -> _Sequence:
        """A finished sequence holding a beam-search hypothesis, detokenized whole."""
        seq = _Sequence(index, request, tokenizer)
        seq.update(TokenEvent(request_id=request.request_id, new_token_ids=hypothesis.token_ids,
                              finish_reason=hypothesis.finish_reason, stop_reason=hypothesis.stop_reason), None, None)
        seq.cumulative_logprob, seq.score = hypothesis.cumulative_logprob, hypothesis.score
        return seq

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_tokens(self) -> int:
        return len(self._token_ids)

    def update(self, event: TokenEvent, error: str | None, sampled: SampledToken | None) -> bool:
        """Apply one event; returns True when a stop string ended the sequence while the engine still runs it."""
        new_ids, text_diff = event.new_token_ids, ""
        finish_reason, stop_reason = event.finish_reason, event.stop_reason
        stopped_by_text = False
        if self._detok is not None and new_ids:
            self._detok, delta = detokenize(self._detok, new_ids, self._tokenizer)
            text_diff = delta.text_diff
            if delta.finished_by_stop:
                new_ids = new_ids[: delta.num_tokens_kept - len(self._token_ids)]
                stopped_by_text = finish_reason is None
                finish_reason, stop_reason = "stop", delta.stop_string
        if self._detok is not None and finish_reason is not None and not self._detok.finished:
            self._detok, delta = flush(self._detok, self._tokenizer)
            text_diff += delta.text_diff
            if delta.finished_by_stop:
                new_ids = new_ids[: max(0, delta.num_tokens_kept - len(self._token_ids))]
                finish_reason, stop_reason = "stop", delta.stop_string
        self.append(new_ids, sampled)
        k = self.request.params.logprobs
        if k is not None and new_ids and sampled is not None:
            top = {t: Logprob(lp, rank) for rank, (t, lp) in enumerate(
                zip(sampled.top_ids[:k], sampled.top_logprobs[:k]), start=1)}
            self._logprobs.append({**top, sampled.token: Logprob(sampled.logprob, sampled.rank)})
        if text_diff:
            self._text.append(text_diff)
        self._last_ids, self._last_text = new_ids, text_diff
        self.finish_reason, self._stop_reason, self._error = finish_reason, stop_reason, error
        return stopped_by_text

    def append(self, new_ids: tuple[int, ...], sampled: SampledToken | None) -> None:
        """Add tokens as they are: no text, stop strings or logprobs (those are `update`'s)."""
        self._token_ids.extend(new_ids)
        if new_ids and sampled is not None:
            self.cumulative_logprob += sampled.logprob

    def output(self, with_diff: bool) -> CompletionOutput:
        """The sequence so far; the *_diff fields hold the latest update's addition when with_diff."""
        return CompletionOutput(
            index=self.index, text="".join(self._text), token_ids=tuple(self._token_ids),
            text_diff=self._last_text if with_diff else "", token_ids_diff=self._last_ids if with_diff else (),
            cumulative_logprob=self.cumulative_logprob, score=self.score,
            logprobs=None if self._logprobs is None else tuple(self._logprobs),
            finish_reason=self.finish_reason, stop_reason=self._stop_reason, error=self._error)


class RequestHandle:
    """A submitted request: `result()`, iteration over snapshots (sync or async), `abort()`.

    With n / best_of the request runs as sibling sequences; the final output keeps the n with the
    highest cumulative logprob (all of them when best_of is unset), in generation order. A beam
    search's outputs are its n best hypotheses, best score first, delivered when it finishes (also
    when streaming: beams are reordered and dropped until the end).
    """

    def __init__(self, llm: LLM, requests: list[Request], prompt: str | None, keep: int, streaming: bool,
                 prompt_logprobs: tuple[Mapping[int, Logprob] | None, ...] | None = None) -> None:
        self._llm = llm
        self._prompt_logprobs = prompt_logprobs
        first = requests[0]
        self.request_id = first.request_id
        self._keep = keep
        self._prompt = prompt
        self._prompt_token_ids = first.prompt_token_ids
        self._streaming = streaming
        params = first.params
        # Nothing is published before the end and a token needs no text or logprobs: appending it is all.
        self._append_only = not (streaming or params.detokenize or params.logprobs is not None)
        self._sequences = {r.request_id: _Sequence(i, r, llm.tokenizer) for i, r in enumerate(requests)}
        self._metrics = RequestMetrics(arrival_time=time.monotonic(), num_prompt_tokens=len(first.prompt_token_ids))
        self._final: RequestOutput | None = None
        self._updates: queue.Queue[RequestOutput] = queue.Queue()
        self._done = threading.Event()

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> RequestOutput:
        """The final output; blocks until the request finishes."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
        assert self._final is not None
        return self._final

    def abort(self) -> None:
        """End the request: it finishes with finish_reason "abort" and its pages are freed."""
        self._llm._executor.abort(tuple(self._sequences))

    def __iter__(self):
        """Snapshots as tokens arrive (only the final one unless streaming), ending with the final one."""
        while True:
            update = self._updates.get()
            yield update
            if update.finished:
                return

    async def __aiter__(self):
        while True:
            update = await asyncio.to_thread(self._updates.get)
            yield update
            if update.finished:
                return

    def _on_event(self, event: TokenEvent, error: str | None, sampled: SampledToken | None = None) -> None:
        """Runs on the executor thread: update the event's sequence, publish a snapshot."""
        seq = self._sequences[event.request_id]
        if seq.finish_reason is not None:  # also covers a finished request: all its sequences have finished
            return  # tokens of a step that was already running when a stop string ended the sequence
        if seq.update(event, error, sampled):
            self._llm._executor.abort((event.request_id,))
        if seq.finish_reason is not None:
            self._llm._sinks.pop(event.request_id, None)
        sequences = self._sequences.values()
        if event.hypotheses:  # a beam search ends: its outputs are its best hypotheses
            sequences = [_Sequence.of_hypothesis(i, seq.request, self._llm.tokenizer, h)
                         for i, h in enumerate(event.hypotheses[: self._keep])]
        if self._metrics.first_token_time is None and (seq.num_tokens or any(s.num_tokens for s in sequences)):
            self._metrics = replace(self._metrics, first_token_time=time.monotonic())
            if self._append_only:  # from now on LLM._dispatch appends their tokens without calling here
                self._llm._sinks.update((i, s) for i, s in self._sequences.items() if s.finish_reason is None)
        finished = all(s.finished for s in self._sequences.values())
        if not (finished or self._streaming):
            return  # nothing is published until the end: build no snapshot (this path runs once per token)
        self._metrics = metrics = replace(self._metrics, num_generated_tokens=sum(s.num_tokens for s in sequences),
                                          finished_time=time.monotonic() if finished else None)
        if finished and self._keep < len(sequences):
            best = sorted(sequences, key=lambda s: -s.cumulative_logprob)[: self._keep]
            sequences = sorted(best, key=lambda s: s.index)
        outputs = tuple(s.output(with_diff=s is seq or bool(event.hypotheses)) for s in sequences)
        snapshot = RequestOutput(request_id=self.request_id, prompt=self._prompt,
                                 prompt_token_ids=self._prompt_token_ids, outputs=outputs, finished=finished,
                                 metrics=metrics, prompt_logprobs=self._prompt_logprobs)
        if finished:
            self._final = snapshot
            self._done.set()
            self._llm._forget(tuple(self._sequences))
        self._updates.put(snapshot)


class LLM:
    """Load a model and serve generate() calls through a background PyExecutor."""

    def __init__(
        self,
        model: str | Path = "tiny",
        tokenizer: str | Path | Any | None = None,
        *,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device | None = None,
        max_batch_size: int = 256,
        max_num_tokens: int = 8192,
        max_seq_len: int | None = None,
        kv_cache_config: KvCacheConfig | None = None,
        scheduler_config: SchedulerConfig | None = None,
        disable_overlap_scheduler: bool = False,
        seed: int = 0,
        load_format: str = "auto",
        skip_tokenizer_init: bool = False,
        enforce_eager: bool = False,
        cuda_graph_batch_sizes: Sequence[int] | None = None,
        compile_dynamic: bool | None = None,
        inductor_options: dict[str, object] | None = None,
        cuda_graph_capture: str = "manual",
        garbage_collection_gen0_threshold: int | None = DEFAULT_GC_GEN0_THRESHOLD,
    ) -> None:
        if not isinstance(disable_overlap_scheduler, bool):
            raise ValueError(f"disable_overlap_scheduler must be a bool, got {disable_overlap_scheduler!r}")
        check_gc_gen0_threshold(garbage_collection_gen0_threshold)
        source = resolve_model(model)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.config = source.config
        self.tokenizer = None if skip_tokenizer_init else _load_tokenizer(tokenizer, source)
        tokenizer_eos = getattr(self.tokenizer, "eos_token_id", None)
        self._eos_token_ids = (frozenset(source.config.eos_token_ids) | _generation_eos(source)
                               | frozenset([] if tokenizer_eos is None else [tokenizer_eos]))
        parts = build_engine(source, dtype=dtype, device=self.device, max_batch_size=max_batch_size,
                             max_num_tokens=max_num_tokens, max_seq_len=max_seq_len,
                             kv_cache_config=kv_cache_config, scheduler_config=scheduler_config, seed=seed,
                             load_format=load_format, enforce_eager=enforce_eager,
                             overlap=not disable_overlap_scheduler, cuda_graph_batch_sizes=cuda_graph_batch_sizes,
                             compile_dynamic=compile_dynamic, inductor_options=inductor_options,
                             cuda_graph_capture=cuda_graph_capture)
        self.limits = parts.cfg.limits
        self.max_seq_len = self.limits.max_seq_len
        self._executor_cfg = parts.cfg
        self._num_pages = parts.num_pages
        self._ids = itertools.count()
        self._handles: dict[int, RequestHandle] = {}
        # Sequences of append-only requests past their first token, by sequence id: _dispatch appends their
        # tokens itself (one dict lookup a token instead of a handle's event path). Executor thread only.
        self._sinks: dict[int, _Sequence] = {}
        self._lock = threading.Lock()
        started = time.perf_counter()
        self._engine = parts.engine
        # Warms up on its thread; while it serves, the cyclic GC's gen-0 threshold is the one given (process-wide).
        self._executor = PyExecutor(parts.state, parts.engine, parts.cfg, self._dispatch,
                                    gc_gen0_threshold=garbage_collection_gen0_threshold)
        self.startup_seconds = {**parts.timings, "compile_and_capture": time.perf_counter() - started}
        log.info("llmfx startup: %s; KV pool %d pages of %d tokens",
                 ", ".join(f"{k} {v:.2f} s" for k, v in self.startup_seconds.items()), parts.num_pages - 1,
                 self.limits.page_size)

    # -- public API --

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> RequestOutput | list[RequestOutput]:
        """Generate for one prompt (returns one output) or a list (returns a list, in input order)."""
        single = isinstance(prompts, str) or (isinstance(prompts, Sequence) and bool(prompts)
                                              and all(isinstance(t, int) for t in prompts))
        batch = [prompts] if single else list(prompts)
        if not batch:
            raise ValueError("prompts must hold at least one prompt")
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(batch)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(batch):
                raise ValueError(f"sampling_params has {len(params_list)} entries for {len(batch)} prompts: "
                                 f"pass one SamplingParams or one per prompt")
        requests = [self._make_requests(p, sp) for p, sp in zip(batch, params_list)]  # all checked before any runs
        handles = [self._submit(r, p, sp.n, streaming=False) for r, p, sp in zip(requests, batch, params_list)]
        with tqdm(total=len(handles), disable=not use_tqdm or len(handles) < 2, desc="generate") as bar:
            outputs = []
            for handle in handles:
                outputs.append(handle.result())
                bar.update(1)
        return outputs[0] if single else outputs

    def generate_async(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
                       streaming: bool = False) -> RequestHandle:
        """Submit one prompt and return its handle at once."""
        params = sampling_params or SamplingParams()
        if streaming and params.num_sequences > params.n:
            raise ValueError(f"streaming needs best_of == n (got best_of={params.best_of}, n={params.n}): which "
                             f"sequences are kept is only known when all of them finish")
        return self._submit(self._make_requests(prompt, params), prompt, params.n, streaming=streaming)

    def shutdown(self) -> None:
        """Stop the executor; requests in flight end with finish_reason "abort"."""
        self._executor.shutdown()
        with self._lock:
            leftover = list(self._handles.items())
        for request_id, handle in leftover:  # submitted while the loop was stopping: never reached the scheduler
            handle._on_event(TokenEvent(request_id=request_id, new_token_ids=(), finish_reason="abort"), None)

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    @property
    def scheduler_state(self):
        """The scheduler's latest immutable state (queues, page pool, preemption count), for inspection."""
        return self._executor.state.sched

    @property
    def executor_config(self) -> ExecutorConfig:
        """The limits, scheduler settings and overlap flag the engine runs with."""
        return self._executor_cfg

    @property
    def buckets(self) -> Buckets | None:
        """The padded shapes steps run at (CUDA graphs), or None when every step runs at its exact size."""
        return self._engine.engine_cfg.buckets

    @contextlib.contextmanager
    def trace_steps(self) -> Iterator[list[StepTiming]]:
        """Record every executor-loop iteration (times, batches launched and collected) while the block runs."""
        trace = self._executor.start_trace()
        try:
            yield trace
        finally:
            self._executor.stop_trace()

    # -- internals --

    def _make_requests(self, prompt: Prompt, params: SamplingParams) -> list[Request]:
        """Engine requests, validated: one per sequence of n / best_of (siblings share the prompt pages), or one
        beam search holding beam_width sequence ids."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        if self.tokenizer is None and (isinstance(prompt, str) or params.detokenize):
            raise ValueError("this LLM was built with skip_tokenizer_init=True: prompts must be token ids and "
                             "SamplingParams.detokenize must be False")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            ids = tuple(self.tokenizer.encode(prompt))
        else:
            ids = tuple(prompt)
            bad = next((t for t in ids if not isinstance(t, int) or isinstance(t, bool)
                        or not 0 <= t < self.config.vocab_size), None)
            if bad is not None:
                raise ValueError(f"prompt token id {bad!r} is outside the vocabulary [0, {self.config.vocab_size})")
        now, first_id = time.monotonic(), None
        if params.use_beam_search:  # one request whose beams are sequences with ids of their own
            beam_ids = tuple(next(self._ids) for _ in range(params.beam_width))
            request = Request(request_id=beam_ids[0], prompt_token_ids=ids, params=params,
                              eos_token_ids=self._eos_token_ids, arrival_time=now, beam_ids=beam_ids)
            validate_request(request, self.limits, self._executor_cfg.scheduler, self._num_pages)
            return [request]
        requests = []
        for index in range(params.num_sequences):
            own = params if params.num_sequences == 1 else replace(
                params, n=1, best_of=None, seed=None if params.seed is None else child_seed(params.seed, index))
            request = Request(request_id=next(self._ids), prompt_token_ids=ids, params=own,
                              eos_token_ids=self._eos_token_ids, arrival_time=now, prefill_after=first_id)
            validate_request(request, self.limits, self._executor_cfg.scheduler, self._num_pages)
            first_id = request.request_id if first_id is None else first_id
            requests.append(request)
        return requests

    def _submit(self, requests: list[Request], prompt: Prompt, keep: int, streaming: bool) -> RequestHandle:
        k = requests[0].params.prompt_logprobs
        prompt_logprobs = None
        if k is not None:
            engine = self._engine
            scored = score_prompt(engine.params, engine.cfg, engine.engine_cfg.page_size, requests[0].prompt_token_ids)
            prompt_logprobs = (None, *({**{t: Logprob(lp, r) for r, (t, lp) in enumerate(
                zip(s.top_ids[:k], s.top_logprobs[:k]), start=1)}, s.token: Logprob(s.logprob, s.rank)} for s in scored))
        handle = RequestHandle(self, requests, prompt if isinstance(prompt, str) else None, keep, streaming,
                               prompt_logprobs)
        with self._lock:
            for request in requests:
                self._handles[request.request_id] = handle
        for request in requests:
            self._executor.submit(request)
        return handle

    def _dispatch(self, out: StepOutput) -> None:
        """Runs on the executor thread: hand each event to its request's handle (once per request per step)."""
        events, errors = out.events, out.errors
        sinks, sampled = self._sinks, out.sampled
        if sinks and not errors:  # a batch job's steady tokens: appended here, the rest go to their handles
            rest = []
            for event in events:
                seq = sinks.get(event.request_id)
                if seq is None or event.finish_reason is not None:
                    rest.append(event)
                else:
                    seq.append(event.new_token_ids, sampled.get(event.request_id))
            events = rest
        request_ids = [e.request_id for e in events]
        with self._lock:  # the user's threads add handles
            handles = list(map(self._handles.get, request_ids))
        for handle, event, sampled in zip(handles, events, map(out.sampled.get, request_ids)):
            if handle is not None:  # None: the request has finished and been forgotten
                handle._on_event(event, errors.get(event.request_id) if errors else None, sampled)

    def _forget(self, request_ids: tuple[int, ...]) -> None:
        with self._lock:
            for request_id in request_ids:
                self._handles.pop(request_id, None)
        for request_id in request_ids:
            self._sinks.pop(request_id, None)


def _load_tokenizer(tokenizer: str | Path | Any | None, source: ModelSource):
    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        return tokenizer  # a tokenizer object the caller built
    path = Path(tokenizer) if tokenizer is not None else source.path
    if path is None:
        return ByteTokenizer(vocab_size=source.config.vocab_size)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"no tokenizer could be loaded from {path}: pass tokenizer=<dir with tokenizer files> "
                         f"or a tokenizer object") from err


def _generation_eos(source: ModelSource) -> frozenset[int]:
    """EOS ids a checkpoint's generation_config.json adds (Llama 3 instruct ends turns with <|eot_id|>)."""
    if source.path is None or not (source.path / "generation_config.json").is_file():
        return frozenset()
    eos = json.loads((source.path / "generation_config.json").read_text()).get("eos_token_id")
    return frozenset(eos if isinstance(eos, list) else [] if eos is None else [eos])
