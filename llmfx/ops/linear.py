"""llmfx::linear, the decoder's matmuls as one custom op, so that CUDA can route small calls to Triton kernels.

CPU (and any device without a registered kernel) runs F.linear. On CUDA (ops/triton_linear.py registers
the kernel) a call of up to LINEAR_GEMV_ROWS rows runs the Triton GEMV and one of up to
LINEAR_GEMM_ROWS the Triton tensor-core matmul where its table has settings for those rows; both launch
with PDL and so overlap the kernels around them, as cuBLAS's do not. Every other call runs F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.library.custom_op("llmfx::linear", mutates_args=())
def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight.T + bias for x [T, K], weight [N, K] (nn.Linear's layout): [T, N]."""
    return F.linear(x, weight, bias)


@linear.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])
