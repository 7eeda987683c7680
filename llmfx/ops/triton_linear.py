"""llmfx::linear on CUDA: each call goes to the GEMV, the Triton tensor-core matmul or cuBLAS by its row count."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from llmfx.ops.linear import linear
from llmfx.ops.triton_gemm import MAX_ROWS as GEMM_MAX_ROWS
from llmfx.ops.triton_gemm import gemm, gemm_config
from llmfx.ops.triton_gemv import gemv

# Rows up to which each kernel serves a call. The GEMV: timed alone it matched cuBLAS at one row and lost
# from two; inside the decode forward's graph (gemv_graph_sweep.py, H200) it won at two rows (1,141.8 vs
# 1,186 us a forward) and lost at eight (2,178 vs 1,230). The matmul: up to LINEAR_GEMM_ROWS, wherever its
# shipped table has a config (triton_gemm._CONFIGS: from the kernels alone, mid_m_gemm.py; served steps:
# benchmarks/README.md, sessions 12 and 13). cuBLAS for the rest.
LINEAR_GEMV_ROWS = 2
LINEAR_GEMM_ROWS = GEMM_MAX_ROWS


def triton_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight.T (+ bias): bf16/fp16 calls without bias go to the Triton kernels by rows, the rest to F.linear."""
    if (x.dim() == 2 and bias is None and x.dtype == weight.dtype and x.dtype in (torch.bfloat16, torch.float16)
            and x.stride(1) == 1 and weight.stride(1) == 1):
        rows = x.shape[0]
        if 1 <= rows <= LINEAR_GEMV_ROWS:
            return gemv(x, weight)
        if LINEAR_GEMV_ROWS < rows <= LINEAR_GEMM_ROWS:
            config = gemm_config(rows, *weight.shape)
            if config is not None:
                return gemm(x, weight, config)
    return F.linear(x, weight, bias)


linear.register_kernel("cuda")(triton_linear)
