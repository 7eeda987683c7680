"""Compile Triton kernels for the H200 (sm_90) on a machine without a GPU; print their resource usage.

    python -m tests.sm90_compile                      # the rope + KV-write kernel's configurations, one JSON line each
    python -m tests.sm90_compile --pdl                # each llmfx kernel: what it reads before PDL's wait
    python -m tests.sm90_compile --gemv               # the gemv's shipped configs (llmfx.ops.triton_gemv._CONFIGS)
    python -m tests.sm90_compile --gemv --candidates  # also every config benchmarks/small_m_gemm.py tries
    python -m tests.sm90_compile --gemm               # the tensor-core matmul's shipped configs (triton_gemm._CONFIGS)
    python -m tests.sm90_compile --attention          # the attention kernels' bf16 launches (triton_attention._tuning)
    python -m tests.sm90_compile --activation         # the silu_mul kernel at TinyLlama's and Llama-3-8B's widths

The interpreter runs kernels but accepts code the compiler rejects and says nothing of registers;
Triton ships ptxas and cuobjdump, so the real compile and its spill count need no device. Run without
TRITON_INTERPRET (the interpreter replaces @triton.jit functions).

Each report has the registers and spilled (local + stack frame) bytes cuobjdump reads from the cubin, the shared
memory Triton allocates, the global load widths in the SASS (LDG = to registers, LDGSTS = cp.async to
shared memory, which is how a pipelined loop loads; .128 is 16 bytes a thread), whether the main loop
is pipelined, and how many layout conversions the TTGIR kept inside it (each one can cost a trip
through shared memory).
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

_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def _specialized(kernel, constexprs: dict, ints: dict | None = None) -> dict:
    """constexprs plus what the launcher specializes: strides named stride_*d (1, contiguous) and ints equal to 1."""
    names = inspect.signature(kernel.fn).parameters
    return {**constexprs, **{n: 1 for n in names if re.fullmatch(r"stride_\w*d", n)},
            **{n: v for n, v in (ints or {}).items() if v == 1}}


def _compile(kernel, constexprs: dict, pointers: dict[str, str], num_warps: int, floats: tuple[str, ...] = (),
             ints: dict[str, int] | None = None, num_stages: int | None = None):
    """kernel compiled for sm_90.

    pointers maps pointer arguments to Triton dtypes ("bf16", "i64", ...), each 16-byte aligned as torch
    allocations are; floats names fp32 scalars. ints gives runtime int arguments by value, specialized as
    the launcher specializes them: 1 becomes a constant, a multiple of 16 is marked divisible by 16. Every
    other argument not in constexprs is a plain int32, with strides named stride_*d taken as 1
    (contiguous last dims), as at runtime.
    """
    names = list(inspect.signature(kernel.fn).parameters)
    ints = ints or {}
    constexprs = _specialized(kernel, constexprs, ints)
    signature = {n: "constexpr" if n in constexprs else f"*{pointers[n]}" if n in pointers else
                 "fp32" if n in floats else "i32" for n in names}
    divisible = {n for n in names if n in pointers or (n in ints and n not in constexprs and ints[n] % 16 == 0)}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in divisible}
    options = {"num_warps": num_warps, **({} if num_stages is None else {"num_stages": num_stages})}
    return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options=options)


def resources(compiled) -> dict:
    """Registers, spilled and shared bytes, global load widths and main-loop facts of a compiled kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([str(_BIN / "cuobjdump"), "-res-usage", cubin.name], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([str(_BIN / "cuobjdump"), "-sass", cubin.name], capture_output=True, text=True,
                              check=True).stdout
    fields = dict(re.findall(r"(REG|LOCAL|STACK):(\d+)", usage))
    # The width suffix is absent for 32-bit loads; LDGDEPBAR is no load.
    loads = re.findall(r"\b(LDGSTS|LDG)((?:\.\w+)*)(?=[\s;])", sass)
    widths = {op + "." + (re.findall(r"\.(64|128)\b", mods) or ["32"])[0] for op, mods in loads}
    ttgir = compiled.asm["ttgir"]
    loop = ttgir[ttgir.find("scf.for"):ttgir.find("scf.yield")] if "scf.for" in ttgir else ""
    # Triton's shared memory is dynamic, so cuobjdump's static SHARED count is 0; the metadata has it.
    # Spills show as LOCAL or as a STACK frame (ptxas put a 28 KB one there with LOCAL 0): count both.
    return {"registers": int(fields["REG"]), "spilled_bytes": int(fields["LOCAL"]) + int(fields["STACK"]),
            "shared_bytes": compiled.metadata.shared, "global_loads": sorted(widths),
            "pipelined": "async_copy_global_to_local" in loop, "converts_in_loop": loop.count("ttg.convert_layout")}


def compile_sm90(kernel, constexprs: dict, pointers: dict[str, str], num_warps: int, **compile_args) -> dict:
    """resources() of kernel compiled for sm_90 (compile_args: _compile's floats, ints, num_stages)."""
    return resources(_compile(kernel, constexprs, pointers, num_warps, **compile_args))


def report_row(row: dict, kernel, constexprs: dict, pointers: dict[str, str], num_warps: int, **compile_args) -> dict:
    """row with compile_sm90's resources added, or the compile's error: a config that does not compile is a result."""
    try:
        row.update(compile_sm90(kernel, constexprs, pointers, num_warps, **compile_args))
    except Exception as err:  # noqa: BLE001
        row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
    return row


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


# One TinyLlama weight [N, K] per gemv shape class of triton_gemv._CONFIGS.
def _class_shapes() -> dict[str, tuple[int, int]]:
    from llmfx.bench import linear_shapes
    from llmfx.presets import preset

    shapes = linear_shapes(preset("tinyllama-1.1b"))
    return {"square": shapes["qkv"], "deep": shapes["down"], "wide": shapes["gate_up"]}


GEMV_SHAPES = _class_shapes()


def gemv_partial_args(m: int, n: int, k: int, cfg, dtype: str = "bf16") -> tuple[dict, dict, dict]:
    """(constexprs, pointers, ints) of the gemv partial kernel for x [m, k] @ w[n, k].T, as the H200 launches it."""
    splits, k_per_split = cfg.splits(k)
    constexprs = dict(ROWS=m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=k % cfg.block_k == 0,
                      NUM_STAGES=cfg.num_stages, PDL=True)
    pointers = dict(out_ptr=dtype if splits == 1 else "fp32", x_ptr=dtype, w_ptr=dtype)
    ints = dict(N=n, K=k, k_per_split=k_per_split, stride_xm=k, stride_wn=k, stride_om=n,
                stride_os=m * n if splits > 1 else 0)
    return constexprs, pointers, ints


def gemv_report(shape: str, m: int, n: int, k: int, cfg, dtype: str = "bf16") -> dict:
    """One JSON row: the gemv partial kernel's resources for x [m, k] @ w[n, k].T under cfg."""
    from llmfx.ops.triton_gemv import _gemv_partial_kernel

    row = {"kernel": "gemv_partial", "shape": shape, "N": n, "K": k, "M": m, "dtype": dtype,
           "config": [cfg.block_n, cfg.block_k, cfg.split_k, cfg.num_warps, cfg.num_stages]}
    constexprs, pointers, ints = gemv_partial_args(m, n, k, cfg, dtype)
    return report_row(row, _gemv_partial_kernel, constexprs, pointers, cfg.num_warps, ints=ints,
                      num_stages=cfg.num_stages)


def gemv_reports(candidates: bool = False):
    """Rows for the shipped config of each shape class at M = 1, 2, 4, 8 and for the split-K reduce kernel;
    with candidates, also one per distinct launch among benchmarks/small_m_gemm.py's candidate configs."""
    from llmfx.ops.triton_gemv import _CONFIGS, _REDUCE_BLOCK, _gemv_reduce_kernel

    for shape, table in _CONFIGS.items():
        n, k = GEMV_SHAPES[shape]
        for m in (1, 2, 4, 8):
            yield gemv_report(shape, m, n, k, next(c for most, c in table if m <= most))
    yield {"kernel": "gemv_reduce", "SPLITS": 8,
           **compile_sm90(_gemv_reduce_kernel, dict(SPLITS=8, BLOCK=_REDUCE_BLOCK, PDL=True),
                          {"out_ptr": "bf16", "ws_ptr": "fp32"}, 4, ints={"numel": 2048}, num_stages=1)}
    if not candidates:
        return
    import runpy

    bench = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "small_m_gemm.py"),
                           run_name="not_main")
    for m in (1, 2, 4, 8):
        seen = set()
        for cfg in bench["candidates"](m):
            for label, (n, k) in bench["SHAPES"].items():
                # split_k changes only a runtime int, and the one-split store's dtype
                key = (cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages, k % cfg.block_k == 0,
                       cfg.splits(k)[0] == 1)
                if key not in seen:
                    seen.add(key)
                    yield {"candidate": True, **gemv_report(label, m, n, k, cfg)}


