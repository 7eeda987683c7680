"""ModelEngine: the host/device boundary. Pads a scheduled batch to its bucket, runs model + sampler.

`launch` queues a step and returns at once with an InFlight handle; `collect` is the step's one
synchronization point. A decode token the host has not seen yet (the overlap scheduler's
placeholder) is gathered on the device from the token pool, which every step writes its sampled
tokens into. Inputs arrive through one buffer and one copy (llmfx.step_inputs), results leave
through one tensor and one copy. On CUDA the step is compiled and replayed as a CUDA graph per
bucket, captured by hand (a replay copies nothing: every input has a fixed address) or recorded
by inductor (mode="reduce-overhead", which copies the unpacked inputs into its own buffers at
each replay). The step is compiled in two halves, model and sampler. The sampler half has
variants (SamplerVariant): with the top-k/top-p/min-p filters and their vocabulary sort, or
without them for a batch none of whose requests filters, and then with or without the top-20
for a batch some or none of whose requests reads it (logprobs, beams). Captured by hand, a bucket
has one graph of the model half (the unpacking of the input buffer included) and one small graph
per sampler variant, replayed one after the other. Warm-up compiles and records them all;
afterwards a recompile raises.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.fx.experimental._config as fx_config
from torch import Tensor

from llmfx.batch import BatchColumns, ForwardBatch
from llmfx.beam_search import Candidates
from llmfx.buckets import BucketKey, Buckets
from llmfx.config import ModelConfig
from llmfx.kv_pool import KVPool, LayerKV, copy_pages
from llmfx.models import Params, forward
from llmfx.penalty_histories import PenaltyHistories
from llmfx.sampler import (TOP_LOGPROBS, PenaltyState, SamplingTensors, count_tokens, offsets_staging, sample,
                           token_words)
from llmfx.scheduler import PLACEHOLDER, ScheduledBatch, SequenceState
from llmfx.step_inputs import StagedFacts, StepLayout, StepStager, StepViews, fill_batch, fill_sampling

log = logging.getLogger(__name__)

OUT_COLUMNS = 3 + 2 * TOP_LOGPROBS  # a step's packed output [B, OUT_COLUMNS]: token, logprob, rank, top-20 ids, logprobs
GRAPH_CAPTURES = ("manual", "inductor")
# Per device type: a batch that filters nothing but reads the top-20 takes it from a topk (sampler.top_ranked)
# from this many rows, and from the filters' vocabulary sort below. The whole sampler on the H200
# (benchmarks/sampler_variants.py, greedy rows): sort vs topk 81 vs 90 us at 1 row, 149 vs 100 at 2, 887 vs
# 404 at 256. On the CPU the topk is faster from one row up.
SORT_FREE_MIN_ROWS = {"cuda": 2, "cpu": 1}


class SamplerVariant(NamedTuple):
    """The promises one step's sampler runs under (llmfx.sampler.sample); each is a graph of its own."""

    filtering: bool  # some row filters: sort the vocabulary (and take the top-20 from the sort's head)
    noise: bool  # some row samples: draw the Gumbel noise (compiled steps always do)
    top_logprobs: bool  # some row reads its top-20 (logprobs, beams), or the sort gives it anyway


def check_graph_capture(value: str, field: str = "graph_capture") -> None:
    """Raise a ValueError naming `field` unless value is one of GRAPH_CAPTURES."""
    if value not in GRAPH_CAPTURES:
        raise ValueError(f"{field} must be one of {GRAPH_CAPTURES}, got {value!r}")


class StepFailed(RuntimeError):
    """A step raised; `kv` is the live pool handle to continue with, `__cause__` the original error."""

    def __init__(self, kv: KVPool, cause: Exception) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.kv = kv


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineConfig:
    """How the engine runs steps."""

    page_size: int
    seed: int
    max_pages_per_seq: int  # page-table width: ceil(max_seq_len / page_size)
    max_batch_size: int = 256  # rows of the token pool
    buckets: Buckets | None = None  # None: every batch runs at its exact size (eager CPU path)
    compile: bool = False  # torch.compile per bucket; on CUDA each bucket is replayed as a CUDA graph
    # Who records the CUDA graphs: "manual" (torch.cuda.CUDAGraph captured around the compiled step
    # once per bucket: a replay is one call, ~0.05-0.1 ms of host time on the H200) or "inductor"
    # (mode="reduce-overhead", cudagraph trees: guards and tree bookkeeping, ~0.4-0.55 ms a step).
    graph_capture: str = "manual"
    compile_dynamic: bool | None = None  # torch.compile's `dynamic`: None = automatic dynamic shapes
    inductor_options: tuple[tuple[str, object], ...] = ()  # extra inductor options, e.g. (("split_reductions", False),)

    def __post_init__(self) -> None:
        check_graph_capture(self.graph_capture)


