"""The fused linear ops: on CPU each is the composition of the unfused ops, bit for bit; their Triton kernels (in
Triton's interpreter on CPU, natively on CUDA) match a float64 reference; the decoder runs every RMSNorm and SiLU gate
through them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

# First: it turns the interpreter on (without CUDA) before anything imports triton.
from tests.triton_interpreter import (DEVICE, KERNELS_RUN_HERE, kernels, needs_cuda,  # isort: skip
                                      run_kernel_tests_in_fresh_interpreter)

from llmfx.ops import add_rms_norm_linear, rms_norm, rms_norm_linear, silu_mul_linear
from llmfx.ops.activation import silu_mul_reference
from tests.linear_problems import assert_close_bf16
from tests.op_calls import OpCalls

EPS = 1e-5


def _tensors(rows: int, k: int, n: int, dtype: torch.dtype, seed: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    made = dict(x=torch.randn(rows, k, generator=gen), delta=torch.randn(rows, k, generator=gen),
                norm_weight=torch.rand(k, generator=gen) + 0.5, weight=torch.randn(n, k, generator=gen) / k**0.5,
                bias=torch.randn(n, generator=gen), gate_up=3 * torch.randn(rows, 2 * k, generator=gen),
                down=torch.randn(n, k, generator=gen) / k**0.5)
    return {name: t.to(device=device, dtype=dtype) for name, t in made.items()}


@settings(max_examples=25)
@given(st.integers(0, 5), st.integers(1, 48), st.integers(1, 40), st.sampled_from([torch.float32, torch.bfloat16]),
       st.booleans(), st.integers(0, 2**16))
def test_on_cpu_each_op_is_the_unfused_composition_bit_for_bit(rows, k, n, dtype, with_bias, seed):
    t = _tensors(rows, k, n, dtype, seed)
    bias = t["bias"] if with_bias else None
    h, out = add_rms_norm_linear(t["x"], t["delta"], t["norm_weight"], t["weight"], bias, EPS)
    expected_h = t["x"] + t["delta"]
    assert torch.equal(h, expected_h)
    assert torch.equal(out, F.linear(rms_norm(expected_h, t["norm_weight"], EPS), t["weight"], bias))
    assert torch.equal(rms_norm_linear(t["x"], t["norm_weight"], t["weight"], bias, EPS),
                       F.linear(rms_norm(t["x"], t["norm_weight"], EPS), t["weight"], bias))
    assert torch.equal(silu_mul_linear(t["gate_up"], t["down"]), F.linear(silu_mul_reference(t["gate_up"]), t["down"]))


def test_ops_pass_torch_opcheck_and_compile_fullgraph():
    t = _tensors(3, 16, 8, torch.float32, 0)
    torch.library.opcheck(torch.ops.llmfx.add_rms_norm_linear.default,
                          (t["x"], t["delta"], t["norm_weight"], t["weight"], t["bias"], EPS))
    torch.library.opcheck(torch.ops.llmfx.rms_norm_linear.default, (t["x"], t["norm_weight"], t["weight"], None, EPS))
    torch.library.opcheck(torch.ops.llmfx.silu_mul_linear.default, (t["gate_up"], t["down"]))

    def layer(x, delta):
        h, gate_up = add_rms_norm_linear(x, delta, t["norm_weight"], torch.cat([t["down"].T] * 2, 1).T.contiguous(),
                                         None, EPS)
        return h + silu_mul_linear(gate_up, t["down"].T.contiguous())

    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(t["x"], t["delta"]), layer(t["x"], t["delta"]))


def test_the_decoder_runs_every_norm_and_gate_through_the_fused_ops(hf_checkpoint):
    # The first layer's input norm has no residual add before it and the final norm none after the last
    # sublayer's add: rms_norm_linear twice, add_rms_norm_linear at every other norm. On CUDA the ops' kernels
    # size their launches per call, as inductor's shape-generic fused SiLU * up did not (session 16).
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
    ops = torch.ops.llmfx
    with torch.no_grad(), OpCalls(ops.rms_norm_linear.default) as plain, \
            OpCalls(ops.add_rms_norm_linear.default) as added, OpCalls(ops.silu_mul_linear.default) as gated:
        run(params, source.config, batch, kv)
    layers = source.config.num_layers
    assert (plain.count, added.count, gated.count) == (2, 2 * layers - 1, layers)


# ---- the Triton kernels ------------------------------------------------------------------------------------

def _norm_reference(x, delta, norm_weight, weight):
    """(h, the normalized h @ weight.T) in float64 from the kernel's h (x + delta rounded to x's dtype)."""
    h = x if delta is None else (x.float() + delta.float()).to(x.dtype)
    h64 = h.cpu().double()
    normed = h64 * torch.rsqrt(h64.pow(2).mean(-1, keepdim=True) + EPS) * norm_weight.cpu().double()
    return h, normed @ weight.cpu().double().T


if KERNELS_RUN_HERE:
    from llmfx.ops import triton_linear
    from llmfx.ops.triton_gemv import GemvConfig, rms_norm_gemv, silu_mul_gemv
    from llmfx.ops.triton_norm import add_rms_norm

    # One split; splits (which the norm runs without); tiles wider than N or K; K not a multiple of the block.
    CONFIGS = [GemvConfig(16, 32, 1, 4, 1), GemvConfig(8, 64, 3, 4, 1), GemvConfig(4, 128, 2, 1, 1),
               GemvConfig(16, 16, 5, 2, 2)]
else:
    CONFIGS = [None]


@kernels
@settings(max_examples=15)
@given(st.integers(1, 4), st.integers(1, 150), st.integers(1, 200), st.sampled_from(CONFIGS), st.booleans(),
       st.integers(0, 2**16))
def test_norm_gemv_matches_float64_and_stores_the_residual_sum(m, n, k, config, with_delta, seed):
    t = _tensors(m, k, n, torch.float32, seed, DEVICE)
    delta = t["delta"] if with_delta else None
    h, out = rms_norm_gemv(t["x"], delta, t["norm_weight"], t["weight"], EPS, config=config)
    expected_h, expected = _norm_reference(t["x"], delta, t["norm_weight"], t["weight"])
    assert (h is None) == (delta is None) and out.shape == (m, n) and out.dtype == torch.float32
    if delta is not None:
        assert torch.equal(h, expected_h)
    torch.testing.assert_close(out.cpu(), expected.float(), rtol=1e-4, atol=1e-4)


@kernels
@settings(max_examples=15)
@given(st.integers(1, 4), st.integers(1, 150), st.integers(1, 200), st.sampled_from(CONFIGS), st.integers(0, 2**16))
def test_gated_gemv_matches_float64_of_the_rounded_gate(m, n, k, config, seed):
    t = _tensors(m, k, n, torch.float32, seed, DEVICE)
    out = silu_mul_gemv(t["gate_up"], t["down"], config=config)
    gate, up = t["gate_up"].cpu().chunk(2, dim=-1)
    expected = (gate / (1 + torch.exp(-gate)) * up).double() @ t["down"].cpu().double().T
    torch.testing.assert_close(out.cpu(), expected.float(), rtol=1e-4, atol=1e-4)


@kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_delta", [True, False])
def test_norm_kernel_rounds_where_the_reference_does(dtype, with_delta):
    t = _tensors(6, 300, 1, dtype, 3, DEVICE)  # 300: a masked block
    delta = t["delta"] if with_delta else None
    h, out = add_rms_norm(t["x"], delta, t["norm_weight"], EPS)
    expected_h = t["x"] if delta is None else t["x"] + delta
    if with_delta:
        assert torch.equal(h, expected_h)
    expected = rms_norm(expected_h, t["norm_weight"], EPS)
    # The float32 sum of squares, added in another order, and the rsqrt may move 1 / rms by its last bits: a
    # few bits of a float32 value, at most one of a bf16.
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out, expected, rtol=4 * eps, atol=1e-3 * eps)


@kernels
@pytest.mark.parametrize("rows", [1, 2, 5])
def test_cuda_implementations_take_the_gemv_for_few_rows_and_the_norm_kernel_for_more(rows, monkeypatch):
    t = _tensors(rows, 64, 96, torch.bfloat16, rows, DEVICE)
    gemv_calls = []
    for name in ("rms_norm_gemv", "silu_mul_gemv"):
        monkeypatch.setattr(triton_linear, name, lambda *a, _f=getattr(triton_linear, name), **k: gemv_calls.append(1)
                            or _f(*a, **k))
    # The matmul after the norm kernel: F.linear here (the Triton matmul's own tests cover it on CUDA).
    monkeypatch.setattr(triton_linear, "triton_linear", lambda x, w, b=None: F.linear(x, w, b))
    h, out = triton_linear.triton_add_rms_norm_linear(t["x"], t["delta"], t["norm_weight"], t["weight"], None, EPS)
    plain = triton_linear.triton_rms_norm_linear(t["x"], t["norm_weight"], t["weight"], None, EPS)
    gated = triton_linear.triton_silu_mul_linear(t["gate_up"], t["down"])
    assert len(gemv_calls) == (3 if rows <= triton_linear.LINEAR_GEMV_ROWS else 0)
    expected_h, expected = _norm_reference(t["x"], t["delta"], t["norm_weight"], t["weight"])
    assert torch.equal(h, expected_h)
    scale = float(expected.abs().max())
    torch.testing.assert_close(out.cpu().float(), expected.float(), rtol=2e-2, atol=2e-2 * scale)
    torch.testing.assert_close(plain.cpu().float(), _norm_reference(t["x"], None, t["norm_weight"], t["weight"])[1].float(),
                               rtol=2e-2, atol=2e-2 * scale)
    gate, up = t["gate_up"].cpu().float().chunk(2, dim=-1)
    expected_gated = (gate / (1 + torch.exp(-gate)) * up).to(torch.bfloat16).double() @ t["down"].cpu().double().T
    torch.testing.assert_close(gated.cpu().float(), expected_gated.float(), rtol=2e-2,
                               atol=2e-2 * float(expected_gated.abs().max()))


@pytest.mark.skipif(KERNELS_RUN_HERE, reason="the kernel tests run in this process")
def test_kernels_in_a_fresh_interpreter_process():
    run_kernel_tests_in_fresh_interpreter(__file__)


# ---- CUDA only -------------------------------------------------------------------------------------------

@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("rows", [1, 2, 3, 64])
@pytest.mark.parametrize("name", ["qkv", "gate_up", "down", "lm_head"])
def test_cuda_ops_match_the_unfused_ops_at_tinyllama_shapes(name, rows):
    # Rows 1 and 2 run the fused GEMV, 3 and 64 the norm kernel (or silu_mul's) and the matmul; all within bf16
    # rounding of the unfused ops in float32, and the residual sum exact.
    from llmfx.bench import linear_shapes
    from llmfx.presets import preset

    n, k = linear_shapes(preset("tinyllama-1.1b"))[name]
    t = _tensors(rows, k, n, torch.bfloat16, rows + n, "cuda")
    if name == "down":
        out = silu_mul_linear(t["gate_up"], t["down"])
        expected = F.linear(silu_mul_reference(t["gate_up"].float()), t["down"].float())
    else:
        h, out = add_rms_norm_linear(t["x"], t["delta"], t["norm_weight"], t["weight"], None, EPS)
        assert torch.equal(h, t["x"] + t["delta"])
        expected = F.linear(rms_norm(h.float(), t["norm_weight"].float(), EPS), t["weight"].float())
        plain = rms_norm_linear(t["x"], t["norm_weight"], t["weight"], None, EPS)
        expected_plain = F.linear(rms_norm(t["x"].float(), t["norm_weight"].float(), EPS), t["weight"].float())
        assert_close_bf16(plain, expected_plain)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, n)
    assert_close_bf16(out, expected)


@pytest.mark.gpu
@needs_cuda
def test_cuda_fused_gemv_replays_in_a_graph_with_new_inputs():
    t = _tensors(1, 2048, 2560, torch.bfloat16, 0, "cuda")
    static = {name: t[name].clone() for name in ("x", "delta", "gate_up")}
    run = lambda: (add_rms_norm_linear(static["x"], static["delta"], t["norm_weight"], t["weight"], None, EPS),  # noqa: E731
                   silu_mul_linear(static["gate_up"], t["down"]))
    run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        (h, out), gated = run()
    fresh = _tensors(1, 2048, 2560, torch.bfloat16, 1, "cuda")
    for name in static:
        static[name].copy_(fresh[name])
    graph.replay()
    (expected_h, expected), expected_gated = run()
    assert torch.equal(h, expected_h) and torch.equal(out, expected) and torch.equal(gated, expected_gated)
