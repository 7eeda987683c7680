"""`llmfx profile`: time the serving loop over a grid of batch shapes and fit a CostModel.

`profile_llm` takes an LLM that is already built, so what is timed is what serves: the same
engine, buckets and overlap scheduler, each step's host work (schedule, pack, postprocess,
responses) included. It submits synthetic requests (random prompt tokens, greedy, EOS ignored)
through `generate` and reads the loop's own step trace (`LLM.trace_steps`); `charge_steps` turns
the trace into the durations the simulator charges. `profile` builds the LLM and calls it.
`build_engine` gives a hand-driven engine (no thread) for tests and notebooks.
"""

from __future__ import annotations

import dataclasses
import datetime
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llmfx import startup
from llmfx.executor import (
    ExecutorConfig,
    ExecutorState,
    StepOutput,
    StepTiming,
    TracedBatch,
    has_pending_work,
    step,
)
from llmfx.kv_cache import KvCacheConfig
from llmfx.model_engine import ModelEngine
from llmfx.sampling_params import SamplingParams
from llmfx.scheduler import SchedulerConfig
from llmfx.sim.cost_model import BatchShape, CostModel, StepSample, fit_cost_model, fit_overlap_cost_model
from llmfx.weights import resolve_model


@dataclass(slots=True)
class Engine:
    """A hand-driven engine: `state` is rebound after every step (its KV handle is donated)."""

    state: ExecutorState
    engine: ModelEngine
    cfg: ExecutorConfig
    vocab_size: int

    def step(self, inbox=()) -> StepOutput:
        """One executor step; rebinds self.state."""
        self.state, out = step(self.state, inbox, self.engine, self.cfg)
        return out

    @property
    def has_pending_work(self) -> bool:
        """True while requests wait or run, or (overlap) a launched step awaits postprocessing."""
        return has_pending_work(self.state)


def build_engine(model: str = "tiny", *, device: str | None = None, dtype: str = "auto", load_format: str = "auto",
                 kv_tokens: int | None = None, page_size: int = 16, max_batch_size: int = 256,
                 max_num_tokens: int = 8192, max_seq_len: int | None = None,
                 scheduler: SchedulerConfig | None = None, enable_block_reuse: bool = True, seed: int = 0,
                 enforce_eager: bool = False, overlap: bool = True, cuda_graph_capture: str = "manual",
                 cuda_graph_batch_sizes: Sequence[int] | None = None, compile_dynamic: bool | None = None) -> Engine:
    """The engine LLM(model, ...) would build (llmfx.startup.build_engine), warmed up on this thread."""
    parts = startup.build_engine(
        resolve_model(model), dtype=dtype, device=torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")),
        max_batch_size=max_batch_size, max_num_tokens=max_num_tokens, max_seq_len=max_seq_len,
        kv_cache_config=KvCacheConfig(max_tokens=kv_tokens, page_size=page_size, enable_block_reuse=enable_block_reuse),
        scheduler_config=scheduler, seed=seed, load_format=load_format, enforce_eager=enforce_eager, overlap=overlap,
        cuda_graph_capture=cuda_graph_capture, cuda_graph_batch_sizes=cuda_graph_batch_sizes,
        compile_dynamic=compile_dynamic)
    state = dataclasses.replace(parts.state, kv=parts.engine.warmup(parts.state.kv))
    return Engine(state=state, engine=parts.engine, cfg=parts.cfg, vocab_size=parts.engine.cfg.vocab_size)


def shape_of(batch: TracedBatch) -> BatchShape:
    """The cost model's features of a traced batch."""
    return BatchShape(prefill_tokens=batch.num_tokens - batch.num_decode, decode_seqs=batch.num_decode,
                      context_tokens=batch.context_tokens)