class SampledToken(NamedTuple):
    """What the host learns about one sampled token.

    A named tuple, not a frozen dataclass: collect builds one per row per step on the executor
    thread, and a tuple skips the frozen dataclass's per-field object.__setattr__.
    """

    token: int
    logprob: float
    rank: int
    top_ids: tuple[int, ...] = ()  # the 20 most likely, best first; empty unless the request asked for logprobs
    top_logprobs: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Collected:
    """A collected step's sampled tokens, by sequence id, in the shapes their readers want."""

    sampled: dict[int, SampledToken]
    tokens: dict[int, int]  # the sampled token ids: postprocess's input
    candidates: dict[int, Candidates]  # the top-20 of rows that read it back (logprobs, beams)


@dataclass(frozen=True, slots=True, kw_only=True)
class InFlight:
    """A launched step: its batch, and the host buffer that holds its results once `ready` has fired."""

    batch: ScheduledBatch
    host: Tensor  # [B, OUT_COLUMNS] float64, pinned on CUDA; valid after ready.synchronize()
    ready: torch.cuda.Event | None  # None on CPU, where launch is synchronous
    sampling_ids: list[int]  # sequence ids of the rows that sample a token
    sampling_rows: list[int] | None  # their rows; None: every row samples (a decode-only step)
    top_rows: tuple[int, ...]  # rows whose request asked for logprobs or is a beam: only these read the top-20


def read_results(inflight: InFlight) -> Collected:
    """A landed step's sampled tokens, from its host buffer alone (numpy: nothing here touches the device).

    Call it once inflight.ready has fired (ModelEngine.collect waits for it).
    """
    out = inflight.host.numpy()  # the pinned host buffer: .numpy() of a device tensor would raise, not sync
    picked = out if inflight.sampling_rows is None else out[inflight.sampling_rows]
    ids = inflight.sampling_ids
    tokens = picked[:, 0].astype(np.int64).tolist()
    sampled = dict(zip(ids, map(SampledToken, tokens, picked[:, 1].tolist(), picked[:, 2].astype(np.int64).tolist())))
    candidates = {}
    ids_at, lps_at = 3, 3 + TOP_LOGPROBS
    columns = inflight.batch.columns
    for row in inflight.top_rows:
        if columns.samples[row]:
            seq_id = int(columns.ids[row])
            top = candidates[seq_id] = (tuple(out[row, ids_at:lps_at].astype(np.int64).tolist()),
                                        tuple(out[row, lps_at:].tolist()))
            sampled[seq_id] = sampled[seq_id]._replace(top_ids=top[0], top_logprobs=top[1])
    return Collected(sampled=sampled, tokens=dict(zip(ids, tokens)), candidates=candidates)


def step_fn(params: Params, cfg: ModelConfig, kv: tuple[LayerKV, ...], inputs: ForwardBatch, sampling: SamplingTensors,
            gather_rows: Tensor, penalties: PenaltyState, token_pool: Tensor, words: Tensor, *, filtering: bool = True,
            noise: bool = True, top_logprobs: bool = True) -> Tensor:
    """One step on the device: gather placeholder tokens, forward, sample, store tokens.

    gather_rows [T]: the token-pool row of a placeholder token, else -1. kv and token_pool
    [max_batch] are written in place (DONATED). words [V]: sampler.token_words. filtering=False: no
    row filters; noise=False: every row is greedy; top_logprobs=False: no row reads its top-20
    (sample's promises).
    Returns [B, OUT_COLUMNS] float64: one tensor, so the host needs one copy, and rows, so the
    host's [:B] slice of it is contiguous.
    """
    logits, unseen = forward_step(params, cfg, kv, inputs, gather_rows, token_pool)
    return sample_step(logits, unseen, sampling, penalties, token_pool, words, filtering, noise, top_logprobs)


