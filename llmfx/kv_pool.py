"""KVPool: the paged KV memory on the device, a donated handle that is spent once a step takes it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from llmfx.config import ModelConfig

LayerKV = tuple[Tensor, Tensor]  # K and V, each [P, S, K, D] by shape, stored head-major (see KVPool)


class SpentHandleError(RuntimeError):
    """A donated buffer was used after a step took it; use the handle that step returned."""


class KVPool:
    """Per layer K and V pages [P, S, K, D]; page 0 is the null page that padding writes to.

    Each page stores one KV head's S tokens together ([P, K, S, D] in memory; the tensors are that
    storage seen as [P, S, K, D], and every op reads them by strides): a decode program, which reads
    one KV head, then streams 2 KB runs (TinyLlama) instead of 128-byte pieces 512 bytes apart. On
    the H200 the decode kernel took 3.7% less time this way at batch 256 and 1-3% less at 1-64
    (benchmarks/results/2026-11-30-nvidia-h200-decode-attention-sweep-{nhd,hnd}.json).

    The pool is donated as in JAX: `take()` hands the tensors to one step, which writes them in
    place, and this handle is spent; the step returns a fresh handle over the same memory.
    """

    __slots__ = ("_layers",)

    def __init__(self, layers: tuple[LayerKV, ...]) -> None:
        self._layers: tuple[LayerKV, ...] | None = layers

    @staticmethod
    def allocate(cfg: ModelConfig, num_pages: int, page_size: int, dtype: torch.dtype, device) -> KVPool:
        """Zeroed pages for every layer; num_pages counts the null page."""
        if num_pages < 2:
            raise ValueError(f"the KV pool needs at least 2 pages (the null page and one more), got {num_pages}")
        shape = (num_pages, cfg.num_kv_heads, page_size, cfg.head_dim)
        return KVPool(tuple(
            (torch.zeros(shape, dtype=dtype, device=device).transpose(1, 2),
             torch.zeros(shape, dtype=dtype, device=device).transpose(1, 2))
            for _ in range(cfg.num_layers)
        ))

    def take(self) -> tuple[LayerKV, ...]:
        """The layers, for exactly one step; the handle is spent afterwards."""
        layers = self.layers
        self._layers = None
        return layers

    @property
    def layers(self) -> tuple[LayerKV, ...]:
        if self._layers is None:
            raise SpentHandleError("this KVPool handle was donated to a step; use the handle the step returned")
        return self._layers

    @property
    def num_pages(self) -> int:
        return self.layers[0][0].shape[0]

    @property
    def page_size(self) -> int:
        return self.layers[0][0].shape[1]


def copy_pages(layers: tuple[LayerKV, ...], copies: Sequence[tuple[int, int]]) -> None:
    """Copy page src to page dst, for each (src, dst) in copies, in every layer's K and V; layers are DONATED.

    The reference page copy: index ops only (no host sync), queued on the current stream ahead of the
    step that writes into the dst pages. Sources and destinations must be disjoint.
    """
    device = layers[0][0].device
    index = torch.tensor(copies, dtype=torch.int64).reshape(-1, 2)  # [N, 2]
    if device.type == "cuda":
        index = index.pin_memory()
    index = index.to(device, non_blocking=True)
    src, dst = index[:, 0], index[:, 1]  # [N] each
    for k, v in layers:
        k[dst] = k[src]  # [N, S, K, D]
        v[dst] = v[src]


# Without a GPU to measure there is no free-memory figure to take a fraction of: CPU pools hold
# this many tokens unless KvCacheConfig.max_tokens says otherwise.
CPU_DEFAULT_KV_TOKENS = 65536


def kv_pool_pages(cfg: ModelConfig, kv_cfg, dtype: torch.dtype, device: torch.device, max_seq_len: int,
                  reserved_bytes: int = 0) -> int:
    """Pages to allocate (null page included): max_tokens, capped on CUDA by the free-memory fraction.

    On CUDA the fraction applies to the memory free after weights, less reserved_bytes (the step's
    measured activation peak, which the CUDA graphs' private pools will hold).
    """
    page_size = kv_cfg.page_size
    bytes_per_page = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize * page_size
    limits = []
    if kv_cfg.max_tokens is not None:
        limits.append(-(-kv_cfg.max_tokens // page_size))
    if device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(device)
        usable = int(free_bytes * kv_cfg.free_gpu_memory_fraction) - reserved_bytes
        limits.append(max(usable, 0) // bytes_per_page)
    elif kv_cfg.max_tokens is None:
        limits.append(-(-max(CPU_DEFAULT_KV_TOKENS, max_seq_len) // page_size))
    pages = min(limits)
    if pages < 1:
        raise ValueError(f"the KV cache gets no pages: KvCacheConfig(max_tokens={kv_cfg.max_tokens}, "
                         f"free_gpu_memory_fraction={kv_cfg.free_gpu_memory_fraction}) leaves less than one page "
                         f"of {page_size} tokens ({bytes_per_page} bytes)")
    return pages + 1
