"""Shared cases of the matmul kernel tests (test_triton_gemv.py, test_triton_gemm.py): inputs, oracle, shapes."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.triton_interpreter import DEVICE  # isort: skip (first: it may turn the Triton interpreter on)

from llmfx.bench import linear_shapes
from llmfx.presets import preset

# TinyLlama-1.1B's linear layers: qkv, o, gate_up, down, lm_head.
SHAPES = list(linear_shapes(preset("tinyllama-1.1b")).values())


def random_problem(m, n, k, seed, dtype=torch.float32, device=DEVICE):
    """x [m, k] and an [n, k] weight scaled so that outputs stay near unit size."""
    gen = torch.Generator().manual_seed(seed)
    x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen) / k**0.5
    return x.to(device=device, dtype=dtype), w.to(device=device, dtype=dtype)


def reference(x, w):
    """x @ w.T in float64 on CPU, as float32."""
    return (x.cpu().double() @ w.cpu().double().T).float()


def assert_close_bf16(out, expected):
    """Within bf16 rounding of the output (a few ulps of the largest value) plus fp32-order noise."""
    scale = max(1.0, expected.abs().amax().item())
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2 * scale)


def check_bf16_at_shape(kernel, n: int, k: int, m: int) -> None:
    """kernel(x, w) on CUDA in bf16 is within bf16 rounding of float32 F.linear and the same bits twice."""
    x, w = random_problem(m, n, k, n + m, torch.bfloat16, "cuda")
    out = kernel(x, w)
    assert out.dtype == torch.bfloat16
    assert_close_bf16(out, F.linear(x.float(), w.float()))
    assert torch.equal(out, kernel(x, w))


def check_graph_replays_new_x(kernel, m: int, seeds=(1, 2, 3)) -> None:
    """kernel on the down projection (K splits and the reduce), captured in a CUDA graph: each replay over new x
    in the captured buffer gives the bits of an eager call, within bf16 rounding of float32 F.linear."""
    n, k = 2048, 5632
    x_static, w = random_problem(m, n, k, 0, torch.bfloat16, "cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile before capture
        kernel(x_static, w)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernel(x_static, w)
    for seed in seeds:
        x_new, _ = random_problem(m, n, k, seed, torch.bfloat16, "cuda")
        x_static.copy_(x_new)
        graph.replay()
        assert torch.equal(out, kernel(x_new, w))
        assert_close_bf16(out, F.linear(x_new.float(), w.float()))
