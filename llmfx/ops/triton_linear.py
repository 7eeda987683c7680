"""The linear ops on CUDA: each call goes to the GEMV, the Triton tensor-core matmul or cuBLAS by its row count.

llmfx::linear alone; the fused linear ops (ops/fused_linear.py) run their RMSNorm or SiLU gate inside the GEMV
where it serves the call, else as a kernel of its own before the matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from llmfx.ops.fused_linear import add_rms_norm_linear, rms_norm_linear, silu_mul_linear
from llmfx.ops.linear import linear
from llmfx.ops.norm import rms_norm
from llmfx.ops.triton_activation import triton_silu_mul
from llmfx.ops.triton_gemm import MAX_ROWS as GEMM_MAX_ROWS
from llmfx.ops.triton_gemm import gemm, gemm_config
from llmfx.ops.triton_gemv import gemv, rms_norm_gemv, silu_mul_gemv
from llmfx.ops.triton_norm import add_rms_norm

# Rows up to which each kernel serves a call. The GEMV: timed alone it matched cuBLAS at one row and lost
# from two; inside the decode forward's graph (gemv_graph_sweep.py, H200) it won at two rows (1,141.8 vs
# 1,186 us a forward) and lost at eight (2,178 vs 1,230). The matmul: up to LINEAR_GEMM_ROWS, wherever its
# shipped table has a config (triton_gemm._CONFIGS: from the kernels alone, mid_m_gemm.py; served steps:
# benchmarks/README.md, sessions 12 and 13). cuBLAS for the rest.
LINEAR_GEMV_ROWS = 2
LINEAR_GEMM_ROWS = GEMM_MAX_ROWS


def _triton_ready(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether the Triton matmul kernels take x [T, K] @ weight.T: bf16/fp16, no bias, contiguous rows."""
    return (x.dim() == 2 and bias is None and x.dtype == weight.dtype and x.dtype in (torch.bfloat16, torch.float16)
            and x.stride(1) == 1 and weight.stride(1) == 1)


def _gemv_serves(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    return _triton_ready(x, weight, bias) and 1 <= x.shape[0] <= LINEAR_GEMV_ROWS


def triton_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight.T (+ bias): bf16/fp16 calls without bias go to the Triton kernels by rows, the rest to F.linear."""
    if _triton_ready(x, weight, bias):
        rows = x.shape[0]
        if 1 <= rows <= LINEAR_GEMV_ROWS:
            return gemv(x, weight)
        if LINEAR_GEMV_ROWS < rows <= LINEAR_GEMM_ROWS:
            config = gemm_config(rows, *weight.shape)
            if config is not None:
                return gemm(x, weight, config)
    return F.linear(x, weight, bias)


linear.register_kernel("cuda")(triton_linear)


@add_rms_norm_linear.register_kernel("cuda")
def triton_add_rms_norm_linear(x: Tensor, delta: Tensor, norm_weight: Tensor, weight: Tensor, bias: Tensor | None,
                               eps: float) -> tuple[Tensor, Tensor]:
    """llmfx::add_rms_norm_linear on CUDA: one GEMV kernel for a few rows, else the norm kernel, then the matmul."""
    if not _norm_kernels_take(x, delta, norm_weight):  # the reference's ops
        h = x + delta
        return h, triton_linear(rms_norm(h, norm_weight, eps), weight, bias)
    if _gemv_serves(x, weight, bias):
        return rms_norm_gemv(x, delta, norm_weight, weight, eps)
    h, normed = add_rms_norm(x, delta, norm_weight, eps)
    return h, triton_linear(normed, weight, bias)


@rms_norm_linear.register_kernel("cuda")
def triton_rms_norm_linear(x: Tensor, norm_weight: Tensor, weight: Tensor, bias: Tensor | None, eps: float) -> Tensor:
    """llmfx::rms_norm_linear on CUDA: as triton_add_rms_norm_linear, without the residual add."""
    if not _norm_kernels_take(x, None, norm_weight):
        return triton_linear(rms_norm(x, norm_weight, eps), weight, bias)
    if _gemv_serves(x, weight, bias):
        return rms_norm_gemv(x, None, norm_weight, weight, eps)[1]
    return triton_linear(add_rms_norm(x, None, norm_weight, eps)[1], weight, bias)


@silu_mul_linear.register_kernel("cuda")
def triton_silu_mul_linear(gate_up: Tensor, weight: Tensor) -> Tensor:
    """llmfx::silu_mul_linear on CUDA: one GEMV kernel for a few rows, else llmfx::silu_mul's kernel, then the matmul."""
    if _gemv_serves(gate_up, weight, None) and gate_up.shape[1] == 2 * weight.shape[1]:
        return silu_mul_gemv(gate_up, weight)
    return triton_linear(triton_silu_mul(gate_up), weight)


def _norm_kernels_take(x: Tensor, delta: Tensor | None, norm_weight: Tensor) -> bool:
    """Whether the Triton norm kernels take x (+ delta): 2-D rows, contiguous, one dtype with the norm weight."""
    return (x.dim() == 2 and x.stride(1) == 1 and norm_weight.dtype == x.dtype and norm_weight.is_contiguous()
            and (delta is None or (delta.shape == x.shape and delta.dtype == x.dtype and delta.stride(1) == 1)))