def gemm_reports():
    """One row per entry of triton_gemm._CONFIGS: its kernel at the entry's largest M, as the H200 launches it."""
    from llmfx.ops.triton_gemm import _CONFIGS, _gemm_kernel

    for shape, table in _CONFIGS.items():
        n, k = GEMV_SHAPES[shape]
        for m, cfg in ((m, cfg) for m, cfg in table if cfg is not None):
            splits, k_per_split = cfg.splits(k)
            row = {"kernel": "gemm", "shape": shape, "N": n, "K": k, "M": m,
                   "config": [cfg.block_m, cfg.block_n, cfg.block_k, cfg.split_k, cfg.num_warps, cfg.num_stages]}
            constexprs = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                              EVEN_K=k % cfg.block_k == 0, IEEE=False, PDL=True)
            pointers = dict(out_ptr="bf16" if splits == 1 else "fp32", x_ptr="bf16", w_ptr="bf16")
            ints = dict(M=m, N=n, K=k, k_per_split=k_per_split, stride_xm=k, stride_wn=k, stride_om=n,
                        stride_os=m * n if splits > 1 else 0)
            yield report_row(row, _gemm_kernel, constexprs, pointers, cfg.num_warps, ints=ints,
                             num_stages=cfg.num_stages)


_ATTENTION_POINTERS = {"out_ptr": "bf16", "q_ptr": "bf16", "k_ptr": "bf16", "v_ptr": "bf16", "table_ptr": "i32",
                       "qsl_ptr": "i32", "lens_ptr": "i32", "part_acc_ptr": "fp32", "part_ml_ptr": "fp32"}