def mark_sampler_sizes(logits: Tensor, unseen: Tensor, sampling: SamplingTensors, penalties: PenaltyState,
                       max_rows: int) -> None:
    """Mark sample_step's inputs as the engine compiles them: batch dimension dynamic in [1, max_rows], the
    vocabulary static (see ModelEngine._warm_sampler and _compile_and_capture)."""
    for tensor in (logits, unseen, penalties.prompt_mask, penalties.output_counts,
                   *(getattr(sampling, name) for name in SamplingTensors.__slots__)):
        torch._dynamo.mark_dynamic(tensor, 0, min=1, max=max_rows)
    for tensor in (logits, penalties.prompt_mask, penalties.output_counts):
        torch._dynamo.mark_static(tensor, 1)


def forward_step(params: Params, cfg: ModelConfig, kv: tuple[LayerKV, ...], inputs: ForwardBatch, gather_rows: Tensor,
                 token_pool: Tensor) -> tuple[Tensor, Tensor]:
    """step_fn's model half: (logits [B, V], unseen [B]: each row's placeholder token, else -1)."""
    placeholder = gather_rows >= 0  # [T]: the token is the pool's, sampled by the previous step
    token_ids = torch.where(placeholder, token_pool[gather_rows.clamp(min=0)], inputs.token_ids)  # [T]
    inputs = dataclasses.replace(inputs, token_ids=token_ids)
    last = inputs.logits_indices  # [B]
    # A placeholder is an output token the host's penalty counts have not seen yet.
    return forward(params, cfg, inputs, kv), torch.where(placeholder[last], token_ids[last], -1)


def sample_step(logits: Tensor, unseen: Tensor, sampling: SamplingTensors, penalties: PenaltyState, token_pool: Tensor,
                words: Tensor, filtering: bool, noise: bool = True, top_logprobs: bool = True) -> Tensor:
    """step_fn's sampler half: sample, store the tokens in token_pool, pack the [B, OUT_COLUMNS] result.

    Compiled apart from the model so that its variants share one compiled forward; `filtering`,
    `noise` and `top_logprobs` are constants the compiled function is specialized on.
    """
    penalties = PenaltyState(prompt_mask=penalties.prompt_mask,
                             output_counts=count_tokens(penalties.output_counts, unseen))
    out = sample(logits, sampling, penalties, filtering=filtering, noise=noise, top_logprobs=top_logprobs, words=words)
    token_pool.narrow(0, 0, out.tokens.shape[0]).copy_(out.tokens)
    return torch.cat([out.tokens.unsqueeze(1).double(), out.logprobs.unsqueeze(1).double(),
                      out.ranks.unsqueeze(1).double(), out.topk_ids.double(), out.topk_logprobs.double()], dim=1)


