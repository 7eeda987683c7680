"""The Triton tensor-core matmul equals x @ weight.T, and llmfx::linear routes each call by rows.

Without CUDA the kernel tests run in TRITON_INTERPRET mode on small fp32 shapes that are not multiples
of the tiles, with K splits that divide K's blocks unevenly; with CUDA the `gpu` tests add bf16 at
TinyLlama's layer shapes, CUDA-graph replay and the op's routing on the device.
"""

from __future__ import annotations

import argparse
import runpy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

# First: it turns the interpreter on (without CUDA) before anything imports triton.
from tests.triton_interpreter import (KERNELS_RUN_HERE, kernels, needs_cuda,  # isort: skip
                                      assert_compiled_without_spills, run_kernel_tests_in_fresh_interpreter,
                                      sm90_reports)

from llmfx.ops import triton_gemm, triton_linear
from llmfx.ops.triton_gemm import GemmConfig, gemm
from llmfx.ops.triton_gemv import gemv, shape_class
from tests.linear_problems import SHAPES, check_bf16_at_shape, check_graph_replays_new_x, random_problem, reference

# One tile, several row tiles, uneven K splits, more splits than K blocks, tiles wider than N or K.
CONFIGS = [GemmConfig(16, 16, 16), GemmConfig(16, 32, 32, split_k=3), GemmConfig(32, 16, 64, split_k=2),
           GemmConfig(16, 64, 16, split_k=64, num_warps=2, num_stages=2)]


@kernels
@settings(max_examples=20)
@given(st.integers(1, 40), st.integers(1, 150), st.integers(1, 150), st.sampled_from(CONFIGS), st.integers(0, 2**16))
def test_gemm_matches_float64_reference(m, n, k, config, seed):
    x, w = random_problem(m, n, k, seed)
    out = gemm(x, w, config)
    assert out.shape == (m, n) and out.dtype == x.dtype
    torch.testing.assert_close(out.cpu(), reference(x, w), rtol=1e-4, atol=1e-4)
    assert torch.equal(gemm(x, w, config), out)  # no atomics: the same bits again


@kernels
def test_gemm_reads_rows_of_a_strided_x():
    wide, w = random_problem(5, 40, 150, 3)
    x = wide[:, 10:110]  # a row stride wider than K
    out = gemm(x, w[:, :100].contiguous(), CONFIGS[1])
    torch.testing.assert_close(out.cpu(), reference(x, w[:, :100]), rtol=1e-4, atol=1e-4)


def test_gemm_refuses_mismatched_operands():
    with pytest.raises(AssertionError, match="disagree on K"):
        gemm(torch.zeros(3, 16), torch.zeros(4, 8))
    with pytest.raises(AssertionError, match="dtype"):
        gemm(torch.zeros(3, 16), torch.zeros(4, 16, dtype=torch.float64))


@given(st.sampled_from(SHAPES), st.integers(-2, 70))
def test_shipped_configs_cover_the_routed_rows_and_refuse_the_rest(shape, m):
    (n, k), table = shape, triton_gemm._CONFIGS[shape_class(*shape)]
    assert [most for most, _ in table] == sorted(most for most, _ in table)  # looked up first fit
    if 1 <= m <= triton_linear.LINEAR_GEMM_ROWS:
        config = triton_gemm.gemm_config(m, n, k)
        assert config == next(c for most, c in table if m <= most)
        assert (config is None) == (33 <= m <= 48)  # where cuBLAS measured faster
        assert config is None or config.block_m >= 16 and (m <= 16 or config is not table[0][1])
    else:
        with pytest.raises(ValueError, match="rows"):
            triton_gemm.gemm_config(m, n, k)


@kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_routes_calls_by_rows(dtype):
    gemv_rows, gemm_rows = triton_linear.LINEAR_GEMV_ROWS, triton_linear.LINEAR_GEMM_ROWS
    x, w = random_problem(gemm_rows + 1, 96, 160, 7, dtype)
    bias = torch.randn(96).to(device=w.device, dtype=dtype)
    for rows in range(1, gemv_rows + 1):
        assert torch.equal(triton_linear.triton_linear(x[:rows], w), gemv(x[:rows], w))
    for rows in range(gemv_rows + 1, gemm_rows + 1):
        config = triton_gemm.gemm_config(rows, *w.shape)
        expected = F.linear(x[:rows], w) if config is None else gemm(x[:rows], w, config)
        assert torch.equal(triton_linear.triton_linear(x[:rows], w), expected)
    for args in ((x, w), (x[:0], w), (x[:4], w, bias), (x[:4].float(), w.float())):  # many or no rows, a bias, fp32
        assert torch.equal(triton_linear.triton_linear(*args), F.linear(*args))


@pytest.mark.skipif(KERNELS_RUN_HERE, reason="the kernel tests run in this process")
def test_kernels_in_a_fresh_interpreter_process():
    run_kernel_tests_in_fresh_interpreter(__file__)


@pytest.mark.skipif(KERNELS_RUN_HERE, reason="once per session, outside the interpreter; a GPU compiles for itself")
def test_shipped_configs_compile_for_sm90_pipelined_without_spills():
    reports = sm90_reports("--gemm")
    assert len(reports) == sum(cfg is not None for table in triton_gemm._CONFIGS.values() for _, cfg in table), reports
    assert_compiled_without_spills(reports)
    for r in reports:
        assert r["pipelined"], r
        assert r["global_loads"] == ["LDGSTS.128"], r  # every tile load is a 16-byte cp.async into shared memory


# ---- CUDA only -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [3, 4, 8, 16, 17, 24, 32, 49, 56, 64])
@pytest.mark.parametrize("n, k", SHAPES)
@pytest.mark.gpu
@needs_cuda
def test_cuda_bf16_matches_linear_at_tinyllama_shapes(n, k, m):
    check_bf16_at_shape(gemm, n, k, m)


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_replays_new_x_in_the_same_buffer():
    check_graph_replays_new_x(gemm, 8)


@pytest.mark.gpu
@needs_cuda
def test_cuda_linear_op_takes_the_matmul_where_its_table_has_settings_launched_with_pdl():
    x, w = random_problem(triton_linear.LINEAR_GEMM_ROWS + 1, 2048, 5632, 5, torch.bfloat16, "cuda")
    for rows in (triton_linear.LINEAR_GEMV_ROWS + 1, 16, 17, 32, 49, triton_linear.LINEAR_GEMM_ROWS):
        assert torch.equal(torch.ops.llmfx.linear(x[:rows], w), gemm(x[:rows], w))
    for rows in (33, 48, len(x)):  # cuBLAS measured faster at 33-48 rows; beyond the table
        assert torch.equal(torch.ops.llmfx.linear(x[:rows], w), F.linear(x[:rows], w))
    expected = torch.cuda.get_device_capability()[0] >= 9
    kernels = [k for cache in triton_gemm._gemm_kernel.device_caches.values() for k in cache[0].values()]
    assert kernels and all(k.metadata.launch_pdl == expected for k in kernels)


# ---- benchmarks/mid_m_gemm.py's plain logic ----------------------------------------------------------------

BENCH = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "mid_m_gemm.py"), run_name="not_main")


@given(st.integers(1, 300))
def test_bench_row_tiles_cover_m_once_padded_at_most_to_the_next_power_of_two(m):
    args = argparse.Namespace(block_m=(16, 32, 64, 128), block_n=(32, 64), block_k=(64,), split_k=(1, 2),
                              num_warps=(4,), num_stages=(4,))
    configs = BENCH["candidates"](m, args)
    tiles = {c.block_m for c in configs}
    assert 16 in tiles and all(t <= max(16, 2 * m - 1) for t in tiles)  # never a tile of only padding rows
    assert len(configs) == len(tiles) * 2 * 2 and len(set(configs)) == len(configs)