def attention_strides(heads: int, kv_heads: int, head_dim: int, page_size: int, max_pages: int, splits: int) -> dict:
    """The stride arguments a served launch passes, read off meta tensors laid out as served (q and out [T, H, D];
    KVPool's pages; the decode partials), so the compile specializes them as the launcher does."""
    from types import SimpleNamespace

    import torch

    from llmfx.kv_pool import KVPool

    pool_shape = SimpleNamespace(num_layers=1, num_kv_heads=kv_heads, head_dim=head_dim)
    pages = KVPool.allocate(pool_shape, 2, page_size, torch.bfloat16, "meta").layers[0][0]  # [P, S, K, D]
    q = torch.empty(1, heads, head_dim, device="meta")
    acc = torch.empty(1, splits, heads, head_dim, device="meta")
    ml = torch.empty(1, splits, heads, 2, device="meta")
    strides = {f"stride_{x}{d}": n for x, t in (("q", q), ("o", q)) for d, n in zip("th", t.stride())}
    strides |= {f"stride_{x}{d}": n for x in "kv" for d, n in zip("psh", pages.stride())}  # D is unit-stride
    strides |= {f"stride_a{d}": n for d, n in zip("tsh", acc.stride())}
    strides |= {f"stride_m{d}": n for d, n in zip("ts", ml.stride())}
    return {**strides, "stride_pt": max_pages}


