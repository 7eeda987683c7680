"""Triton kernel of RMSNorm with the residual add before it, for the fused linear ops' calls of many rows.

One program normalizes one row; the grid is the row count of each call. The arithmetic rounds where the
reference ops do (ops/norm.py: the sum h and the normalized h in the input dtype, then the scale), so a row
differs from them at most where its float32 sum of squares is added in another order. Launched with PDL like
llmfx's other kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from llmfx.ops.triton_pdl import pdl_launch, wait_for_prior_kernel

MAX_BLOCK = 8192  # columns a program loads at once; wider rows loop


@triton.jit
def _add_rms_norm_kernel(out_ptr, h_ptr, x_ptr, delta_ptr, norm_w_ptr, K, eps, stride_x, stride_d, stride_h,
                         stride_o, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """h = x + delta (stored when HAS_DELTA) and out = norm_w * (h / rms(h)) for one row."""
    wait_for_prior_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    squares = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, K, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        ok = cols < K
        h = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
        if HAS_DELTA:
            h = (h.to(tl.float32) + tl.load(delta_ptr + row * stride_d + cols, mask=ok, other=0.0).to(tl.float32))
            h = h.to(out_ptr.dtype.element_ty)
            tl.store(h_ptr + row * stride_h + cols, h, mask=ok)
        h = h.to(tl.float32)
        squares += h * h
    rstd = tl.rsqrt(tl.sum(squares) / K + eps)
    for start in range(0, K, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        ok = cols < K
        if HAS_DELTA:  # the stored sum, as the reference normalizes it
            h = tl.load(h_ptr + row * stride_h + cols, mask=ok, other=0.0)
        else:
            h = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
        normed = (h.to(tl.float32) * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
        norm_w = tl.load(norm_w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_o + cols, (norm_w * normed).to(out_ptr.dtype.element_ty), mask=ok)


def add_rms_norm(x: Tensor, delta: Tensor | None, norm_weight: Tensor, eps: float) -> tuple[Tensor | None, Tensor]:
    """(h, rms_norm(h, norm_weight, eps)) for h = x + delta [T, K] (h None, and x normalized, without delta)."""
    rows, k = x.shape
    assert x.stride(1) == 1 and (delta is None or (delta.shape == x.shape and delta.stride(1) == 1)), \
        "x and delta need the same shape and contiguous rows"
    assert norm_weight.shape == (k,) and norm_weight.is_contiguous(), "norm_weight must be [K], contiguous"
    assert norm_weight.dtype == x.dtype, "norm_weight must have x's dtype (the reference scales in it)"
    out = torch.empty_like(x)
    h = None if delta is None else torch.empty_like(x)
    if rows == 0:
        return h, out
    block = min(MAX_BLOCK, triton.next_power_of_2(k))
    _add_rms_norm_kernel[(rows,)](
        out, x if h is None else h, x, x if delta is None else delta, norm_weight, k, eps, x.stride(0),
        0 if delta is None else delta.stride(0), 0 if h is None else h.stride(0), out.stride(0),
        HAS_DELTA=delta is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)), **pdl_launch(x.device))
    return h, out
