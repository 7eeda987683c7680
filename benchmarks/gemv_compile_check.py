"""Compile the gemv kernels for the H200 (sm_90) on a machine without a GPU: registers, spills, load width.

    python benchmarks/gemv_compile_check.py                 # the shipped configs (llmfx.ops.triton_gemv._CONFIGS)
    python benchmarks/gemv_compile_check.py --candidates    # also every config benchmarks/small_m_gemm.py tries

One JSON line per (shape class, M, config): registers and spilled (local) bytes from cuobjdump on the
cubin, the global load widths in the SASS (LDG = to registers, LDGSTS = cp.async to shared memory, which is
how a pipelined loop loads; .128 is 16 bytes a thread), shared memory, whether the main loop is
pipelined, and how many layout conversions the TTGIR kept inside it (each one can cost a trip through
shared memory). Arguments are specialized as the runtime
specializes them for the TinyLlama shapes: pointers and every stride and size that is a multiple of 16
get tt.divisibility 16, and an int equal to 1 becomes a constant. Run without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).parent))  # small_m_gemm's candidate grid

from llmfx.ops.triton_gemv import _CONFIGS, _REDUCE_BLOCK, _gemv_partial_kernel, _gemv_reduce_kernel  # noqa: E402

_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
SHAPES = {"square": (2560, 2048), "deep": (2048, 5632), "wide": (11264, 2048)}  # one real shape per class


def compile_sm90(kernel, args: dict, num_warps: int, num_stages: int):
    """kernel compiled for sm_90 with args {name: constexpr value | pointer type '*bf16' | int value}."""
    names = list(inspect.signature(kernel.fn).parameters)
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        value = args[name]
        if isinstance(value, str):  # a pointer: torch allocations are 16-byte aligned
            signature[name], attrs[(i,)] = value, [["tt.divisibility", 16]]
        elif name.isupper() or value == 1:  # constexpr, or an int the runtime specializes to a constant
            signature[name], constexprs[name] = "constexpr", value
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages})


def resources(compiled) -> dict:
    """Registers, spill bytes, shared memory, global load widths and main-loop facts of a compiled kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([str(_BIN / "cuobjdump"), "-res-usage", cubin.name], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([str(_BIN / "cuobjdump"), "-sass", cubin.name], capture_output=True, text=True,
                              check=True).stdout
    fields = dict(re.findall(r"(REG|LOCAL):(\d+)", usage))
    # Global loads: LDG (to registers) or LDGSTS (cp.async, to shared memory when the loop is pipelined);
    # the width suffix is absent for 32-bit loads.
    loads = re.findall(r"\b(LDGSTS|LDG)((?:\.\w+)*)(?=[\s;])", sass)  # not LDGDEPBAR
    widths = {op + "." + (re.findall(r"\.(64|128)\b", mods) or ["32"])[0] for op, mods in loads}
    ttgir = compiled.asm["ttgir"]
    loop = ttgir[ttgir.find("scf.for"):ttgir.find("scf.yield")] if "scf.for" in ttgir else ""
    return {"registers": int(fields["REG"]), "spill_bytes": int(fields["LOCAL"]),
            "shared_bytes": compiled.metadata.shared, "global_loads": sorted(widths),
            "pipelined": "async_copy_global_to_local" in loop, "converts_in_loop": loop.count("ttg.convert_layout")}


def partial_args(m: int, n: int, k: int, cfg, dtype: str) -> dict:
    splits, k_per_split = cfg.splits(k)
    return dict(out_ptr=f"*{dtype}" if splits == 1 else "*fp32", x_ptr=f"*{dtype}", w_ptr=f"*{dtype}", N=n, K=k,
                k_per_split=k_per_split, stride_xm=k, stride_wn=k, stride_om=n, stride_os=m * n if splits > 1 else 0,
                ROWS=m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=k % cfg.block_k == 0,
                NUM_STAGES=cfg.num_stages, PDL=True)  # as launched on the H200


def check(label: str, m: int, n: int, k: int, cfg, dtype: str = "bf16") -> dict:
    row = {"kernel": "gemv_partial", "shape": label, "N": n, "K": k, "M": m, "dtype": dtype,
           "config": [cfg.block_n, cfg.block_k, cfg.split_k, cfg.num_warps, cfg.num_stages]}
    try:
        row.update(resources(compile_sm90(_gemv_partial_kernel, partial_args(m, n, k, cfg, dtype), cfg.num_warps,
                                          cfg.num_stages)))
    except Exception as err:  # noqa: BLE001 -- a config that does not compile is a result too
        row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
    return row


def main() -> None:
    assert not os.environ.get("TRITON_INTERPRET"), "unset TRITON_INTERPRET: the interpreter replaces kernels"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--candidates", action="store_true", help="also compile small_m_gemm.py's candidate grid")
    args = p.parse_args()
    for label, table in _CONFIGS.items():
        n, k = SHAPES[label]
        for m in (1, 2, 4, 8):
            cfg = next(c for most, c in table if m <= most)
            print(json.dumps(check(label, m, n, k, cfg)), flush=True)
    reduce = resources(compile_sm90(_gemv_reduce_kernel, dict(out_ptr="*bf16", ws_ptr="*fp32", numel=2048,
                                                               SPLITS=8, BLOCK=_REDUCE_BLOCK, PDL=True), 4, 1))
    print(json.dumps({"kernel": "gemv_reduce", "SPLITS": 8, **reduce}), flush=True)
    if args.candidates:
        from small_m_gemm import SHAPES as BENCH_SHAPES, candidates

        for m in (1, 2, 4, 8):
            seen = set()
            for cfg in candidates(m):
                for label, (n, k) in BENCH_SHAPES.items():
                    key = (cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages, k % cfg.block_k == 0,
                           cfg.splits(k)[0] == 1)
                    if key not in seen:  # split_k only changes a runtime int, and the one-split store's dtype
                        seen.add(key)
                        print(json.dumps({"candidate": True, **check(label, m, n, k, cfg)}), flush=True)


if __name__ == "__main__":
    main()
