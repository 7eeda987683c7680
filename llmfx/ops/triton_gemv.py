"""Triton matrix-vector kernel for a few rows: y = x @ weight.T with x [M, K] (M <= 8), weight [N, K].

At decode batch sizes the linear layers read their weights and do almost no arithmetic, so the kernel
is built for bandwidth, not for tensor cores: no tl.dot (which pads the rows to 16); each program
loads a [BLOCK_N, BLOCK_K] weight tile once and multiplies it by the matching x chunk of each of the M
rows in turn, so a weight element is read once per call whatever M is. The products accumulate element-wise in float32
and are summed over K once, after the loop.

K is cut into SPLIT_K ranges of whole BLOCK_K blocks, one program per (column block, range), so even
a narrow layer has enough programs in flight to keep HBM busy. With more than one range the partial
sums go to a float32 workspace [splits, M, N] and a second kernel adds them in split order: no
atomics, so two calls give the same bits. Grids and the workspace follow from shapes alone, so a call
never waits on the device and replays inside a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from llmfx.ops.triton_pdl import pdl_launch, wait_for_prior_kernel

MAX_ROWS = 8


@dataclass(frozen=True, slots=True)
class GemvConfig:
    """Launch settings of one gemv call."""

    block_n: int
    block_k: int
    split_k: int  # at most this many K ranges (fewer when the K blocks run out)
    num_warps: int = 4
    # 1: plain loads into registers, x served by L1. >= 2: cp.async pipelining, which also copies every
    # row's x chunk into shared memory once per warp that reads it (bypassing L1), so it costs more as M grows.
    num_stages: int = 1

    def splits(self, k: int) -> tuple[int, int]:
        """(number of K ranges, elements per range): see k_ranges."""
        return k_ranges(k, self.block_k, self.split_k)


def k_ranges(k: int, block_k: int, split_k: int) -> tuple[int, int]:
    """(number of K ranges, elements per range): at most split_k ranges of whole block_k blocks, none empty."""
    k_blocks = triton.cdiv(k, block_k)
    per_split = triton.cdiv(k_blocks, split_k)
    return triton.cdiv(k_blocks, per_split), per_split * block_k


# (largest M, config) per shape class: the best single config of each class and M in the H200 sweep of
# kernels alone (benchmarks/small_m_gemm.py; results/2026-11-30-nvidia-h200-small-m-gemm-small-m-gemv.json).
# Only M = 1 matched cuBLAS there (a layer's four matmuls 35.1 vs 35.8 us); from M = 2 cuBLAS won. The M = 1
# rows were then swept inside the batch-1 forward's CUDA graph, where the GEMVs run back to back with PDL
# (benchmarks/gemv_graph_sweep.py; results/2026-11-30-nvidia-h200-gemv_graph_sweep.json): square went from
# 16 x 512 to 4 x 1024 with 8 warps (forward 1,102 -> 1,010 us: four times the programs, each streaming
# whole rows); wide and deep kept theirs (the best was within 0.3%). The M = 2 rows are the best of each class
# in the batch-2 forward (results/2026-11-30-nvidia-h200-gemv_graph_sweep_b2.json).
_CONFIGS: dict[str, tuple[tuple[int, GemvConfig], ...]] = {
    "square": ((1, GemvConfig(4, 1024, 1, num_warps=8)), (2, GemvConfig(8, 512, 1)), (4, GemvConfig(4, 512, 1)),
               (8, GemvConfig(4, 256, 1))),  # qkv, o: N ~ K ~ 2k
    "deep": ((1, GemvConfig(16, 256, 8)), (2, GemvConfig(16, 256, 4, num_warps=8)), (4, GemvConfig(4, 512, 1)),
             (8, GemvConfig(8, 256, 1))),  # down: K much larger than N
    "wide": ((1, GemvConfig(16, 256, 1)), (2, GemvConfig(32, 128, 1)), (4, GemvConfig(8, 128, 1)),
             (8, GemvConfig(8, 128, 1))),  # gate_up, lm_head: N alone gives hundreds of column blocks
}


def shape_class(n: int, k: int) -> str:
    """The _CONFIGS row of an [N, K] weight."""
    if n >= 4 * k or n >= 8192:
        return "wide"
    if k >= 2 * n:
        return "deep"
    return "square"


def gemv_config(m: int, n: int, k: int) -> GemvConfig:
    """The shipped launch settings for x [m, k] @ weight[n, k].T."""
    return next(cfg for most, cfg in _CONFIGS[shape_class(n, k)] if m <= most)


@triton.jit
def _row_accumulators(ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One float32 [BLOCK_N, BLOCK_K] accumulator per row of x, as a tuple (rows are unrolled)."""
    accs = ()
    for _ in tl.static_range(ROWS):
        accs = accs + (tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32),)
    return accs