class ModelEngine:
    """Runs steps: a ScheduledBatch in, the sampled token of each sampling sequence out.

    Host and device buffers live as long as the engine: inputs go through two pinned buffers
    (alternating, so filling step n+1 never races the copy of step n) into one device buffer,
    results come back through two pinned output buffers. Nothing is allocated per step.
    """

    def __init__(self, params: Params, cfg: ModelConfig, engine_cfg: EngineConfig) -> None:
        self.params = params
        self.cfg = cfg
        self.engine_cfg = engine_cfg
        self.device = params["embed"].device
        self._cuda = self.device.type == "cuda"
        self._graphs_by_hand = engine_cfg.compile and self._cuda and engine_cfg.graph_capture == "manual"
        self._sort_free_min_rows = SORT_FREE_MIN_ROWS.get(self.device.type, 1)
        # Recorded by inductor's cudagraph trees, which need to be told where each step begins.
        self._trees = engine_cfg.compile and self._cuda and not self._graphs_by_hand
        self._forward_half, self._sampler_half = self._compiled_halves() if engine_cfg.compile else (forward_step,
                                                                                                     sample_step)
        self._warm = False
        self._stager = StepStager(page_size=engine_cfg.page_size, max_pages=engine_cfg.max_pages_per_seq,
                                  max_rows=engine_cfg.max_batch_size, engine_seed=engine_cfg.seed,
                                  placeholder=PLACEHOLDER)
        buckets = engine_cfg.buckets
        rows = max(engine_cfg.max_batch_size, buckets.max_seqs if buckets else 0)
        size = max((self._layout_of(k).size for k in buckets.all_keys()), default=0) if buckets else 0
        self._host_in: list[Tensor] = []
        self._device_in = torch.empty(0)
        # Views per (layout, pinned buffer parity, or None for the device buffer), cached for bucket layouts:
        # a graph's inputs keep their addresses, and building a layout's views takes ~11 us a step.
        self._views: dict[tuple[StepLayout, int | None], StepViews] = {}
        self._reserve_inputs(size)
        self._host_out = [torch.zeros(rows, OUT_COLUMNS, dtype=torch.float64, pin_memory=self._cuda) for _ in range(2)]
        # Each output buffer's "copy landed" event, re-recorded when the buffer is reused (its step is collected).
        self._ready = [torch.cuda.Event() for _ in range(2)] if self._cuda else None
        self._parity = 0  # which pinned input/output pair and event the next launch uses
        # The second donated buffer: the last sampled token of each row of the previous step.
        self._token_pool = torch.zeros(engine_cfg.max_batch_size, dtype=torch.int64, device=self.device)
        self._words = token_words(cfg.vocab_size, self.device)  # the noise hash's per-token words, read by every step
        # Penalty inputs: zero except while a penalized batch runs; views per row count are cached.
        self._penalty_mask = torch.zeros(rows, cfg.vocab_size, dtype=torch.bool, device=self.device)
        self._penalty_counts = torch.zeros(rows, cfg.vocab_size, dtype=torch.int32, device=self.device)
        self._penalty_views: dict[int, PenaltyState] = {}
        self._dirty_penalty_rows = 0
        self._penalty_histories = PenaltyHistories(cfg.vocab_size)  # host ids kept across penalized steps
        # Penalty offsets' host buffers, one per parity like the step inputs', grown as histories grow.
        self._penalty_staging = [offsets_staging(0, self.device) for _ in range(2)]
        # Captured by hand: the model half's graph per bucket, and the sampler half's per bucket and variant.
        self._forward_graphs: dict[StepLayout, torch.cuda.CUDAGraph] = {}
        self._sampler_graphs: dict[tuple[StepLayout, SamplerVariant], tuple[torch.cuda.CUDAGraph, Tensor]] = {}

    def peak_activation_bytes(self) -> int:
        """Device memory the largest buckets need beyond weights, measured by running them eagerly (CUDA only)."""
        buckets = self.engine_cfg.buckets
        if not self._cuda or buckets is None:
            return 0
        probe = KVPool.allocate(self.cfg, 2, self.engine_cfg.page_size, self.params["embed"].dtype, self.device)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        with torch.inference_mode():
            largest = (max(buckets.all_keys(), key=lambda k: (k.num_tokens, k.num_seqs)),
                       BucketKey(num_tokens=buckets.decode_sizes[-1], num_seqs=buckets.decode_sizes[-1], decode=True))
            for key in largest:
                step_fn(self.params, self.cfg, probe.layers, *self._padding_args(key))
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - base

    def warmup(self, kv: KVPool) -> KVPool:
        """Compile and record every bucket with all-padding batches; kv is DONATED. Run on the serving thread."""
        layers = kv.take()
        with torch.inference_mode():  # the grad mode is part of the compiled graph's guards
            if not self.engine_cfg.compile:
                # One throwaway step loads kernels and op registrations, so the first request is not slowed.
                step_fn(self.params, self.cfg, layers, *self._padding_args(BucketKey(num_tokens=1, num_seqs=1,
                                                                                     decode=True)))
            else:
                self._compile_and_capture(layers)
        self._warm = True
        return KVPool(layers)

    def _compile_and_capture(self, layers: tuple[LayerKV, ...]) -> None:
        keys = self.engine_cfg.buckets.warmup_order()
        if self._trees:
            _cudagraph_thread_state()
        static = [self._token_pool, self._words, *_tensors(self.params), *(t for layer in layers for t in layer)]
        # Dynamo remembers the sizes each function was compiled at in this process, across engines: after
        # another model's steps (another vocabulary, hidden size or pool) automatic dynamic shapes would
        # make these sizes symbols. They never change in this engine's life; a symbolic vocabulary also broke
        # inductor's sampler compile on the H200 (CantSplit, session 18).
        for tensor in static:
            torch._dynamo.mark_static(tensor)
        for key in keys:  # create every bucket's penalty views once, so each graph reads fixed addresses
            static += _tensors(self._penalties_of(key.num_seqs))
        if not self._graphs_by_hand:
            for tensor in static:
                torch._dynamo.mark_static_address(tensor)
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle() if self._graphs_by_hand else None  # one pool: graphs replay in turn
        num_variants = 0
        for key in keys:
            args = self._padding_args(key)
            variants = self.sampler_variants(key.num_seqs)
            num_variants += len(variants)
            if self._graphs_by_hand:
                self._capture(key, layers, args, variants, pool)
                continue
            for variant in variants:
                for _ in range(3):  # compile; with cudagraph trees, warm-up run, then record, then replay
                    self._step(layers, *args, variant)
        if self._cuda:
            torch.cuda.synchronize(self.device)
        log.info("compiled and captured %d buckets with %d sampler variants (%s) in %.1f s", len(keys), num_variants,
                 self.engine_cfg.graph_capture, time.perf_counter() - start)

    def _capture(self, key: BucketKey, layers: tuple[LayerKV, ...], args: tuple, variants: tuple[SamplerVariant, ...],
                 pool) -> None:
        """Compile and capture bucket key's model-half graph, then one sampler-half graph per variant."""
        inputs, sampling, gather_rows, penalties, token_pool, words = args
        for _ in range(2):  # compile (automatic dynamic shapes may recompile once), then settle
            self._forward_half(self.params, self.cfg, layers, inputs, gather_rows, token_pool)
        layout = self._layout_of(key)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):  # unpacking the staged inputs included
            inputs, sampling, gather_rows, penalties, token_pool, words = self._step_args(layout, penalties)
            logits, unseen = self._forward_half(self.params, self.cfg, layers, inputs, gather_rows, token_pool)
        graph.replay()  # the sampler's warm-up runs read real values (a token id indexes the penalty counts)
        self._forward_graphs[layout] = graph
        for variant in variants:
            for _ in range(2):
                self._warm_sampler(logits, unseen, sampling, penalties, token_pool, words, variant)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._sampler_half(logits, unseen, sampling, penalties, token_pool, words, *variant)
            self._sampler_graphs[layout, variant] = (graph, out)

    def sampler_variants(self, num_seqs: int) -> tuple[SamplerVariant, ...]:
        """Every sampler variant a batch of num_seqs rows can run with: those warm-up compiles and captures."""
        return tuple(dict.fromkeys(self._sampler_variant(filtering, sampled, top, num_seqs)
                                   for filtering in (True, False) for sampled in (True, False)
                                   for top in (True, False)))

    def launch(self, kv: KVPool, batch: ScheduledBatch, sequences: Mapping[int, SequenceState]) -> tuple[KVPool, InFlight]:
        """Queue the batch on the device and return at once; kv is DONATED. Raises StepFailed with the live kv."""
        assert self._warm, "warmup() must run before the first step"
        layers = kv.take()
        parity = self._parity
        try:
            with torch.inference_mode():
                if batch.page_copies:  # forked beams' partial pages, copied before the step writes into them
                    copy_pages(layers, batch.page_copies)
                layout = self._layout(batch)
                ids = batch.columns.ids.tolist()
                facts = self._stage(layout, batch, sequences, parity)
                penalties = self._penalties(layout.num_seqs, ids, sequences, facts.penalized, parity)
                variant = self._sampler_variant(facts.filtering, facts.sampled, bool(facts.top_rows), layout.num_seqs)
                if self._graphs_by_hand:
                    out = self._replay(layout, variant)
                else:
                    compiled = self.engine_cfg.compile
                    with torch.compiler.set_stance("fail_on_recompile") if compiled else contextlib.nullcontext():
                        out = self._step(layers, *self._step_args(layout, penalties), variant)
                # Copy the results out before the next replay overwrites the graph's outputs. The
                # destination must be contiguous: into a strided one, a non-blocking copy lands in a
                # temporary that is read back at once, before the device has written it.
                host = self._grow_host_out(parity, layout.num_seqs)[: layout.num_seqs]
                host.copy_(out, non_blocking=True)
                ready = None
                if self._ready is not None:
                    ready = self._ready[parity]
                    ready.record()
        except Exception as err:
            # The pool is intact apart from this batch's rows, whose requests the caller fails.
            raise StepFailed(KVPool(layers), err) from err
        self._parity ^= 1
        rows = np.flatnonzero(batch.columns.samples).tolist()
        every = len(rows) == len(ids)
        return KVPool(layers), InFlight(batch=batch, host=host, ready=ready, top_rows=facts.top_rows,
                                        sampling_ids=ids if every else [ids[row] for row in rows],
                                        sampling_rows=None if every else rows)

    def collect(self, inflight: InFlight) -> Collected:
        """Wait for a launched step (the step's one synchronization point) and read its sampled tokens."""
        if inflight.ready is not None:
            inflight.ready.synchronize()
        return read_results(inflight)

    def execute(self, kv: KVPool, batch: ScheduledBatch,
                sequences: Mapping[int, SequenceState]) -> tuple[KVPool, Collected]:
        """launch then collect: one step run to completion."""
        kv, inflight = self.launch(kv, batch, sequences)
        return kv, self.collect(inflight)

    def _replay(self, layout: StepLayout, variant: SamplerVariant) -> Tensor:
        """Replay the graphs captured by hand for a step of this layout and sampler variant; their packed output."""
        self._forward_graphs[layout].replay()
        graph, out = self._sampler_graphs[layout, variant]
        graph.replay()
        return out

    def _step(self, layers: tuple[LayerKV, ...], inputs: ForwardBatch, sampling: SamplingTensors, gather_rows: Tensor,
              penalties: PenaltyState, token_pool: Tensor, words: Tensor, variant: SamplerVariant) -> Tensor:
        """step_fn through the engine's halves (compiled or not), for the paths that do not replay graphs by hand."""
        if self._trees:  # a new step: the sampler half reads the model half's outputs of this step only
            torch.compiler.cudagraph_mark_step_begin()
        logits, unseen = self._forward_half(self.params, self.cfg, layers, inputs, gather_rows, token_pool)
        if self.engine_cfg.compile and not self._warm:
            return self._warm_sampler(logits, unseen, sampling, penalties, token_pool, words, variant)
        return self._sampler_half(logits, unseen, sampling, penalties, token_pool, words, *variant)

    def _warm_sampler(self, logits: Tensor, unseen: Tensor, sampling: SamplingTensors, penalties: PenaltyState,
                      token_pool: Tensor, words: Tensor, variant: SamplerVariant) -> Tensor:
        """The sampler half at warm-up, compiled once per variant for every batch size, one row included.

        Its batch dimension is marked dynamic and compiled size-oblivious: otherwise a variant run at
        one row compiles a size-1 graph of its own (0/1 specialization), then a shape-generic one,
        and each such compile is seconds of startup (session 6: +4.6 s warm for two). The dimension's
        range stops at the token pool's rows, so writing the tokens there needs neither a guard nor a
        runtime assert in the graph (torch 2.11 traced a torch._check there as a call the AOTAutograd
        cache refuses, and every warm start traced the sampler variants again: session 14, same call,
        warm 24.7 s with it, 22.6 without).
        """
        mark_sampler_sizes(logits, unseen, sampling, penalties, token_pool.shape[0])
        with fx_config.patch(backed_size_oblivious=True):
            return self._sampler_half(logits, unseen, sampling, penalties, token_pool, words, *variant)

    def _sampler_variant(self, filtering: bool, sampled: bool, top_logprobs: bool, num_seqs: int) -> SamplerVariant:
        """The sampler variant a batch of num_seqs rows with these facts runs with.

        A batch that reads the top-20 takes it from the sort below SORT_FREE_MIN_ROWS rows (measured
        per device), so the sort's variant gives the top-20 always. Only the eager path skips the noise
        (compiled, the noise-free variant measured 2-22 us faster on the H200: not worth a graph each).
        """
        filtering = filtering or (top_logprobs and num_seqs < self._sort_free_min_rows)
        return SamplerVariant(filtering=filtering, noise=sampled or self.engine_cfg.compile,
                              top_logprobs=top_logprobs or filtering)

    def _layout_of(self, key: BucketKey) -> StepLayout:
        return StepLayout(num_tokens=key.num_tokens, num_seqs=key.num_seqs, max_pages=self.engine_cfg.max_pages_per_seq)

    def _layout(self, batch: ScheduledBatch) -> StepLayout:
        if self.engine_cfg.buckets is not None:
            return self._layout_of(self.engine_cfg.buckets.key(batch))
        return StepLayout(num_tokens=batch.num_tokens, num_seqs=batch.num_seqs,
                          max_pages=self.engine_cfg.max_pages_per_seq)

    def _reserve_inputs(self, size: int) -> None:
        """Input buffers of at least `size` elements; only the eager path (no graphs) ever grows them."""
        if self._device_in.numel() >= size:
            return
        assert not self._warm or not self.engine_cfg.compile, "a graph's input buffer cannot move after warm-up"
        self._host_in = [torch.zeros(size, dtype=torch.float64, pin_memory=self._cuda) for _ in range(2)]
        self._device_in = torch.zeros(size, dtype=torch.float64, device=self.device)
        self._views.clear()

    def _grow_host_out(self, parity: int, rows: int) -> Tensor:
        """Pinned output buffer `parity`, grown for the eager path's unbounded batches (never with buckets)."""
        if self._host_out[parity].shape[0] < rows:
            self._host_out[parity] = torch.zeros(rows, OUT_COLUMNS, dtype=torch.float64, pin_memory=self._cuda)
        return self._host_out[parity]

    def _penalty_staging_of(self, parity: int, size: int) -> Tensor:
        """Penalty staging buffer `parity` with room for size offsets; reused two launches later, when the
        step that copied from it has been collected (as the pinned step inputs are)."""
        if self._penalty_staging[parity].numel() < size:
            self._penalty_staging[parity] = offsets_staging(max(size, 2 * self._penalty_staging[parity].numel()),
                                                            self.device)
        return self._penalty_staging[parity]

    def _buffer_views(self, layout: StepLayout, parity: int | None) -> StepViews:
        """layout's views of pinned input buffer `parity`, or of the device buffer for parity None."""
        views = self._views.get((layout, parity))
        if views is None:
            views = layout.views(self._device_in if parity is None else self._host_in[parity])
            if self.engine_cfg.buckets is not None:  # bucket layouts are few; exact ones are not
                self._views[layout, parity] = views
        return views

    def _stage(self, layout: StepLayout, batch: ScheduledBatch, sequences: Mapping[int, SequenceState],
               parity: int) -> StagedFacts:
        """Fill pinned buffer `parity` and queue its one copy to the device."""
        self._reserve_inputs(layout.size)
        views = self._buffer_views(layout, parity)
        facts = self._stager.fill(views, batch.columns, lambda rid: sequences[rid].request.params)
        self._device_in[: layout.size].copy_(views.flat, non_blocking=True)
        return facts

    def _penalties_of(self, rows: int) -> PenaltyState:
        views = self._penalty_views.get(rows)
        if views is None:
            if rows > self._penalty_mask.shape[0]:  # the eager path without a row limit
                self._penalty_mask = torch.zeros(rows, self.cfg.vocab_size, dtype=torch.bool, device=self.device)
                self._penalty_counts = torch.zeros(rows, self.cfg.vocab_size, dtype=torch.int32, device=self.device)
                self._penalty_views.clear()
            views = self._penalty_views[rows] = PenaltyState(prompt_mask=self._penalty_mask[:rows],
                                                             output_counts=self._penalty_counts[:rows])
        return views

    def _penalties(self, rows: int, ids: Sequence[int], sequences: Mapping[int, SequenceState],
                   penalized: bool, parity: int) -> PenaltyState:
        views = self._penalties_of(rows)
        if not penalized:
            if self._dirty_penalty_rows:  # queued after the penalized step, so it never sees zeros
                self._penalty_mask[: self._dirty_penalty_rows].zero_()
                self._penalty_counts[: self._dirty_penalty_rows].zero_()
                self._dirty_penalty_rows = 0
            return views
        # The host's outputs; a token still in flight is counted on the device (see step_fn).
        seqs = [sequences[i] for i in ids]
        offsets = self._penalty_histories.offsets(ids, [s.request.prompt_token_ids for s in seqs],
                                                  [s.output_token_ids for s in seqs])
        views.write_offsets(len(seqs), *offsets, self._penalty_staging_of(parity, sum(map(len, offsets))))
        self._dirty_penalty_rows = max(self._dirty_penalty_rows, rows)
        return views

    def _step_args(self, layout: StepLayout, penalties: PenaltyState) -> tuple:
        """step_fn's arguments after params, config and kv, for inputs staged in the device buffer.

        The fields are unpacked (sliced and converted) here, outside the compiled step, so the step
        sees the int64 / int32 / float32 tensors it computes with. On the H200 (torch 2.11), the
        step compiled with automatic dynamic shapes and the unpacking inside it sampled different
        tokens than the eager step on the same inputs; with it outside, they agree (the GPU test
        test_every_compiled_step_equals_the_eager_step_on_the_same_inputs). Captured by hand, the
        unpacking is part of the graph, so it costs no host time.
        """
        inputs, sampling, gather_rows = self._buffer_views(layout, None).unpack()
        return inputs, sampling, gather_rows, penalties, self._token_pool, self._words

    def _padding_args(self, key: BucketKey) -> tuple:
        """step_fn's arguments after params, config and kv for an all-padding batch of bucket `key`."""
        layout = self._layout_of(key)
        self._reserve_inputs(layout.size)
        host = self._host_in[0]
        views = layout.views(host)
        fill_batch(views, BatchColumns.of([]), self.engine_cfg.page_size)
        fill_sampling(views, [])
        self._device_in[: layout.size].copy_(host[: layout.size])
        return self._step_args(layout, self._penalties_of(key.num_seqs))

    def _compiled_halves(self):
        buckets = self.engine_cfg.buckets
        assert buckets is not None, "compiling needs buckets"
        # Headroom over the bucket count; after warm-up any recompile is an error.
        limit = 2 * len(buckets.all_keys()) + 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
        torch._dynamo.config.accumulated_recompile_limit = max(
            torch._dynamo.config.accumulated_recompile_limit, 4 * limit)
        # mode="reduce-overhead" is the option triton.cudagraphs; spelled out so more options can join it.
        options = {"triton.cudagraphs": self._trees, **inductor_pdl_options(self.device),
                   **dict(self.engine_cfg.inductor_options)}
        # dynamic=None: the first two sizes compile, after which one shape-generic graph serves every
        # bucket (automatic dynamic shapes); CUDA graphs are still recorded per bucket size.
        return tuple(torch.compile(fn, options=options, fullgraph=True, dynamic=self.engine_cfg.compile_dynamic)
                     for fn in (forward_step, sample_step))


