"""Triton kernel of llmfx::silu_mul: silu(gate) * up computed in float32 and rounded once.

One program covers BLOCK columns of one token row, so the grid is (rows, column blocks) for every call: a
decode step of one token runs a few programs, an 8,192-token prefill tens of thousands, each thread moving
16-byte vectors. Launched with PDL like llmfx's other kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from llmfx.ops.activation import silu_mul
from llmfx.ops.triton_pdl import pdl_launch, wait_for_prior_kernel

MAX_BLOCK = 1024  # columns a program: 8 bf16 elements a thread at 4 warps


@triton.jit
def _silu_mul_kernel(out_ptr, gate_up_ptr, inner, stride_gt, stride_ot, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """out[t, cols] = silu(gate_up[t, cols]) * gate_up[t, inner + cols] for one row t and one column block."""
    wait_for_prior_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < inner
    gate = tl.load(gate_up_ptr + row * stride_gt + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_gt + inner + cols, mask=ok, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_ot + cols, out.to(out_ptr.dtype.element_ty), mask=ok)


def triton_silu_mul(gate_up: Tensor, *, num_warps: int = 4) -> Tensor:
    """llmfx::silu_mul in Triton: [T, I] from a [T, 2I] gate|up projection with contiguous rows."""
    rows, width = gate_up.shape
    assert width % 2 == 0, f"gate_up's last dim holds gate then up: it must be even, got {width}"
    assert gate_up.stride(1) == 1, "gate_up needs contiguous rows"
    inner = width // 2
    out = torch.empty(rows, inner, dtype=gate_up.dtype, device=gate_up.device)
    if rows == 0 or inner == 0:
        return out
    block = min(MAX_BLOCK, triton.next_power_of_2(inner))
    _silu_mul_kernel[(rows, triton.cdiv(inner, block))](
        out, gate_up, inner, gate_up.stride(0), out.stride(0), BLOCK=block, num_warps=num_warps,
        **pdl_launch(gate_up.device))
    return out


silu_mul.register_kernel("cuda")(triton_silu_mul)
