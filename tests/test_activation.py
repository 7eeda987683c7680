"""llmfx::silu_mul on CPU is F.silu(gate) * up, bit for bit, and it traces under compile."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from llmfx.ops import silu_mul
from tests.op_calls import OpCalls


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


def test_the_decoder_mlp_runs_through_the_op_once_a_layer(hf_checkpoint):
    # On CUDA the op's kernel sizes its launch per call; inductor's fused F.silu(gate) * up did not in the
    # engine's shape-generic graph (6.6x slower in a prefill step on the H200): keep the MLP on the op.
    from llmfx.batch import SequenceChunk
    from llmfx.kv_pool import KVPool
    from llmfx.models import run
    from llmfx.step_inputs import pack
    from llmfx.weights import load_params, resolve_model

    _, path = hf_checkpoint("llama")
    source = resolve_model(path)
    params = load_params(source, dtype="float32")
    kv = KVPool.allocate(source.config, 3, 4, torch.float32, "cpu")
    batch = pack([SequenceChunk((1, 2, 3, 4, 5), 0, (1, 2))], 4)
    with torch.no_grad(), OpCalls(torch.ops.llmfx.silu_mul.default) as calls:
        run(params, source.config, batch, kv)
    assert calls.count == source.config.num_layers
