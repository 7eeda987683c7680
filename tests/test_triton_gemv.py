"""The Triton small-M gemv equals x @ weight.T: on CPU through the Triton interpreter, on CUDA natively.

Without CUDA the kernel tests run in TRITON_INTERPRET mode on small fp32 shapes that are not multiples
of the blocks, with split-K counts that divide K's blocks unevenly; with CUDA the `gpu` tests add bf16
at TinyLlama's layer shapes and CUDA-graph replay with new inputs in the same buffer.
"""

from __future__ import annotations

import itertools
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

from llmfx.ops import triton_gemv as tg
from llmfx.ops import triton_linear
from llmfx.ops.triton_gemv import GemvConfig, gemv
from tests.linear_problems import (SHAPES, check_bf16_at_shape, check_graph_replays_new_x, random_problem,
                                   reference)

# (block_n, block_k, split_k, num_warps, num_stages): one split, splits that divide the K blocks unevenly,
# more splits than K blocks, tiles wider than N or K.
CONFIGS = [GemvConfig(16, 32, 1, 4, 1), GemvConfig(8, 64, 3, 4, 1), GemvConfig(32, 16, 5, 2, 2),
           GemvConfig(4, 128, 2, 1, 1), GemvConfig(16, 64, 4, 4, 3), GemvConfig(16, 16, 64, 1, 1)]


@kernels
@settings(max_examples=20)
@given(st.integers(1, 8), st.integers(1, 300), st.integers(1, 300), st.sampled_from(CONFIGS), st.integers(0, 2**16))
def test_gemv_matches_float64_reference(m, n, k, config, seed):
    x, w = random_problem(m, n, k, seed)
    out = gemv(x, w, config=config)
    assert out.shape == (m, n) and out.dtype == x.dtype
    torch.testing.assert_close(out.cpu(), reference(x, w), rtol=1e-4, atol=1e-4)


@kernels
@pytest.mark.parametrize("m", [1, 3, 8])
def test_gemv_reads_rows_of_a_strided_x(m):
    # x as a view with a row stride wider than K (a slice of a wider activation).
    wide, w = random_problem(m, 200, 150, m)
    x = wide[:, 10:110]
    out = gemv(x, w[:, :100].contiguous(), config=CONFIGS[1])
    torch.testing.assert_close(out.cpu(), reference(x, w[:, :100]), rtol=1e-4, atol=1e-4)


@kernels
def test_gemv_shipped_config_matches_reference():
    for (n, k), m in itertools.product([(130, 270), (200, 180), (600, 100)], (1, 2, 5, 8)):  # deep, square, wide
        x, w = random_problem(m, n, k, m)
        torch.testing.assert_close(gemv(x, w).cpu(), reference(x, w), rtol=1e-4, atol=1e-4)


@kernels
def test_two_calls_give_the_same_bits():
    x, w = random_problem(5, 97, 290, 1)
    config = GemvConfig(16, 32, 4, 4, 1)  # 10 K blocks in 4 splits of 3, 3, 3, 1
    assert config.splits(290) == (4, 96)
    assert torch.equal(gemv(x, w, config=config), gemv(x, w, config=config))


@given(st.integers(1, 20000), st.sampled_from([16, 32, 64, 128, 256, 512, 1024]), st.integers(1, 64))
def test_splits_cover_k_with_whole_blocks_and_none_empty(k, block_k, split_k):
    splits, per_split = GemvConfig(16, block_k, split_k).splits(k)
    assert per_split % block_k == 0 and 1 <= splits <= split_k
    assert (splits - 1) * per_split < k <= splits * per_split


@given(st.integers(1, 8), st.integers(1, 200000), st.integers(1, 20000))
def test_every_shape_gets_a_config(m, n, k):
    config = tg.gemv_config(m, n, k)
    assert isinstance(config, GemvConfig) and config.num_stages >= 1


def test_gemv_refuses_more_rows_than_it_holds():
    x, w = torch.zeros(9, 16), torch.zeros(4, 16)
    with pytest.raises(AssertionError, match="rows"):
        gemv(x, w)


def test_linear_op_is_f_linear_on_cpu_and_passes_torch_opcheck():
    from llmfx.ops import linear

    x, w, bias = torch.randn(5, 24), torch.randn(12, 24), torch.randn(12)
    assert torch.equal(linear(x, w), F.linear(x, w)) and torch.equal(linear(x, w, bias), F.linear(x, w, bias))
    torch.library.opcheck(torch.ops.llmfx.linear.default, (x, w, bias))
    torch.library.opcheck(torch.ops.llmfx.linear.default, (x[:1], w))


@pytest.mark.skipif(KERNELS_RUN_HERE, reason="the kernel tests run in this process")
def test_kernels_in_a_fresh_interpreter_process():
    run_kernel_tests_in_fresh_interpreter(__file__)


@pytest.mark.skipif(KERNELS_RUN_HERE, reason="once per session, outside the interpreter; a GPU compiles for itself")
def test_shipped_configs_compile_for_sm90_without_spills_and_with_16_byte_loads():
    reports = sm90_reports("--gemv")
    partials = [r for r in reports if r["kernel"] == "gemv_partial"]
    assert len(partials) == 3 * 4 and len(reports) == len(partials) + 1, reports  # 3 classes x M = 1, 2, 4, 8
    assert_compiled_without_spills(reports)
    assert all(r["global_loads"] == ["LDG.128"] for r in partials), partials  # one-stage loops: no cp.async


# ---- CUDA only -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("n, k", SHAPES)
@pytest.mark.gpu
@needs_cuda
def test_cuda_bf16_matches_linear_at_tinyllama_shapes(n, k, m):
    check_bf16_at_shape(gemv, n, k, m)


