"""llmfx::silu_mul on CPU is F.silu(gate) * up, bit for bit, and it traces under compile."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from llmfx.ops import silu_mul


@st.composite
def projections(draw):
    """A [T, 2I] gate|up projection, maybe a row-strided view of a wider buffer, in any float dtype."""
    rows, inner, pad = draw(st.integers(0, 5)), draw(st.integers(1, 40)), draw(st.integers(0, 3))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    wide = (4 * torch.randn(rows, 2 * inner + pad, generator=gen)).to(dtype)
    return wide[:, : 2 * inner]


@settings(max_examples=30)
@given(projections())
def test_op_on_cpu_is_silu_of_the_first_half_times_the_second(gate_up):
    inner = gate_up.shape[1] // 2
    expected = F.silu(gate_up[:, :inner]) * gate_up[:, inner:]
    out = silu_mul(gate_up)
    assert out.dtype == gate_up.dtype and out.shape == (gate_up.shape[0], inner)
    assert torch.equal(out, expected)


def test_op_compiles_fullgraph_with_the_fake_shape():
    gate_up = torch.randn(3, 16)
    compiled = torch.compile(lambda x: silu_mul(x) * 2.0, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(gate_up), silu_mul(gate_up) * 2.0)
    assert torch.ops.llmfx.silu_mul(torch.empty(5, 10, device="meta")).shape == (5, 5)