def charge_steps(trace: Sequence[StepTiming]) -> list[StepSample]:
    """The batches a traced serving loop ran, each with the wall time the simulator charges it.

    An iteration lasts from the previous iteration's end (so the delivery of its outputs counts)
    to its own end, or from its own start when it followed a wait for work. Its time is charged to
    the batch it collected; an iteration that collected nothing (a launch after idling, a policy
    wait) passes its time on to the next batch collected, as the simulator's zero-time launch does.
    A batch's host work is the time its own launch took (the whole computation where launching is
    synchronous, as on a CPU) plus the rest of its collecting iteration outside launch and collect.
    """
    samples: list[StepSample] = []
    carry, carry_host, prev_end = 0.0, 0.0, None
    for it in trace:
        if it.waited_for_work or prev_end is None:
            began, carry, carry_host = it.start, 0.0, 0.0
        else:
            began = prev_end
        prev_end = it.end
        seconds = it.end - began
        launch_s = it.launched.launch_s if it.launched is not None else 0.0
        other = seconds - launch_s - it.collect_s  # schedule, postprocess, delivery, the inbox
        done = it.collected
        if done is None:
            carry += seconds
            carry_host += other
            continue
        host = None if done.launch_s is None else max(done.launch_s + other + carry_host, 0.0)
        samples.append(StepSample(shape=shape_of(done), seconds=carry + seconds, collect_s=it.collect_s, host_s=host))
        carry, carry_host = 0.0, 0.0
    return samples


def _check_sizes(name: str, values: Sequence[int]) -> tuple[int, ...]:
    values = tuple(values)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"profile {name} must be a non-empty list of integers >= 1, got {list(values)!r}")
    return values


