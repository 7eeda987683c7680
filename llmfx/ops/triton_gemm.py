"""Triton tensor-core matmul for small decode batches: y = x @ weight.T with x [M, K], weight [N, K].

Between the GEMV's few rows and cuBLAS's territory (up to MAX_ROWS rows): row tiles of 16 to 64 cover M, and
each program streams a [BLOCK_N, K range] slice of the weight through tl.dot. With more than one K range
the partial sums go to a float32 workspace and the GEMV's reduce kernel adds them in split order: no
atomics, the same bits every call. Grids follow from shapes alone (CUDA-graph safe), and the kernel
launches with PDL like llmfx's other kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from llmfx.ops.triton_gemv import _REDUCE_BLOCK, _gemv_reduce_kernel, k_ranges, shape_class
from llmfx.ops.triton_pdl import pdl_launch, wait_for_prior_kernel


@dataclass(frozen=True, slots=True)
class GemmConfig:
    """Launch settings of one matmul call."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1  # at most this many K ranges of whole BLOCK_K blocks
    num_warps: int = 4
    num_stages: int = 4

    def splits(self, k: int) -> tuple[int, int]:
        """(number of K ranges, elements per range): see triton_gemv.k_ranges."""
        return k_ranges(k, self.block_k, self.split_k)


# (largest M, config or None) per shape class of triton_gemv.shape_class, for 3-64 rows; None leaves the range to
# cuBLAS. Each config is the best summed time over its rows and the class's shapes in the H200 sweep of kernels
# alone (benchmarks/mid_m_gemm.py), where each beat cuBLAS. M = 4, 8, 16 (results/2026-11-30-nvidia-h200-mid-m-
# gemm.json): square (qkv, o) 35.3 vs 38.3 us, wide (gate_up, lm_head) 140.2 vs 148.6, deep (down) 27.3 vs 30.6.
# M = 24, 32 (results/2026-11-30-nvidia-h200-mid-m-gemm-24-64-padded.json): square 26.0 vs 27.9, wide 100.6 vs
# 102.6, deep 20.1 vs 22.6. M = 40, 48 (same file): cuBLAS won qkv, gate_up and lm_head. M = 56, 64: square
# 29.4 vs 29.9, wide 102.3 vs 108.3, deep 20.4 vs 23.9. From 65 rows: cuBLAS.
_CUBLAS = None
_CONFIGS: dict[str, tuple[tuple[int, GemmConfig | None], ...]] = {
    "square": ((16, GemmConfig(16, 128, 128, split_k=4)), (32, GemmConfig(32, 32, 64, split_k=4)), (48, _CUBLAS),
               (64, GemmConfig(64, 64, 128, split_k=2))),
    "wide": ((16, GemmConfig(16, 128, 128)), (32, GemmConfig(32, 128, 128)), (48, _CUBLAS),
             (64, GemmConfig(64, 128, 128))),
    "deep": ((16, GemmConfig(16, 64, 128, split_k=4)), (32, GemmConfig(16, 128, 128, split_k=4)), (48, _CUBLAS),
             (64, GemmConfig(64, 64, 128, split_k=4))),
}
MAX_ROWS = max(most for table in _CONFIGS.values() for most, _ in table)


def gemm_config(m: int, n: int, k: int) -> GemmConfig | None:
    """The shipped launch settings for x [m, k] @ weight[n, k].T, 1 <= m <= MAX_ROWS; None where cuBLAS is faster."""
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(f"gemm's shipped configs cover 1 to {MAX_ROWS} rows, got {m}: pass a GemmConfig")
    return next(config for most, config in _CONFIGS[shape_class(n, k)] if m <= most)


@triton.jit
def _gemm_kernel(out_ptr, x_ptr, w_ptr, M, N, K, k_per_split, stride_xm, stride_wn, stride_om, stride_os,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                 IEEE: tl.constexpr, PDL: tl.constexpr):
    """out[split, rows, cols] = x[rows, K range] @ w[cols, K range].T for one [BLOCK_M, BLOCK_N] tile.

    With one split, out is the result [M, N] itself (stride_os unused) and gets x's dtype.
    """
    wait_for_prior_kernel(PDL)
    # Row tiles vary fastest: programs that share a weight tile run together and it is read from HBM once.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    offs_k = tl.arange(0, BLOCK_K)
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    # Rows and columns past the end re-read the last one instead of being masked (never stored): loads
    # of whole tiles carry no predicate.
    x_ptrs = x_ptr + tl.minimum(rows, M - 1).to(tl.int64)[:, None] * stride_xm + (k_lo + offs_k)[None, :]
    w_ptrs = w_ptr + tl.minimum(cols, N - 1).to(tl.int64)[:, None] * stride_wn + (k_lo + offs_k)[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_ok = (k + offs_k < k_hi)[None, :]
            x = tl.load(x_ptrs, mask=k_ok, other=0.0)
            w = tl.load(w_ptrs, mask=k_ok, other=0.0)
        if IEEE:  # float32 (tests): full-precision products, not TF32
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    ok = (rows < M)[:, None] & (cols < N)[None, :]
    tl.store(out_ptr + split * stride_os + rows[:, None] * stride_om + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=ok)


def gemm(x: Tensor, weight: Tensor, config: GemmConfig | None = None) -> Tensor:
    """x @ weight.T for x [M, K] and weight [N, K] (nn.Linear's layout): [M, N] in x's dtype.

    Accumulates in float32; bitwise reproducible for a given config (no atomics).
    """
    (rows, k), (n, k_w) = x.shape, weight.shape
    assert k == k_w, f"x [M, K] and weight [N, K] disagree on K: {k} vs {k_w}"
    assert rows >= 1, "gemm needs at least one row"
    assert x.dtype == weight.dtype, "x and weight must share a dtype"
    assert x.stride(1) == 1 and weight.stride(1) == 1, "x and weight need contiguous rows"
    config = config or gemm_config(rows, n, k)
    assert config is not None, f"no shipped config for {rows} rows of [{n}, {k}]: cuBLAS serves them"
    splits, k_per_split = config.splits(k)
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    partial = out if splits == 1 else torch.empty(splits, rows, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(rows, config.block_m), triton.cdiv(n, config.block_n), splits)
    _gemm_kernel[grid](
        partial, x, weight, rows, n, k, k_per_split, x.stride(0), weight.stride(0), n,
        partial.stride(0) if splits > 1 else 0, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, EVEN_K=k % config.block_k == 0, IEEE=x.dtype == torch.float32,
        num_warps=config.num_warps, num_stages=config.num_stages, **pdl_launch(x.device))
    if splits > 1:
        _gemv_reduce_kernel[(triton.cdiv(rows * n, _REDUCE_BLOCK),)](
            out, partial, rows * n, SPLITS=splits, BLOCK=_REDUCE_BLOCK, num_warps=4, **pdl_launch(x.device))
    return out