def attention_reports():
    """One row per bf16 launch _tuning ships, for TinyLlama (head_dim 64) and 8B-class (128) shapes, GQA 8, page 16:
    the varlen kernel, the decode kernel at each pipeline depth it takes and the decode reduce."""
    from llmfx.ops import triton_attention as ta
    import torch

    for head_dim in (64, 128):
        shape = dict(HEAD_DIM=head_dim, PAGE_SIZE=16, GROUP=8, PDL=True)
        ints = attention_strides(32, 4, head_dim, page_size=16, max_pages=128, splits=ta.DECODE_MAX_SPLITS)
        block_m, block_d = ta._blocks(head_dim, 8, 16)
        split = dict(MIN_SPLIT=ta.DECODE_MIN_SPLIT, MAX_SPLITS=ta.DECODE_MAX_SPLITS)
        varlen = ta._tuning(torch.bfloat16, head_dim, 1)[0]
        vm, vd = ta._blocks(head_dim, 8, varlen["block_m"])
        stages = varlen.get("num_stages", 2)  # paged_attention_varlen's default
        yield report_row({"kernel": "varlen", "head_dim": head_dim, "config": [vm, varlen["block_n"],
                                                                               varlen["num_warps"], stages]},
                         ta._varlen_kernel, {**shape, "BLOCK_M": vm, "BLOCK_N": varlen["block_n"], "BLOCK_D": vd,
                                             "IEEE": False}, _ATTENTION_POINTERS, varlen["num_warps"],
                         floats=("scale_log2",), ints=ints, num_stages=stages)
        for num_seqs in (1, 256):
            decode = ta._tuning(torch.bfloat16, head_dim, num_seqs)[1]
            stages = decode.get("num_stages", 2)
            yield report_row({"kernel": "decode", "head_dim": head_dim, "num_seqs": num_seqs,
                              "config": [block_m, decode["block_n"], decode["num_warps"], stages]},
                             ta._decode_kernel, {**shape, **split, "BLOCK_M": block_m, "BLOCK_N": decode["block_n"],
                                                 "BLOCK_D": block_d, "IEEE": False,
                                                 "PREFETCH_KV": decode["prefetch_kv"]},
                             _ATTENTION_POINTERS, decode["num_warps"], floats=("scale_log2",), ints=ints,
                             num_stages=stages)
        yield report_row({"kernel": "decode_reduce", "head_dim": head_dim}, ta._decode_reduce_kernel,
                         {**{k: v for k, v in shape.items() if k != "PAGE_SIZE"}, **split, "BLOCK_N": 64,
                          "BLOCK_D": block_d, "GROUP_PAD": 8}, _ATTENTION_POINTERS, 4, ints=ints)


def activation_reports():
    """One row per silu_mul launch: TinyLlama's and Llama-3-8B's intermediate widths in bf16, one in float32."""
    from llmfx.ops.triton_activation import MAX_BLOCK, _silu_mul_kernel

    for inner, dtype in ((5632, "bf16"), (14336, "bf16"), (5632, "fp32")):
        block = min(MAX_BLOCK, triton.next_power_of_2(inner))
        yield report_row({"kernel": "silu_mul", "inner": inner, "dtype": dtype, "block": block}, _silu_mul_kernel,
                         dict(BLOCK=block, PDL=True), {"out_ptr": dtype, "gate_up_ptr": dtype}, 4,
                         ints=dict(inner=inner, stride_gt=2 * inner, stride_ot=inner))


_REGISTER = re.compile(r"%[a-z]+\d+")


def memory_before_wait(compiled, arg_names: list[str], pointers: dict) -> dict:
    """What the PTX does to memory before its first griddepcontrol.wait (PDL's wait).

    Returns the pointer arguments whose memory it loads ("loads") or prefetches ("prefetches") and
    whether it stores ("stores"). Which argument an address comes from is traced through the PTX's
    registers from each `ld.param` (to a fixed point, for loops); a value loaded from memory carries
    its address's arguments on, so an address computed from a loaded page id names the table too.
    arg_names: the kernel's non-constexpr arguments in order (PTX names them _param_0, _param_1, ...).
    """
    lines = compiled.asm["ptx"].splitlines()
    wait = next((i for i, line in enumerate(lines) if "griddepcontrol.wait" in line), None)
    assert wait is not None, "the kernel never waits for the prior kernel"
    statements = []
    for line in lines[:wait]:
        code = line.split("//")[0].strip()
        if code and not code.endswith(":") and not code.startswith("."):
            statements += [re.sub(r"^@!?%p\d+\s+", "", st.strip()) for st in code.split(";") if st.strip()]
    taint: dict[str, frozenset] = {}
    found = {"loads": set(), "prefetches": set(), "stores": False}
    changed = True
    while changed:  # loops carry taint around their back edges: repeat until nothing new
        changed = False
        for st in statements:
            op, _, rest = st.partition(" ")
            param = re.match(r"ld\.param\S*\s+(%\w+),\s*\[\w+_param_(\d+)\]", st)
            if param:
                new = frozenset({arg_names[int(param[2])]})
                dests = [param[1]]
            elif op.startswith(("st.", "atom.", "red.")):
                found["stores"] = True
                continue
            elif op.startswith(("ld.global", "prefetch", "cp.async")):
                address = re.search(r"\[\s*(%\w+)", rest)
                new = taint.get(address[1], frozenset()) if address else frozenset()
                found["prefetches" if op.startswith("prefetch") else "loads"] |= {n for n in new if n in pointers}
                braces = re.search(r"\{([^}]*)\}", rest)
                dests = _REGISTER.findall(braces[1]) if braces else []
            else:
                regs = _REGISTER.findall(rest)
                if not regs:
                    continue
                dests, new = regs[:1], frozenset().union(*(taint.get(r, frozenset()) for r in regs[1:]))
            for d in dests:
                if not new <= taint.get(d, frozenset()):
                    taint[d] = taint.get(d, frozenset()) | new
                    changed = True
    return {"loads": sorted(found["loads"]), "prefetches": sorted(found["prefetches"]), "stores": found["stores"]}