def profile_llm(llm, *, batch_sizes: Sequence[int] = (1, 8, 64, 256), context_lens: Sequence[int] = (128, 1024),
                prefill_lens: Sequence[int] = (128, 512, 2048, 8192), decode_steps: int = 8, warmup_steps: int = 2,
                seed: int = 0, meta: Mapping[str, Any] | None = None,
                log: Callable[[str], None] | None = None) -> CostModel:
    """Time an idle, built LLM's serving loop over a grid of batch shapes; fit and return a CostModel.

    Decode points: batch x context requests, prefilled together, then decoding for at least
    warmup_steps + decode_steps steps. Prefill points: that many prompt tokens in one step, split
    into as few requests as max_seq_len allows. Each point runs twice on fresh random prompts (no
    prefix-cache hits); the first run warms allocators, and every step of the second becomes a
    sample. With overlap the fit is max(device, host) (fit_overlap_cost_model), else one linear
    model of the whole step; both pad to the engine's buckets.
    """
    batch_sizes = _check_sizes("batch_sizes", batch_sizes)
    context_lens = _check_sizes("context_lens", context_lens)
    prefill_lens = _check_sizes("prefill_lens", prefill_lens)
    for name, v, low in (("decode_steps", decode_steps, 1), ("warmup_steps", warmup_steps, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"profile {name} must be an integer >= {low}, got {v!r}")
    log = log or (lambda msg: None)
    ec = llm.executor_config
    lim = ec.limits
    pool = llm.scheduler_state.pool
    kv_tokens = (pool.num_pages - 1) * lim.page_size
    rng = random.Random(seed)
    vocab = llm.config.vocab_size

    def run(lengths: Sequence[int], max_tokens: int) -> list[StepSample]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
        fresh = lambda: [[rng.randrange(vocab) for _ in range(n)] for n in lengths]  # noqa: E731
        llm.generate(fresh(), params, use_tqdm=False)  # warms allocators and pinned buffers for these shapes
        with llm.trace_steps() as trace:
            llm.generate(fresh(), params, use_tqdm=False)
        return charge_steps(trace)

    samples: list[StepSample] = []
    longest = lim.max_seq_len - 1  # a prompt must be shorter than max_seq_len
    for tokens in prefill_lens:
        n = -(-tokens // longest)
        if tokens > lim.max_num_tokens or n > lim.max_batch_size:
            raise ValueError(f"profile prefill_lens: {tokens} tokens do not fit one step of this engine "
                             f"(max_num_tokens={lim.max_num_tokens}, max_batch_size={lim.max_batch_size}, "
                             f"max_seq_len={lim.max_seq_len})")
        lengths = [tokens // n + (i < tokens % n) for i in range(n)]
        got = run(lengths, 1)
        samples += got
        log(f"prefill {tokens:>6} tokens ({n} requests): {max(s.seconds for s in got) * 1e3:8.3f} ms")
    for batch in batch_sizes:
        if batch > lim.max_batch_size:
            raise ValueError(f"profile batch_sizes: {batch} exceeds the engine's max_batch_size={lim.max_batch_size}")
        for context in context_lens:
            # Requests prefilled in the first chunk decode while later ones prefill: give every
            # request enough tokens that all of them decode together for the steps asked for.
            prefill_steps = -(-batch * context // lim.max_num_tokens) + 1
            max_tokens = prefill_steps + warmup_steps + decode_steps + 2
            if context + max_tokens > lim.max_seq_len:
                raise ValueError(f"profile context_lens: {context} + {max_tokens} new tokens exceeds the engine's "
                                 f"max_seq_len={lim.max_seq_len}")
            need = batch * (context + max_tokens + lim.page_size)
            if need > kv_tokens:
                raise ValueError(f"profile: batch {batch} x context {context} needs about {need} KV tokens; "
                                 f"the pool holds {kv_tokens}")
            got = run([context] * batch, max_tokens)
            samples += got
            full = sorted(s.seconds for s in got if s.shape.decode_seqs == batch and not s.shape.prefill_tokens)
            shown = f"{full[len(full) // 2] * 1e3:8.3f} ms" if full else "no full-batch decode step"
            log(f"decode batch {batch:>4} context {context:>6}: {shown} (median, {len(got)} steps)")
    buckets = llm.buckets
    decode_buckets = buckets.decode_sizes if buckets is not None else ()
    token_buckets = buckets.token_counts if buckets is not None else ()
    info = {
        "source": "measured by llmfx profile",
        "gpu": torch.cuda.get_device_name(llm.device) if llm.device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "page_size": lim.page_size,
        "kv_tokens": kv_tokens,
        "max_batch_size": lim.max_batch_size,
        "max_num_tokens": lim.max_num_tokens,
        "max_seq_len": lim.max_seq_len,
        "overlap": ec.overlap,
        "grid": {"batch_sizes": list(batch_sizes), "context_lens": list(context_lens),
                 "prefill_lens": list(prefill_lens), "decode_steps": decode_steps, "warmup_steps": warmup_steps},
        **dict(meta or {}),
    }
    if ec.overlap:
        return fit_overlap_cost_model(samples, info, decode_buckets=decode_buckets, token_buckets=token_buckets)
    info["points"] = [s.row() for s in samples]
    return fit_cost_model([(s.shape, s.seconds) for s in samples], info, relative=True,
                          decode_buckets=decode_buckets, token_buckets=token_buckets)


def profile(model: str = "tinyllama-1.1b", *, batch_sizes: Sequence[int] = (1, 8, 64, 256),
            context_lens: Sequence[int] = (128, 1024), prefill_lens: Sequence[int] = (128, 512, 2048, 8192),
            decode_steps: int = 8, warmup_steps: int = 2, device: str | None = None, dtype: str = "auto",
            load_format: str = "dummy", page_size: int = 16, kv_tokens: int | None = None,
            max_batch_size: int = 256, max_num_tokens: int = 8192, max_seq_len: int | None = None,
            disable_overlap_scheduler: bool = False, enforce_eager: bool = False, enable_block_reuse: bool = False,
            seed: int = 0, log: Callable[[str], None] | None = None) -> CostModel:
    """Build the LLM that would serve (these are LLM's arguments) and profile it with profile_llm.

    The prefix cache is off unless asked for: the grid's prompts share nothing, so it would give no hits.
    """
    from llmfx.llm import LLM

    if kv_tokens is not None and (isinstance(kv_tokens, bool) or not isinstance(kv_tokens, int) or kv_tokens < 1):
        raise ValueError(f"kv_tokens must be None or an integer >= 1, got {kv_tokens!r}")
    with LLM(model, dtype=dtype, device=device, load_format=load_format, skip_tokenizer_init=True,
             max_batch_size=max_batch_size, max_num_tokens=max_num_tokens, max_seq_len=max_seq_len,
             kv_cache_config=KvCacheConfig(page_size=page_size, max_tokens=kv_tokens,
                                           enable_block_reuse=enable_block_reuse),
             disable_overlap_scheduler=disable_overlap_scheduler, enforce_eager=enforce_eager, seed=seed) as llm:
        return profile_llm(llm, batch_sizes=batch_sizes, context_lens=context_lens, prefill_lens=prefill_lens,
                           decode_steps=decode_steps, warmup_steps=warmup_steps, seed=seed, log=log,
                           meta={"model": model, "dtype": dtype, "prefix_cache": enable_block_reuse})