@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_replays_new_x_in_the_same_buffer(m):
    check_graph_replays_new_x(gemv, m)


@pytest.mark.gpu
@needs_cuda
def test_cuda_linear_op_takes_the_gemv_for_few_rows_launched_with_pdl():
    few = triton_linear.LINEAR_GEMV_ROWS
    x, w = random_problem(few, 2048, 5632, 5, torch.bfloat16, "cuda")
    assert torch.equal(torch.ops.llmfx.linear(x, w), gemv(x, w))
    expected = torch.cuda.get_device_capability()[0] >= 9
    kernels = [k for fn in (tg._gemv_partial_kernel, tg._gemv_reduce_kernel)
               for cache in fn.device_caches.values() for k in cache[0].values()]
    assert len(kernels) >= 2 and all(k.metadata.launch_pdl == expected for k in kernels)


# ---- benchmarks/small_m_gemm.py's plain logic ----------------------------------------------------------------

BENCH = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "small_m_gemm.py"), run_name="not_main")


@pytest.mark.parametrize("m", range(1, 9))
def test_bench_candidates_fit_the_register_budget_and_repeat_no_launch(m):
    configs = list(BENCH["candidates"](m))
    for config in configs:
        per_thread = config.block_n * config.block_k // (32 * config.num_warps)
        assert per_thread >= 8 and m * per_thread <= 128  # one 16-byte load; accumulators fit
    for k in (2048, 5632):
        launches = [(c.block_n, c.block_k, c.num_warps, c.num_stages, c.splits(k))
                    for c in BENCH["distinct_for_shape"](configs, k)]
        assert len(launches) == len(set(launches))
        assert set(launches) == {(c.block_n, c.block_k, c.num_warps, c.num_stages, c.splits(k)) for c in configs}


def test_bench_summary_layer_sums_and_class_table():
    def row(shape, m, system, us, block_n=0):
        return {"shape": shape, "M": m, "system": system, "us": us,
                **({"config": {"block_n": block_n}, "shipped": block_n == 8} if system == "triton" else {})}

    rows = []
    for i, shape in enumerate(BENCH["SHAPES"]):
        rows += [row(shape, 1, "cublas", 10.0 + i), row(shape, 1, "triton", 9.0 + i, 8),
                 row(shape, 1, "triton", 7.0 + 2 * i, 16), {**row(shape, 1, "triton", 0, 32), "error": "x"}]
        del rows[-1]["us"]
    rows.append(row("o", 2, "cublas", 5.0))  # M=2 has no qkv: no layer sum for it
    summary = BENCH["summarize"](rows)
    qkv, down = summary[0], next(s for s in summary if s["shape"] == "down" and s["M"] == 1)
    assert (qkv["shape"], qkv["best_us"], qkv["best_config"], qkv["shipped_us"]) == ("qkv", 7.0, {"block_n": 16}, 9.0)
    assert down["best_us"] == 12.0 and down["best_config"] == {"block_n": 8}  # 9 + 3 < 7 + 6
    assert down["speedup"] == 13.0 / 12.0
    (sums,) = BENCH["layer_sums"](summary)
    assert sums["M"] == 1 and sums["layer_cublas_us"] == 10 + 11 + 12 + 13
    assert sums["layer_best_triton_us"] == 7 + 9 + 11 + 12
    assert sums["saved_per_step_us"] == pytest.approx(22 * (46 - 39))
    table = {(t["class"], t["M"]): t for t in BENCH["class_table"](rows)}
    # wide = gate_up (i=2) + lm_head (i=4): block_n 8 sums 11 + 13 = 24, block_n 16 sums 11 + 15 = 26.
    assert table[("wide", 1)]["config"] == {"block_n": 8} and table[("wide", 1)]["summed_us"] == 24.0
    assert table[("square", 1)]["shapes"] == ["o", "qkv"] and table[("square", 1)]["config"] == {"block_n": 16}


# ---- benchmarks/gemv_graph_sweep.py's plain logic ------------------------------------------------------------

SWEEP = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "gemv_graph_sweep.py"),
                       run_name="not_main")


@pytest.mark.parametrize("rows", [1, 4, 8])
def test_graph_sweep_candidates_load_16_bytes_and_fit_the_register_budget(rows):
    configs = SWEEP["candidates"](rows)
    assert len(configs) == len(set(configs)) > 20
    assert all(c.block_n * c.block_k // (32 * c.num_warps) >= 8 and c.num_stages == 1 for c in configs)
    assert all(rows * c.block_n * c.block_k // (32 * c.num_warps) <= 128 for c in configs)


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_graph_sweep_swaps_only_the_setting_of_those_rows(monkeypatch, rows):
    monkeypatch.setattr(tg, "_CONFIGS", dict(tg._CONFIGS))
    before = dict(tg._CONFIGS)
    config = GemvConfig(4, 1024, 2, 8, 1)
    SWEEP["with_config"]("deep", rows, config)
    assert tg.gemv_config(rows, 2048, 5632) == config
    covered = {m for m in range(1, 9) if next(most for most, _ in before["deep"] if m <= most)
               == next(most for most, _ in before["deep"] if rows <= most)}
    for m in range(1, 9):  # the rows of the same table entry take the new config, the others keep theirs
        shipped = next(c for most, c in before["deep"] if m <= most)
        assert tg.gemv_config(m, 2048, 5632) == (config if m in covered else shipped)
    assert all(tg._CONFIGS[name] == before[name] for name in ("square", "wide"))