@triton.jit
def _gemv_partial_kernel(out_ptr, x_ptr, w_ptr, N, K, k_per_split, stride_xm, stride_wn, stride_om, stride_os,
                         ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                         NUM_STAGES: tl.constexpr, PDL: tl.constexpr):
    """out[split, m, cols] = sum over this split's K range of x[m, k] * w[cols, k], for the ROWS rows of x.

    With one split, out is the result [M, N] itself (stride_os unused) and gets x's dtype.
    """
    wait_for_prior_kernel(PDL)
    split = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    # Columns past N read row N - 1 again instead of being masked (their sums are never stored), so
    # whole-block weight loads carry no predicate.
    w_ptrs = w_ptr + tl.minimum(cols, N - 1).to(tl.int64)[:, None] * stride_wn + (k_lo + offs_k)[None, :]
    # x's chunk is loaded at the weight tile's shape (every column reads the same addresses, which L1
    # serves): x then has the tile's layout and the product needs no shuffle through shared memory.
    x_ptrs = tl.broadcast_to(x_ptr + (k_lo + offs_k)[None, :], (BLOCK_N, BLOCK_K))
    accs = _row_accumulators(ROWS, BLOCK_N, BLOCK_K)
    # An explicit stage count: without it Triton pipelines only loads that feed a tl.dot.
    for k in tl.range(k_lo, k_hi, BLOCK_K, num_stages=NUM_STAGES):
        k_ok = (k + offs_k < k_hi)[None, :]
        if EVEN_K:  # every range is whole blocks: no mask, so loads stay 16 bytes wide
            w = tl.load(w_ptrs)
        else:
            w = tl.load(w_ptrs, mask=k_ok, other=0.0)
        w = w.to(tl.float32)
        updated = ()
        for m in tl.static_range(ROWS):  # every row of x against the one loaded tile
            if EVEN_K:
                x = tl.load(x_ptrs + m * stride_xm)
            else:
                x = tl.load(x_ptrs + m * stride_xm, mask=k_ok, other=0.0)
            updated = updated + (accs[m] + w * x.to(tl.float32),)
        accs = updated
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    for m in tl.static_range(ROWS):  # one reduction over K per row, after the loop
        tl.store(out_ptr + split * stride_os + m * stride_om + cols,
                 tl.sum(accs[m], axis=1).to(out_ptr.dtype.element_ty), mask=cols < N)


@triton.jit
def _gemv_reduce_kernel(out_ptr, ws_ptr, numel, SPLITS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """out.flat = sum of the SPLITS partials ws[s].flat, added in split order (the same bits every call)."""
    wait_for_prior_kernel(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    total = tl.load(ws_ptr + offs, mask=ok, other=0.0)
    for s in tl.static_range(1, SPLITS):
        total += tl.load(ws_ptr + s * numel + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=ok)


_REDUCE_BLOCK = 256  # small: the sum is latency-bound, and more programs spread it over more SMs


def gemv(x: Tensor, weight: Tensor, *, config: GemvConfig | None = None) -> Tensor:
    """x @ weight.T for x [M, K] with 1 <= M <= 8 and weight [N, K] (nn.Linear's layout): [M, N] in x's dtype.

    Accumulates in float32; bitwise reproducible for a given config (no atomics).
    """
    (rows, k), (n, k_w) = x.shape, weight.shape
    assert k == k_w, f"x [M, K] and weight [N, K] disagree on K: {k} vs {k_w}"
    assert 1 <= rows <= MAX_ROWS, f"gemv takes 1 to {MAX_ROWS} rows, got {rows}"
    assert x.dtype == weight.dtype, "x and weight must share a dtype"
    assert x.stride(1) == 1 and weight.stride(1) == 1, "x and weight need contiguous rows"
    cfg = config or gemv_config(rows, n, k)
    splits, k_per_split = cfg.splits(k)
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    partial = out if splits == 1 else torch.empty(splits, rows, n, dtype=torch.float32, device=x.device)
    _gemv_partial_kernel[(triton.cdiv(n, cfg.block_n), splits)](
        partial, x, weight, n, k, k_per_split, x.stride(0), weight.stride(0), n,
        partial.stride(0) if splits > 1 else 0, ROWS=rows, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        EVEN_K=k % cfg.block_k == 0, NUM_STAGES=cfg.num_stages, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **pdl_launch(x.device))
    if splits > 1:
        _gemv_reduce_kernel[(triton.cdiv(rows * n, _REDUCE_BLOCK),)](
            out, partial, rows * n, SPLITS=splits, BLOCK=_REDUCE_BLOCK, num_warps=4, **pdl_launch(x.device))
    return out