def argument_names(kernel, constexprs: dict, ints: dict | None = None) -> list[str]:
    """The kernel's runtime arguments in order, as _compile specializes them: what PTX calls _param_0, _1, ..."""
    specialized = _specialized(kernel, constexprs, ints)
    return [n for n in inspect.signature(kernel.fn).parameters if n not in specialized]


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
    yield ("paged_attention decode", ta._decode_kernel, {**shape, **split, "BLOCK_M": 16, "IEEE": False,
                                                         "PREFETCH_KV": True}, tensors,
           ("scale_log2",))
    yield ("paged_attention decode reduce", ta._decode_reduce_kernel,
           {**{k: v for k, v in shape.items() if k != "PAGE_SIZE"}, **split, "GROUP_PAD": 8}, tensors, ())
    from llmfx.ops.triton_gemv import _gemv_partial_kernel, _gemv_reduce_kernel

    yield ("gemv", _gemv_partial_kernel, dict(ROWS=1, BLOCK_N=16, BLOCK_K=256, EVEN_K=True, NUM_STAGES=1, PDL=True),
           {"out_ptr": "fp32", "x_ptr": "bf16", "w_ptr": "bf16"}, ())
    yield ("gemv reduce", _gemv_reduce_kernel, dict(SPLITS=8, BLOCK=256, PDL=True),
           {"out_ptr": "bf16", "ws_ptr": "fp32"}, ())
    from llmfx.ops.triton_activation import _silu_mul_kernel

    yield "silu_mul", _silu_mul_kernel, dict(BLOCK=1024, PDL=True), {"out_ptr": "bf16", "gate_up_ptr": "bf16"}, ()


def main() -> None:
    assert not os.environ.get("TRITON_INTERPRET"), "unset TRITON_INTERPRET: the interpreter replaces kernels"
    if "--pdl" in sys.argv[1:]:
        for name, kernel, constexprs, pointers, floats in pdl_kernels():
            compiled = _compile(kernel, constexprs, pointers, 4, floats)
            before = memory_before_wait(compiled, argument_names(kernel, constexprs), pointers)
            print(json.dumps({"kernel": name, **before}), flush=True)
        return
    if "--activation" in sys.argv[1:]:
        for row in activation_reports():
            print(json.dumps(row), flush=True)
        return
    if "--attention" in sys.argv[1:]:
        for row in attention_reports():
            print(json.dumps(row), flush=True)
        return
    if "--gemm" in sys.argv[1:]:
        for row in gemm_reports():
            print(json.dumps(row), flush=True)
        return
    if "--gemv" in sys.argv[1:]:
        for row in gemv_reports(candidates="--candidates" in sys.argv[1:]):
            print(json.dumps(row), flush=True)
        return
    from llmfx.ops.triton_rope_kv import _rope_write_kv_kernel

    for name, constexprs, pointers, num_warps in rope_write_kv_configs():
        print(json.dumps({"kernel": "rope_write_kv", "config": name, "num_warps": num_warps,
                          **compile_sm90(_rope_write_kv_kernel, constexprs, pointers, num_warps)}), flush=True)


if __name__ == "__main__":
    main()