def inductor_pdl_options(device: torch.device) -> dict[str, bool]:
    """Inductor's kernels launch with PDL where llmfx's own do (ops/triton_pdl.py); older torch lacks the option."""
    import torch._inductor.config as inductor_config

    if device.type != "cuda" or not hasattr(inductor_config.triton, "enable_pdl"):
        return {}
    from llmfx.ops.triton_pdl import pdl_enabled  # imports triton: CUDA only

    return {"triton.enable_pdl": pdl_enabled(device)}


def _cudagraph_thread_state() -> None:
    """Give this thread its own CUDA-graph-tree state.

    torch 2.11 creates that state only in the thread that first imported cudagraph_trees and
    asserts in any other thread (later versions create it lazily); the executor thread compiles,
    captures and replays, so it sets its state up before the first compiled call.
    """
    from torch._inductor import cudagraph_trees

    local = cudagraph_trees.local
    if hasattr(local, "tree_manager_containers") or torch._C._is_key_in_tls("tree_manager_containers"):
        return
    # What cudagraph_trees does for its importing thread, done for this one.
    local.tree_manager_containers = {}
    local.tree_manager_locks = collections.defaultdict(threading.Lock)
    torch._C._stash_obj_in_tls("tree_manager_containers", local.tree_manager_containers)
    torch._C._stash_obj_in_tls("tree_manager_locks", local.tree_manager_locks)


def _tensors(tree) -> list[Tensor]:
    if isinstance(tree, Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _tensors(v)]
    if isinstance(tree, (tuple, list)):
        return [t for v in tree for t in _tensors(v)]
    if dataclasses.is_dataclass(tree):
        return [t for f in dataclasses.fields(tree) for t in _tensors(getattr(tree, f.name))]
    return []
