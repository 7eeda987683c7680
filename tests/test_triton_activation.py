"""The Triton silu_mul kernel: on CPU through the Triton interpreter, on CUDA natively.

The kernel computes silu(gate) * up in float32 and rounds once, so its oracle is that computation on float32
copies rounded to the dtype (to a rounding: the exponential's last bit differs between implementations);
against the op's reference, which rounds silu before the product, it agrees to the dtype's rounding. The `gpu`
tests add TinyLlama's width at decode and prefill row counts, dispatch through torch.ops, and the op in a
shape-generic compile replayed as CUDA graphs. Without a GPU the kernel is also compiled for sm_90
(tests/sm90_compile.py) to catch what the interpreter accepts and the compiler does not.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

# First: it turns the interpreter on (without CUDA) before anything imports triton.
from tests.triton_interpreter import (DEVICE, KERNELS_RUN_HERE, kernels, needs_cuda,  # isort: skip
                                      assert_compiled_without_spills, run_kernel_tests_in_fresh_interpreter,
                                      sm90_reports)

from llmfx.ops import triton_activation as ta
from llmfx.ops.activation import silu_mul_reference
from tests.test_activation import projections

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def float32_silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """What the kernel computes: silu(gate) * up in float32, rounded once to the input's dtype."""
    g, u = gate_up.float().chunk(2, dim=-1)
    return (g * torch.sigmoid(g) * u).to(gate_up.dtype)


def assert_one_rounding_from(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    scale = expected.float().abs().amax().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual.cpu(), expected.cpu(), rtol=2 * UNIT_ROUNDOFF[expected.dtype],
                               atol=2.0**-20 * scale)


@kernels
@settings(max_examples=25)
@given(projections())
def test_kernel_computes_in_float32_and_rounds_once(gate_up):
    gate_up = gate_up.to(DEVICE)
    assert_one_rounding_from(ta.triton_silu_mul(gate_up), float32_silu_mul(gate_up))


@kernels
@settings(max_examples=15)
@given(projections())
def test_kernel_agrees_with_the_reference_op_to_the_dtypes_rounding(gate_up):
    expected = silu_mul_reference(gate_up)
    out = ta.triton_silu_mul(gate_up.to(DEVICE)).cpu()
    # The reference rounds silu(gate) before the product: 4 unit roundoffs of the product's scale bound the gap.
    atol = 4 * UNIT_ROUNDOFF[gate_up.dtype] * max(1.0, expected.float().abs().max().item() if expected.numel() else 0)
    torch.testing.assert_close(out, expected, rtol=0, atol=atol)


@kernels
def test_rows_wider_than_one_block_and_extreme_gates():
    # 2 blocks and a ragged third; gates from -1000 (silu -> -0) to 1000 (silu -> gate).
    inner = 2 * ta.MAX_BLOCK + 40
    gate = torch.linspace(-1000, 1000, inner).repeat(2, 1)
    up = torch.linspace(-3, 3, inner).repeat(2, 1)
    gate_up = torch.cat([gate, up], dim=1).to(DEVICE)
    out = ta.triton_silu_mul(gate_up).cpu()
    assert torch.isfinite(out).all()
    assert_one_rounding_from(out, float32_silu_mul(gate_up.cpu()))


@kernels
def test_empty_rows_give_an_empty_result():
    assert ta.triton_silu_mul(torch.empty(0, 8, device=DEVICE)).shape == (0, 4)


@pytest.mark.skipif(KERNELS_RUN_HERE, reason="the kernel tests run in this process")
def test_kernels_in_a_fresh_interpreter_process():
    run_kernel_tests_in_fresh_interpreter(__file__)


@pytest.mark.skipif(KERNELS_RUN_HERE, reason="once per session, outside the interpreter; a GPU compiles for itself")
def test_kernel_compiles_for_sm90_with_16_byte_loads_and_no_spills():
    reports = sm90_reports("--activation")
    assert len(reports) == 3, reports
    assert_compiled_without_spills(reports)
    bf16 = [r for r in reports if r["dtype"] == "bf16"]
    assert bf16 and all(r["global_loads"] == ["LDG.128"] for r in bf16), reports


# ---- CUDA only -------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("rows", [1, 3, 256, 8192])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_op_dispatches_to_the_kernel_at_tinyllama_width(rows, dtype):
    gen = torch.Generator().manual_seed(rows)
    gate_up = (4 * torch.randn(rows, 2 * 5632, generator=gen)).to("cuda", dtype)
    out = torch.ops.llmfx.silu_mul(gate_up)
    assert out.is_contiguous()
    assert_one_rounding_from(out, float32_silu_mul(gate_up))


@pytest.mark.gpu
@needs_cuda
def test_op_in_a_shape_generic_compile_replays_as_cuda_graphs_at_every_size():
    from torch._dynamo.utils import counters

    w = (torch.randn(64, 2 * 96, generator=torch.Generator().manual_seed(0)) / 8).to("cuda", torch.bfloat16)

    def mlp(x):
        return torch.ops.llmfx.silu_mul(x @ w)

    compiled = torch.compile(mlp, fullgraph=True, mode="reduce-overhead", dynamic=True)
    counters.clear()
    for rows in (4, 64, 4096, 7):
        x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows)).to("cuda", torch.bfloat16)
        for _ in range(3):  # warm-up, record, replay
            out = compiled(x).clone()
        assert_one_rounding_from(out, float32_silu_mul(x @ w))
    assert counters["inductor"]["cudagraph_skips"] == 0
