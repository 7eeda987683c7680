"""Building an engine: load weights, measure activation memory, size and allocate the KV pool.

LLM and the profiler both build through `build_engine`, so what is profiled is what is served.
Warm-up (compile and CUDA-graph capture) is left to the caller, on the thread that will step.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from llmfx.buckets import make_buckets
from llmfx.dtypes import resolve_dtype
from llmfx.executor import ExecutorConfig, ExecutorState
from llmfx.kv_cache import KvCacheConfig, new_page_pool
from llmfx.kv_pool import KVPool, kv_pool_pages
from llmfx.model_engine import EngineConfig, ModelEngine, check_graph_capture
from llmfx.scheduler import SchedulerConfig, SchedulerLimits, new_scheduler_state
from llmfx.weights import ModelSource, load_params


DEFAULT_COMPILE_CACHE = Path("~/.cache/llmfx/inductor").expanduser()


def use_persistent_compile_cache() -> Path:
    """Point inductor's on-disk cache at ~/.cache/llmfx/inductor unless TORCHINDUCTOR_CACHE_DIR is set.

    Inductor reads the variable when it first compiles, so a warm start reuses the kernels and
    graphs of earlier processes; setting it here (not at import) leaves users' own choice alone.
    """
    chosen = os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(DEFAULT_COMPILE_CACHE))
    return Path(chosen)


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineParts:
    """Everything a PyExecutor needs; `state.kv` is the freshly allocated, not yet warmed, pool."""

    state: ExecutorState
    engine: ModelEngine
    cfg: ExecutorConfig
    num_pages: int
    timings: Mapping[str, float]


def build_engine(source: ModelSource, *, dtype: str | torch.dtype = "auto", device: torch.device,
                 max_batch_size: int = 256, max_num_tokens: int = 8192, max_seq_len: int | None = None,
                 kv_cache_config: KvCacheConfig | None = None, scheduler_config: SchedulerConfig | None = None,
                 seed: int = 0, load_format: str = "auto", enforce_eager: bool = False, overlap: bool = True,
                 cuda_graph_batch_sizes: Sequence[int] | None = None, compile_dynamic: bool | None = None,
                 inductor_options: Mapping[str, object] | None = None,
                 cuda_graph_capture: str = "manual") -> EngineParts:
    """Validate the engine arguments, load weights, size the KV pool from what is left, allocate it."""
    cfg = source.config
    max_seq_len = cfg.max_position_embeddings if max_seq_len is None else max_seq_len
    for name, value in (("max_batch_size", max_batch_size), ("max_num_tokens", max_num_tokens),
                        ("max_seq_len", max_seq_len), ("seed", seed)):
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "seed" else 1):
            raise ValueError(f"{name} must be a {'non-negative' if name == 'seed' else 'positive'} integer, "
                             f"got {value!r}")
    check_graph_capture(cuda_graph_capture, "cuda_graph_capture")  # before any weights load
    kv_cache_config = kv_cache_config or KvCacheConfig()
    page_size = kv_cache_config.page_size
    buckets = make_buckets(max_batch_size, max_num_tokens, cuda_graph_batch_sizes)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    params = load_params(source, dtype=dtype, device=device, load_format=load_format, seed=seed,
                         max_positions=max_seq_len)
    timings["load"] = time.perf_counter() - started
    use_graphs = device.type == "cuda" and not enforce_eager
    if use_graphs:
        use_persistent_compile_cache()
    engine = ModelEngine(params, cfg, EngineConfig(
        page_size=page_size, seed=seed, max_pages_per_seq=-(-max_seq_len // page_size),
        max_batch_size=max_batch_size, buckets=buckets if use_graphs else None, compile=use_graphs,
        compile_dynamic=compile_dynamic, inductor_options=tuple((inductor_options or {}).items()),
        graph_capture=cuda_graph_capture))
    started = time.perf_counter()
    activation_bytes = engine.peak_activation_bytes()  # measured before the KV pool takes the rest
    timings["profile"] = time.perf_counter() - started
    kv_dtype = resolve_dtype(dtype, cfg.dtype)
    num_pages = kv_pool_pages(cfg, kv_cache_config, kv_dtype, device, max_seq_len, reserved_bytes=activation_bytes)
    started = time.perf_counter()
    state = ExecutorState(
        sched=new_scheduler_state(new_page_pool(num_pages, page_size, kv_cache_config.enable_block_reuse)),
        kv=KVPool.allocate(cfg, num_pages, page_size, kv_dtype, device),
    )
    timings["kv_allocation"] = time.perf_counter() - started
    limits = SchedulerLimits(max_batch_size=max_batch_size, max_num_tokens=max_num_tokens, max_seq_len=max_seq_len,
                             page_size=page_size)
    executor_cfg = ExecutorConfig(limits=limits, scheduler=scheduler_config or SchedulerConfig(), overlap=overlap)
    return EngineParts(state=state, engine=engine, cfg=executor_cfg, num_pages=num_pages, timings=timings)
