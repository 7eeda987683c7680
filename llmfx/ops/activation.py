"""SiLU-gated MLP activation as one op: silu(gate) * up from the fused gate|up projection.

The default implementation is the reference, `F.silu(gate) * up` in the input's dtype: on CPU it computes
exactly what the decoder computed before the op existed, and it is the oracle of the Triton kernel
(ops/triton_activation.py), which serves the op on CUDA. Inductor fused the same three ops into one kernel,
but in the engine's shape-generic graph that kernel keeps the launch settings it was autotuned with at the
first size it ran (4 tokens), one element a thread: on the H200 12.3 us a call at batch 256 (4.7 compiled for
that size) and 436 us in an 8,192-token prefill (66) (benchmarks/README.md, session 16). The op's kernel
sizes its grid per call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def silu_mul_reference(gate_up: Tensor) -> Tensor:
    """silu(gate) * up for gate_up [T, 2I] holding gate then up: [T, I], each product rounded to the dtype."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@torch.library.custom_op("llmfx::silu_mul", mutates_args=())
def silu_mul(gate_up: Tensor) -> Tensor:
    """silu(gate) * up [T, I] of a [T, 2I] gate|up projection (gate the first half of the last dim)."""
    return silu_mul_reference(gate_up)


@silu_mul.register_fake
def _(gate_up):
    return gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)
