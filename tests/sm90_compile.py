"""Compile Triton kernels for the H200 (sm_90) on a machine without a GPU; print their resource usage.

    python -m tests.sm90_compile      # the rope + KV-write kernel's configurations, one JSON line each

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
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def compile_sm90(kernel, constexprs: dict, pointers: dict[str, str], num_warps: int) -> dict:
    """Registers, local (spilled) and shared bytes of kernel compiled for sm_90.

    pointers maps pointer arguments to Triton dtypes ("bf16", "i64", ...); every other argument not in
    constexprs is an int32, with strides named stride_*d taken as 1 (contiguous last dims), as at runtime.
    """
    names = list(inspect.signature(kernel.fn).parameters)
    constexprs = {**constexprs, **{n: 1 for n in names if re.fullmatch(r"stride_\w*d", n)}}
    signature = {n: "constexpr" if n in constexprs else f"*{pointers[n]}" if n in pointers else "i32" for n in names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in pointers}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=aligned),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
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


def main() -> None:
    assert not os.environ.get("TRITON_INTERPRET"), "unset TRITON_INTERPRET: the interpreter replaces kernels"
    from llmfx.ops.triton_rope_kv import _rope_write_kv_kernel

    for name, constexprs, pointers, num_warps in rope_write_kv_configs():
        print(json.dumps({"kernel": "rope_write_kv", "config": name, "num_warps": num_warps,
                          **compile_sm90(_rope_write_kv_kernel, constexprs, pointers, num_warps)}), flush=True)


if __name__ == "__main__":
    main()
