"""ModelEngine: the host/device boundary. Pads a scheduled batch to its bucket, runs model + sampler.

`launch` queues a step and returns at once with an InFlight handle; `collect` is the step's one
synchronization point. A decode token the host has not seen yet (the overlap scheduler's
placeholder) is gathered on the device from the token pool, which every step writes its sampled
tokens into. On CUDA the step is compiled with torch.compile(mode="reduce-overhead") and replayed
as a CUDA graph per bucket; weights, rope table, KV pool and token pool are marked static first so
no replay copies them. Warm-up compiles and records every bucket; afterwards a recompile raises.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from llmfx.batch import ForwardBatch, pack
from llmfx.buckets import BucketKey, Buckets
from llmfx.config import ModelConfig
from llmfx.kv_pool import KVPool, LayerKV, copy_pages
from llmfx.models import Params, forward
from llmfx.sampler import PenaltyState, SamplingTensors, count_tokens, request_seed, sample
from llmfx.scheduler import PLACEHOLDER, ScheduledBatch, SequenceState

log = logging.getLogger(__name__)

StepTensors = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]  # tokens, logprobs, ranks, topk ids, topk logprobs


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
    compile: bool = False  # torch.compile(mode="reduce-overhead") per bucket; CUDA graphs on CUDA
    compile_dynamic: bool | None = None  # torch.compile's `dynamic`: None = automatic dynamic shapes
    inductor_options: tuple[tuple[str, object], ...] = ()  # extra inductor options, e.g. (("split_reductions", False),)


@dataclass(frozen=True, slots=True, kw_only=True)
class SampledToken:
    """What the host learns about one sampled token."""

    token: int
    logprob: float
    rank: int
    top_ids: tuple[int, ...]  # the 20 most likely, best first; empty unless the request asked for logprobs
    top_logprobs: tuple[float, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class InFlight:
    """A launched step: its batch, and host buffers that hold its results once `ready` has fired."""

    batch: ScheduledBatch
    host: StepTensors  # pinned on CUDA; valid after ready.synchronize()
    ready: torch.cuda.Event | None  # None on CPU, where launch is synchronous
    top_rows: frozenset[int]  # rows whose request asked for logprobs: only these read the top-20


def step_fn(params: Params, cfg: ModelConfig, kv: tuple[LayerKV, ...], inputs: ForwardBatch,
            sampling: SamplingTensors, penalties: PenaltyState, token_pool: Tensor, gather_rows: Tensor) -> StepTensors:
    """One step on the device: gather placeholder tokens, forward, sample, store tokens in the pool.

    kv and token_pool [max_batch] are written in place (DONATED). gather_rows [T] is, per token row,
    the pool row holding its token, or -1 when inputs.token_ids has it.
    """
    placeholder = gather_rows >= 0  # [T]
    token_ids = torch.where(placeholder, token_pool[gather_rows.clamp(min=0)], inputs.token_ids)  # [T]
    inputs = ForwardBatch(token_ids=token_ids, positions=inputs.positions, slot_mapping=inputs.slot_mapping,
                          query_start_loc=inputs.query_start_loc, seq_lens=inputs.seq_lens,
                          page_table=inputs.page_table, logits_indices=inputs.logits_indices)
    # A placeholder is an output token the host's penalty counts have not seen yet.
    last = inputs.logits_indices  # [B]
    unseen = torch.where(placeholder[last], token_ids[last], -1)  # [B]
    penalties = PenaltyState(prompt_mask=penalties.prompt_mask,
                             output_counts=count_tokens(penalties.output_counts, unseen))
    out = sample(forward(params, cfg, inputs, kv), sampling, penalties)
    token_pool[: out.tokens.shape[0]].copy_(out.tokens)
    return out.tokens, out.logprobs, out.ranks, out.topk_ids, out.topk_logprobs


class ModelEngine:
    """Runs steps: a ScheduledBatch in, the sampled token of each sampling sequence out."""

    def __init__(self, params: Params, cfg: ModelConfig, engine_cfg: EngineConfig) -> None:
        self.params = params
        self.cfg = cfg
        self.engine_cfg = engine_cfg
        self.device = params["embed"].device
        self._step = self._compiled_step() if engine_cfg.compile else step_fn
        self._warm = False
        # The second donated buffer: the last sampled token of each row of the previous step.
        self._token_pool = torch.zeros(engine_cfg.max_batch_size, dtype=torch.int64, device=self.device)
        self._prev_rows: dict[int, int] = {}  # request id -> its row in the last launched step
        rows = engine_cfg.max_batch_size
        self._no_penalties = PenaltyState(  # shared by every batch without penalized rows
            prompt_mask=torch.zeros(rows, cfg.vocab_size, dtype=torch.bool, device=self.device),
            output_counts=torch.zeros(rows, cfg.vocab_size, dtype=torch.int32, device=self.device))

    def peak_activation_bytes(self) -> int:
        """Device memory the largest buckets need beyond weights, measured by running them eagerly (CUDA only)."""
        buckets = self.engine_cfg.buckets
        if self.device.type != "cuda" or buckets is None:
            return 0
        probe = KVPool.allocate(self.cfg, 2, self.engine_cfg.page_size, self.params["embed"].dtype, self.device)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        with torch.inference_mode():
            largest = (max(buckets.all_keys(), key=lambda k: (k.num_tokens, k.num_seqs)),
                       BucketKey(num_tokens=buckets.decode_sizes[-1], num_seqs=buckets.decode_sizes[-1], decode=True))
            for key in largest:
                step_fn(self.params, self.cfg, probe.layers, *self._padding_batch(key))
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - base

    def warmup(self, kv: KVPool) -> KVPool:
        """Compile and record every bucket with all-padding batches; kv is DONATED. Run on the serving thread."""
        if self.engine_cfg.compile and self.device.type == "cuda":
            _cudagraph_thread_state()
        layers = kv.take()
        with torch.inference_mode():  # the grad mode is part of the compiled graph's guards
            if not self.engine_cfg.compile:
                # One throwaway step loads kernels and op registrations, so the first request is not slowed.
                step_fn(self.params, self.cfg, layers, *self._padding_batch(BucketKey(num_tokens=1, num_seqs=1,
                                                                                      decode=True)))
            else:
                static = [self._token_pool, *_tensors(self.params), *_tensors(self._no_penalties.prompt_mask),
                          self._no_penalties.output_counts, *(t for layer in layers for t in layer)]
                for tensor in static:
                    torch._dynamo.mark_static_address(tensor)
                start = time.perf_counter()
                for key in self.engine_cfg.buckets.all_keys():
                    for _ in range(3):  # cudagraph trees: warm-up run, then record, then replay
                        self._step(self.params, self.cfg, layers, *self._padding_batch(key))
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                log.info("compiled and captured %d buckets in %.1f s", len(self.engine_cfg.buckets.all_keys()),
                         time.perf_counter() - start)
        self._warm = True
        return KVPool(layers)

    def launch(self, kv: KVPool, batch: ScheduledBatch, sequences: Mapping[int, SequenceState]) -> tuple[KVPool, InFlight]:
        """Queue the batch on the device and return at once; kv is DONATED. Raises StepFailed with the live kv."""
        assert self._warm, "warmup() must run before the first step"
        layers = kv.take()
        try:
            with torch.inference_mode():
                if batch.page_copies:  # forked beams' partial pages, copied before the step writes into them
                    copy_pages(layers, batch.page_copies)
                args = self._inputs(batch, sequences)
                if self.engine_cfg.compile:
                    with torch.compiler.set_stance("fail_on_recompile"):
                        out = self._step(self.params, self.cfg, layers, *args)
                else:
                    out = self._step(self.params, self.cfg, layers, *args)
                # Copy the results out before the next replay overwrites the graph's outputs.
                host = tuple(_to_host(t) for t in out)
                ready = None
                if self.device.type == "cuda":
                    ready = torch.cuda.Event()
                    ready.record()
        except Exception as err:
            # The pool is intact apart from this batch's rows, whose requests the caller fails.
            raise StepFailed(KVPool(layers), err) from err
        self._prev_rows = {s.request_id: row for row, s in enumerate(batch.seqs)}
        # Rows whose top-20 is read back: for their logprobs, or as their beam's candidates.
        top_rows = frozenset(row for row, s in enumerate(batch.seqs)
                             if (p := sequences[s.request_id].request.params).logprobs is not None or p.use_beam_search)
        return KVPool(layers), InFlight(batch=batch, host=host, ready=ready, top_rows=top_rows)

    def collect(self, inflight: InFlight) -> dict[int, SampledToken]:
        """Wait for a launched step (the step's one synchronization point) and read its sampled tokens."""
        if inflight.ready is not None:
            inflight.ready.synchronize()
        # Host buffers from here on (the copy has landed); .numpy() raises for a device tensor, so
        # reading them can never synchronize.
        tokens, logprobs, ranks, top_ids, top_logprobs = (t.numpy() for t in inflight.host)
        return {s.request_id: SampledToken(
                    token=int(tokens[row]), logprob=float(logprobs[row]), rank=int(ranks[row]),
                    top_ids=tuple(map(int, top_ids[row])) if row in inflight.top_rows else (),
                    top_logprobs=tuple(map(float, top_logprobs[row])) if row in inflight.top_rows else ())
                for row, s in enumerate(inflight.batch.seqs) if s.sample}

    def execute(self, kv: KVPool, batch: ScheduledBatch,
                sequences: Mapping[int, SequenceState]) -> tuple[KVPool, dict[int, SampledToken]]:
        """launch then collect: one step run to completion."""
        kv, inflight = self.launch(kv, batch, sequences)
        return kv, self.collect(inflight)

    def _inputs(self, batch: ScheduledBatch, sequences: Mapping[int, SequenceState]):
        key = None if self.engine_cfg.buckets is None else self.engine_cfg.buckets.key(batch)
        inputs = pack(batch.seqs, self.engine_cfg.page_size, self.device,
                      num_tokens=None if key is None else key.num_tokens,
                      num_seqs=None if key is None else key.num_seqs,
                      max_pages=None if key is None else self.engine_cfg.max_pages_per_seq)
        rows = inputs.num_seqs
        params = [sequences[s.request_id].request.params for s in batch.seqs]
        seeds = [request_seed(p.seed, self.engine_cfg.seed, s.request_id) for p, s in zip(params, batch.seqs)]
        positions = [s.start_pos + len(s.token_ids) for s in batch.seqs]
        sampling = SamplingTensors.build(params, seeds, positions, self.device, pad_to=rows)
        gather = [-1] * inputs.num_tokens
        row = 0
        for s in batch.seqs:  # a placeholder is only ever a decode's single token
            if len(s.token_ids) == 1 and s.token_ids[0] == PLACEHOLDER:
                gather[row] = self._prev_rows[s.request_id]
            row += len(s.token_ids)
        gather_rows = _to_device(torch.tensor(gather, dtype=torch.int64), self.device)
        return inputs, sampling, self._penalties(batch, sequences, params, rows), self._token_pool, gather_rows

    def _penalties(self, batch, sequences, params, rows: int) -> PenaltyState:
        if not any(p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty for p in params):
            return PenaltyState(prompt_mask=self._no_penalties.prompt_mask[:rows],
                                output_counts=self._no_penalties.output_counts[:rows])
        seqs = [sequences[s.request_id] for s in batch.seqs]
        # The host's outputs; a token still in flight is counted on the device (see step_fn).
        prompts, outputs = [s.request.prompt_token_ids for s in seqs], [s.output_token_ids for s in seqs]
        return PenaltyState.build(prompts, outputs, self.cfg.vocab_size, self.device, pad_to=rows)

    def _padding_batch(self, key: BucketKey):
        inputs = pack([], self.engine_cfg.page_size, self.device, num_tokens=key.num_tokens,
                      num_seqs=key.num_seqs, max_pages=self.engine_cfg.max_pages_per_seq)
        sampling = SamplingTensors.build([], [], [], self.device, pad_to=key.num_seqs)
        penalties = PenaltyState(prompt_mask=self._no_penalties.prompt_mask[:key.num_seqs],
                                 output_counts=self._no_penalties.output_counts[:key.num_seqs])
        gather_rows = torch.full((key.num_tokens,), -1, dtype=torch.int64, device=self.device)
        return inputs, sampling, penalties, self._token_pool, gather_rows

    def _compiled_step(self):
        buckets = self.engine_cfg.buckets
        assert buckets is not None, "compiling needs buckets"
        # Headroom over the bucket count; after warm-up any recompile is an error.
        limit = 2 * len(buckets.all_keys()) + 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
        torch._dynamo.config.accumulated_recompile_limit = max(
            torch._dynamo.config.accumulated_recompile_limit, 4 * limit)
        # mode="reduce-overhead" is the option triton.cudagraphs; spelled out so more options can join it.
        options = {"triton.cudagraphs": self.device.type == "cuda", **dict(self.engine_cfg.inductor_options)}
        # dynamic=None: the first two sizes compile, after which one shape-generic graph serves every
        # bucket (automatic dynamic shapes); CUDA graphs are still recorded per bucket size.
        return torch.compile(step_fn, options=options, fullgraph=True, dynamic=self.engine_cfg.compile_dynamic)


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


def _to_host(t: Tensor) -> Tensor:
    if t.device.type != "cuda":
        return t.clone()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def _tensors(tree) -> list[Tensor]:
    if isinstance(tree, Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _tensors(v)]
    if isinstance(tree, (tuple, list)):
        return [t for v in tree for t in _tensors(v)]
    return []
