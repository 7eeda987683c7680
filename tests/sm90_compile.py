"""Compile Triton kernels for the H200 (sm_90) on a machine without a GPU; print their resource usage.

    python -m tests.sm90_compile      # the rope + KV-write kernel's configurations, one JSON line each
    python -m tests.sm90_compile --pdl  # each llmfx kernel: does it wait for the prior kernel before any memory access?

The interpreter runs kernels but accepts code the compiler rejects and says nothing of registers;
Triton ships ptxas and cuobjdump, so the real compile and its spill count need no device. Run without
TRITON_INTERPRET (the interpreter replaces @triton.jit functions).
"""

from __future__ import annotations

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


def _compile(kernel, constexprs: dict, pointers: dict[str, str], num_warps: int, floats: tuple[str, ...] = ()):
    """kernel compiled for sm_90.

    pointers maps pointer arguments to Triton dtypes ("bf16", "i64", ...); floats names fp32 scalars; every
    other argument not in constexprs is an int32, with strides named stride_*d taken as 1 (contiguous last
    dims), as at runtime.
    """
    names = list(inspect.signature(kernel.fn).parameters)
    constexprs = {**constexprs, **{n: 1 for n in names if re.fullmatch(r"stride_\w*d", n)}}
    signature = {n: "constexpr" if n in constexprs else f"*{pointers[n]}" if n in pointers else
                 "fp32" if n in floats else "i32" for n in names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in pointers}
    return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=aligned),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def compile_sm90(kernel, constexprs: dict, pointers: dict[str, str], num_warps: int) -> dict:
    """Registers, local (spilled) and shared bytes of kernel compiled for sm_90."""
    compiled = _compile(kernel, constexprs, pointers, num_warps)
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([str(cuobjdump), "-res-usage", cubin.name], capture_output=True, text=True,
                               check=True).stdout
    fields = dict(re.findall(r"(REG|LOCAL|SHARED):(\d+)", usage))
    return {"registers": int(fields["REG"]), "local_bytes": int(fields["LOCAL"]), "shared_bytes": int(fields["SHARED"])}


def rope_write_kv_configs():
    """(name, constexprs, pointers, num_warps) for the shapes the engine runs and the extremes."""
    from llmfx.ops.triton_rope_kv import _heads_per_tile

    for heads, kv_heads, head_dim, dtype in [(32, 4, 64, "bf16"), (32, 8, 128, "bf16"), (64, 8, 128, "fp16"),
                                             (128, 8, 128, "bf16"), (4, 2, 24, "fp32")]:
        block_half = triton.next_power_of_2(head_dim // 2)
        constexprs = dict(HEADS=heads, KV_HEADS=kv_heads, HEAD_DIM=head_dim, PAGE_SIZE=16, BLOCK_HALF=block_half,
                          BLOCK_Q=_heads_per_tile(heads, block_half), BLOCK_KV=_heads_per_tile(kv_heads, block_half),
                          PDL=True)  # as launched on the H200
        pointers = {**{n: dtype for n in ("q_out_ptr", "q_ptr", "k_ptr", "v_ptr", "k_pages_ptr", "v_pages_ptr")},
                    "rope_ptr": "fp32", "positions_ptr": "i64", "slots_ptr": "i64"}
        yield f"H{heads} K{kv_heads} D{head_dim} {dtype}", constexprs, pointers, 4


def waits_before_memory(compiled) -> bool:
    """Whether the PTX's first global or shared memory access comes after griddepcontrol.wait (PDL's wait)."""
    lines = compiled.asm["ptx"].splitlines()
    first_wait = next((i for i, line in enumerate(lines) if "griddepcontrol.wait" in line), None)
    first_access = next(i for i, line in enumerate(lines)
                        if re.match(r"\s*(@%p\d+\s+)?(ld|st|cp\.async|atom|red)\.(global|shared)", line))
    return first_wait is not None and first_wait < first_access


def pdl_kernels():
    """(name, kernel, constexprs, pointers, floats) of every llmfx kernel, as the H200 launches it (PDL on)."""
    from llmfx.ops import triton_attention as ta
    from llmfx.ops.triton_rope_kv import _rope_write_kv_kernel

    name, constexprs, pointers, _ = next(rope_write_kv_configs())
    yield "rope_write_kv " + name, _rope_write_kv_kernel, constexprs, pointers, ()
    tensors = {"out_ptr": "bf16", "q_ptr": "bf16", "k_ptr": "bf16", "v_ptr": "bf16", "table_ptr": "i32",
               "qsl_ptr": "i32", "lens_ptr": "i32", "part_acc_ptr": "fp32", "part_ml_ptr": "fp32"}
    shape = dict(HEAD_DIM=64, PAGE_SIZE=16, GROUP=8, BLOCK_D=64, PDL=True)
    yield ("paged_attention varlen", ta._varlen_kernel, {**shape, "BLOCK_M": 128, "BLOCK_N": 64, "IEEE": False},
           tensors, ("scale_log2",))
    split = dict(MIN_SPLIT=ta.DECODE_MIN_SPLIT, MAX_SPLITS=ta.DECODE_MAX_SPLITS, BLOCK_N=64)
    yield ("paged_attention decode", ta._decode_kernel, {**shape, **split, "BLOCK_M": 16, "IEEE": False}, tensors,
           ("scale_log2",))
    yield ("paged_attention decode reduce", ta._decode_reduce_kernel,
           {**{k: v for k, v in shape.items() if k != "PAGE_SIZE"}, **split, "GROUP_PAD": 8}, tensors, ())
    from llmfx.ops.triton_gemv import _gemv_partial_kernel, _gemv_reduce_kernel

    yield ("gemv", _gemv_partial_kernel, dict(ROWS=1, BLOCK_N=16, BLOCK_K=256, EVEN_K=True, NUM_STAGES=1, PDL=True),
           {"out_ptr": "fp32", "x_ptr": "bf16", "w_ptr": "bf16"}, ())
    yield "gemv reduce", _gemv_reduce_kernel, dict(SPLITS=8, BLOCK=256, PDL=True), {"out_ptr": "bf16", "ws_ptr": "fp32"}, ()


def main() -> None:
    assert not os.environ.get("TRITON_INTERPRET"), "unset TRITON_INTERPRET: the interpreter replaces kernels"
    if "--pdl" in sys.argv[1:]:
        for name, kernel, constexprs, pointers, floats in pdl_kernels():
            compiled = _compile(kernel, constexprs, pointers, 4, floats)
            print(json.dumps({"kernel": name, "waits_before_memory": waits_before_memory(compiled)}), flush=True)
        return
    from llmfx.ops.triton_rope_kv import _rope_write_kv_kernel

    for name, constexprs, pointers, num_warps in rope_write_kv_configs():
        print(json.dumps({"kernel": "rope_write_kv", "config": name, "num_warps": num_warps,
                          **compile_sm90(_rope_write_kv_kernel, constexprs, pointers, num_warps)}), flush=True)


if __name__ == "__main__":
    main()
