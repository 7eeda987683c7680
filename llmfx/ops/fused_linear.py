"""Linear layers with the op before them fused in, as custom ops: RMSNorm (after the residual add) or the SiLU gate.

At batch 1 a decoder layer's RMSNorm and SiLU * up kernels move a few kilobytes each, yet each is a kernel on
the step's critical path: in a batch-1 step on the H200 the RMSNorm + residual kernels took 75 us and SiLU * up
18 us of 998 (benchmarks/README.md, session 17). On CUDA (ops/triton_linear.py registers the kernels) calls of
a few rows run them inside the GEMV's loop (ops/triton_gemv.py), so the layer loses those kernels; larger calls
run one Triton kernel for the norm, or llmfx::silu_mul's, and then llmfx::linear. The default implementation
is the composition of the unfused ops, exactly the decoder's math before these ops existed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmfx.ops.activation import silu_mul_reference
from llmfx.ops.linear import linear
from llmfx.ops.norm import rms_norm


@torch.library.custom_op("llmfx::add_rms_norm_linear", mutates_args=())
def add_rms_norm_linear(x: Tensor, delta: Tensor, norm_weight: Tensor, weight: Tensor, bias: Tensor | None,
                        eps: float) -> tuple[Tensor, Tensor]:
    """(h, linear(rms_norm(h, norm_weight, eps), weight, bias)) for the residual sum h = x + delta [T, K]."""
    h = x + delta
    return h, linear(rms_norm(h, norm_weight, eps), weight, bias)


@add_rms_norm_linear.register_fake
def _(x, delta, norm_weight, weight, bias, eps):
    return torch.empty_like(x), x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("llmfx::rms_norm_linear", mutates_args=())
def rms_norm_linear(x: Tensor, norm_weight: Tensor, weight: Tensor, bias: Tensor | None, eps: float) -> Tensor:
    """linear(rms_norm(x, norm_weight, eps), weight, bias) for x [T, K]: [T, N]."""
    return linear(rms_norm(x, norm_weight, eps), weight, bias)


@rms_norm_linear.register_fake
def _(x, norm_weight, weight, bias, eps):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("llmfx::silu_mul_linear", mutates_args=())
def silu_mul_linear(gate_up: Tensor, weight: Tensor) -> Tensor:
    """linear(silu(gate) * up, weight) for a [T, 2I] gate|up projection (gate first) and weight [N, I]: [T, N]."""
    return linear(silu_mul_reference(gate_up), weight)


@silu_mul_linear.register_fake
def _(gate_up, weight):
    return gate_up.new_empty(gate_up.shape[0], weight.shape[0])
