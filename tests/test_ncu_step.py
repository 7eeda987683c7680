"""benchmarks/ncu_step.py's summary of an Nsight Compute CSV: pure parsing and arithmetic, checked on the CPU."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

from llmfx.bench import H200_COPY_BYTES_PER_S

NCU = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "ncu_step.py"), run_name="not_main")

# The shape of `ncu --csv --page raw --print-units base` output (columns cut to those read, values from an H200 run):
# ncu's log lines and the program's own output around it, a units row, thousands separators.
CSV = """==PROF== Connected to process 576 (/usr/bin/python3.12)
some output the program printed
"ID","Kernel Name","device__attribute_display_name","gpu__time_duration.sum","dram__bytes_read.sum","dram__bytes_write.sum","launch__grid_size","launch__registers_per_thread","sm__warps_active.avg.pct_of_peak_sustained_active"
"","","","ns","byte","byte","","register/thread","%"
"0","triton_red_fused__to_copy_add_index_linear_mean_mul_pow_rsqrt_0","NVIDIA H200","4,320","14,080","0","1","32","24.70"
"1","_gemv_partial_kernel","NVIDIA H200","5,600","10,492,416","6,912","640","48","56.03"
"2","void cutlass::Kernel<Gemm<64, 64>>(Params)","NVIDIA H200","2,000","1,000,000","1,000,000","128","168","10.00"
"3","_gemv_partial_kernel","NVIDIA H200","4,400","8,388,608","0","512","48","40.00"
==PROF== Disconnected from process 576
"""


def test_parse_reads_every_kernel_row_as_numbers_and_skips_the_units_row():
    rows = NCU["parse_ncu_csv"](CSV)
    assert [r["kernel"] for r in rows] == ["triton_red_fused__to_copy_add_index_linear_mean_mul_pow_rsqrt_0",
                                           "_gemv_partial_kernel", "void cutlass::Kernel<Gemm<64, 64>>(Params)",
                                           "_gemv_partial_kernel"]
    assert rows[1][NCU["DURATION"]] == 5600.0 and rows[1][NCU["READ"]] == 10_492_416.0
    assert rows[1][NCU["GRID"]] == 640.0 and rows[3][NCU["OCCUPANCY"]] == 40.0
    assert {r["device"] for r in rows} == {"NVIDIA H200"}


def test_parse_refuses_output_without_a_table():
    with pytest.raises(StopIteration):
        NCU["parse_ncu_csv"]("==PROF== Connected\nSegmentation fault\n")


def test_summary_groups_by_name_sorts_by_time_and_prices_bytes_at_the_copy_bandwidth():
    summary = NCU["summarize"](NCU["parse_ncu_csv"](CSV))
    assert [r["kernel"] for r in summary] == ["_gemv_partial_kernel", "triton_red_fused__to_copy_add_index_linear_"
                                              "mean_mul_pow_rsqrt_0", "void cutlass::Kernel"]
    gemv = summary[0]
    moved = 10_492_416 + 6_912 + 8_388_608
    assert gemv["calls"] == 2 and gemv["us"] == pytest.approx(10.0) and gemv["grid"] == [512, 640]
    assert gemv["dram_mb"] == pytest.approx(moved / 1e6)
    assert gemv["tb_per_s"] == pytest.approx(moved / 10_000 / 1e3)
    assert gemv["at_copy_bandwidth_us"] == pytest.approx(moved / H200_COPY_BYTES_PER_S * 1e6)
    assert gemv["excess_us"] == pytest.approx(10.0 - gemv["at_copy_bandwidth_us"])
    assert gemv["occupancy_pct"] == pytest.approx(48.015)


def test_short_name_drops_templates_and_parameters():
    assert NCU["short_name"]("void cutlass::Kernel<Gemm<64, 64>>(Params)") == "void cutlass::Kernel"
    assert NCU["short_name"]("_decode_kernel") == "_decode_kernel"
