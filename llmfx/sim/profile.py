"""`llmfx profile`: time real engine steps over a grid of batch shapes and fit a CostModel.

The engine is built as `llmfx.llm.LLM` builds it and `llmfx.executor.step` is driven by hand with
synthetic requests (random prompt tokens, greedy, EOS ignored, prefix cache off), so every
measured step is exactly a step the engine runs.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from llmfx import startup
from llmfx.executor import AbortRequest, AddRequest, ExecutorConfig, ExecutorState, StepOutput, step
from llmfx.kv_cache import KvCacheConfig
from llmfx.model_engine import ModelEngine
from llmfx.sampling_params import SamplingParams
from llmfx.scheduler import Request, SchedulerConfig
from llmfx.sim.cost_model import BatchShape, CostModel, fit_cost_model
from llmfx.weights import load_params, resolve_model


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


def build_engine(model: str = "tiny", *, device: str | None = None, dtype: str = "auto", load_format: str = "auto",
                 kv_tokens: int | None = None, page_size: int = 16, max_batch_size: int = 256,
                 max_num_tokens: int = 8192, max_seq_len: int | None = None,
                 scheduler: SchedulerConfig | None = None, enable_block_reuse: bool = True, seed: int = 0,
                 enforce_eager: bool = False) -> Engine:
    """The engine LLM(model, ...) would build (llmfx.startup.build_engine), warmed up on this thread."""
    parts = startup.build_engine(
        resolve_model(model), dtype=dtype, device=torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")),
        max_batch_size=max_batch_size, max_num_tokens=max_num_tokens, max_seq_len=max_seq_len,
        kv_cache_config=KvCacheConfig(max_tokens=kv_tokens, page_size=page_size, enable_block_reuse=enable_block_reuse),
        scheduler_config=scheduler, seed=seed, load_format=load_format, enforce_eager=enforce_eager, overlap=False)
    state = dataclasses.replace(parts.state, kv=parts.engine.warmup(parts.state.kv))
    return Engine(state=state, engine=parts.engine, cfg=parts.cfg, vocab_size=parts.engine.cfg.vocab_size)


def _timed(e: Engine, inbox=()) -> tuple[StepOutput, float]:
    if e.engine.device.type == "cuda":
        torch.cuda.synchronize(e.engine.device)
    t0 = time.perf_counter()
    out = e.step(inbox)  # ends in the step's one device-to-host sync
    return out, time.perf_counter() - t0


def profile(model: str = "tinyllama-1.1b", *, batch_sizes: Sequence[int] = (1, 8, 64, 256),
            context_lens: Sequence[int] = (128, 1024), prefill_lens: Sequence[int] = (128, 512, 2048),
            decode_steps: int = 8, warmup_steps: int = 2, device: str | None = None, dtype: str = "auto",
            load_format: str = "dummy", page_size: int = 16, seed: int = 0,
            log: Callable[[str], None] | None = None) -> CostModel:
    """Measure decode steps (batch x context) and prefill steps (prompt length), fit and return a CostModel."""
    for name, values in (("batch_sizes", batch_sizes), ("context_lens", context_lens), ("prefill_lens", prefill_lens)):
        if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
            raise ValueError(f"profile {name} must be a non-empty list of integers >= 1, got {list(values)!r}")
    for name, v in (("decode_steps", decode_steps), ("warmup_steps", warmup_steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "decode_steps" else 0):
            raise ValueError(f"profile {name} must be an integer >= {1 if name == 'decode_steps' else 0}, got {v!r}")
    log = log or (lambda msg: None)
    new_tokens = warmup_steps + decode_steps + 3  # + the prefill token, the first decode step, a spare
    max_seq_len = max(max(context_lens) + new_tokens, max(prefill_lens) + 1) + 1
    kv_tokens = max(max(batch_sizes) * (max(context_lens) + new_tokens + page_size), max(prefill_lens) + 2 * page_size)
    e = build_engine(model, device=device, dtype=dtype, load_format=load_format, page_size=page_size,
                     kv_tokens=kv_tokens, max_batch_size=max(batch_sizes),
                     max_num_tokens=max(8192, max(prefill_lens)), max_seq_len=max_seq_len,
                     enable_block_reuse=False, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    ids = itertools.count()

    def requests(n: int, prompt_len: int, max_tokens: int) -> list[AddRequest]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
        return [AddRequest(Request(request_id=next(ids), prompt_token_ids=tuple(
            torch.randint(0, e.vocab_size, (prompt_len,), generator=gen).tolist()), params=params))
            for _ in range(n)]

    def clear() -> None:
        sched = e.state.sched
        e.step([AbortRequest(tuple(s.request_id for s in sched.running + sched.waiting))])

    points: list[tuple[BatchShape, float]] = []
    for prompt_len in prefill_lens:
        for timed in (False, True):  # the first run of a shape warms up allocators and kernels
            out, seconds = _timed(e, requests(1, prompt_len, 1))
            if timed:
                points.append((BatchShape.of(out.batch), seconds))
            clear()
        log(f"prefill {prompt_len:>6} tokens: {seconds * 1e3:8.3f} ms")
    for batch in batch_sizes:
        for context in context_lens:
            inbox = requests(batch, context, new_tokens)
            while True:  # prefill everyone (chunked under max_num_tokens)
                out = e.step(inbox)
                inbox = []
                if len(out.batch.seqs) == batch and all(len(s.token_ids) == 1 for s in out.batch.seqs):
                    break
            for _ in range(warmup_steps):
                e.step()
            times = []
            for _ in range(decode_steps):
                out, seconds = _timed(e)
                assert len(out.batch.seqs) == batch, "a profiled request finished early"
                points.append((BatchShape.of(out.batch), seconds))
                times.append(seconds)
            clear()
            log(f"decode batch {batch:>4} context {context:>6}: {sorted(times)[len(times) // 2] * 1e3:8.3f} ms")
    dev = e.engine.device
    meta = {
        "source": "measured by llmfx profile",
        "model": model,
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "dtype": dtype,
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "page_size": page_size,
    }
    return fit_cost_model(points, meta)
