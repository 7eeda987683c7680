"""Device time of a step's rotary embedding + KV write: apply_rope + write_kv (before) vs llmfx::rope_write_kv.

    python benchmarks/rope_kv_write.py --save benchmarks/results      # on the GPU: TinyLlama shape
    python benchmarks/rope_kv_write.py --device cpu --tokens 1,3 --layers 2 --heads 4 --kv-heads 2 --head-dim 16

Every layer gets its own K/V pools and its own q, k, v, strided views of one qkv projection as the
decoder passes them; token i is the next decode token of sequence i at --context, so each write
lands on another page. Each variant is a whole step (all layers) under torch.compile(fullgraph=True)
(inductor, as the engine compiles, on CUDA; aot_eager on CPU): `before` is the decoder's old code, its
one gather of table rows per step included, `fused` calls the op; on CUDA the fused kernel is also
launched bare with several num_warps. On CUDA each step is captured in a CUDA graph and replayed,
so launch overhead is out of the figures, as when serving; on CPU the loop is timed with
perf_counter and only shows that the path runs. Before timing, fused must equal before within the
bf16 rounding of the rotation (the kernel rotates in float32).
"""

import argparse
import time
from pathlib import Path

import torch

from llmfx.bench import H200_COPY_BYTES_PER_S, Row, graph_replay_us, parse_ints, print_table, save
from llmfx.ops import apply_rope, rope_write_kv, write_kv


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke run of the code path")
    p.add_argument("--tokens", type=parse_ints, default=(1, 8, 64, 256), help="token counts T per step")
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--context", type=int, default=512, help="position of every decode token")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--num-warps", type=parse_ints, default=(1, 2, 4, 8), help="bare-kernel launches to time (CUDA)")
    p.add_argument("--iters", type=int, default=200, help="timed replays")
    p.add_argument("--save", type=Path, default=None, help="folder for <date>-<gpu>-rope-kv-write.json")
    return p


def make_step_inputs(args, tokens: int, device: torch.device, dtype: torch.dtype):
    """Per layer (k pages, v pages, q, k, v) and the step's rope table, positions and slots."""
    gen = torch.Generator().manual_seed(tokens)
    heads, kv_heads, head_dim, page = args.heads, args.kv_heads, args.head_dim, args.page_size
    pages_per_seq = args.context // page + 1
    num_pages = 1 + tokens * pages_per_seq  # page 0 is the null page
    positions = torch.full((tokens,), args.context, dtype=torch.int64)
    first_page = 1 + torch.arange(tokens) * pages_per_seq
    slots = (first_page + args.context // page) * page + args.context % page
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(args.context + 1).float(), inv_freq)
    rope = torch.cat([angles.cos(), angles.sin()], dim=-1)
    layers = []
    for _ in range(args.layers):
        qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(device, dtype)
        q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        pools = [torch.zeros(num_pages, page, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(2)]
        layers.append((*pools, q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim),
                       v.view(tokens, kv_heads, head_dim)))
    return layers, rope.to(device), positions.to(device), slots.to(device)


def before_step(layers, rope, positions, slots):
    """The decoder before the fusion: one gather of table rows, then apply_rope twice and write_kv per layer."""
    cos_sin = rope[positions]  # [T, D]
    out = []
    for k_pages, v_pages, q, k, v in layers:
        write_kv(k_pages, v_pages, apply_rope(k, cos_sin), v, slots)
        out.append(apply_rope(q, cos_sin))
    return out


def fused_step(layers, rope, positions, slots):
    """The decoder now: one llmfx::rope_write_kv per layer."""
    return [rope_write_kv(k_pages, v_pages, q, k, v, rope, positions, slots) for k_pages, v_pages, q, k, v in layers]


def check(layers, rope, positions, slots, compiled_before, compiled_fused) -> float:
    """Largest |fused - before| over rotated q and written pools, in units of the inputs' scale; raises past 1/32."""
    # Fresh pools; q, k, v stay the same strided views (a clone would make them contiguous).
    copies = [[(kp.clone(), vp.clone(), q, k, v) for kp, vp, q, k, v in layers] for _ in range(2)]
    q_before = compiled_before(copies[0], rope, positions, slots)
    q_fused = compiled_fused(copies[1], rope, positions, slots)
    worst = 0.0
    for a, b, la, lb in zip(q_before, q_fused, *copies):
        scale = max(la[2].abs().max().item(), la[3].abs().max().item(), 1e-6)
        for x, y in ((a, b), (la[0][1:], lb[0][1:]), (la[1][1:], lb[1][1:])):
            worst = max(worst, (x.float() - y.float()).abs().max().item() / scale)
    if worst > 1 / 32:  # bf16 rounds at 2^-8; the two rotations differ by a few roundings
        raise SystemExit(f"fused and before disagree: max difference {worst:.3g} of the inputs' scale")
    return worst


def time_us(fn, device: torch.device, iters: int) -> float:
    """Microseconds per call: CUDA-graph replays timed by events on CUDA, a perf_counter loop on CPU."""
    if device.type == "cuda":
        return graph_replay_us(fn, iters)[0]
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) * 1e6 / iters


def step_floor_us(args, tokens: int, itemsize: int) -> float:
    """Bytes a step must move (q, k, v read; q, k, v written; table rows read) at the H200's copy bandwidth."""
    per_token = 2 * (args.heads + 2 * args.kv_heads) * args.head_dim * itemsize + args.head_dim * 4
    return args.layers * tokens * per_token / H200_COPY_BYTES_PER_S * 1e6


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("rope_kv_write: --device cuda needs a CUDA device (for a CPU smoke run pass --device cpu)")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    backend = "inductor" if device.type == "cuda" else "aot_eager"
    rows = []
    with torch.inference_mode():
        for tokens in args.tokens:
            layers, rope, positions, slots = make_step_inputs(args, tokens, device, dtype)
            torch._dynamo.reset()  # a fresh compile for each T, as the engine's buckets get
            compiled_before = torch.compile(before_step, fullgraph=True, dynamic=False, backend=backend)
            compiled_fused = torch.compile(fused_step, fullgraph=True, dynamic=False, backend=backend)
            worst = check(layers, rope, positions, slots, compiled_before, compiled_fused)
            floor = step_floor_us(args, tokens, dtype.itemsize) if device.type == "cuda" else None
            variants = {"apply_rope + write_kv (compiled)": lambda: compiled_before(layers, rope, positions, slots),
                        "rope_write_kv (compiled)": lambda: compiled_fused(layers, rope, positions, slots)}
            if device.type == "cuda":
                from llmfx.ops.triton_rope_kv import triton_rope_write_kv

                for w in args.num_warps:
                    variants[f"rope_write_kv kernel, num_warps={w}"] = lambda w=w: [
                        triton_rope_write_kv(*layer, rope, positions, slots, num_warps=w) for layer in layers]
            for system, fn in variants.items():
                us = time_us(fn, device, args.iters)
                rows.append(Row(benchmark="rope_kv", system=system, batch=tokens, metric="us_per_step", value=us,
                                floor_fraction=None if floor is None else floor / us))
                rows.append(Row(benchmark="rope_kv", system=system, batch=tokens, metric="us_per_layer",
                                value=us / args.layers))
            rows.append(Row(benchmark="rope_kv", system="fused vs before", batch=tokens,
                            metric="max_diff_of_input_scale", value=worst))
    print_table(rows)
    if args.save is not None:
        shape = {k: getattr(args, k) for k in ("layers", "heads", "kv_heads", "head_dim", "page_size", "context",
                                               "dtype", "iters")}
        out = save(rows, args.save, tag="-rope-kv-write" if device.type == "cuda" else "-rope-kv-write-smoke",
                   extra={"device": args.device, "shape": shape, "triton": _triton_version()})
        print(f"saved {out}")


def _triton_version() -> str | None:
    try:
        import triton
    except ModuleNotFoundError:
        return None
    return triton.__version__


if __name__ == "__main__":
    main()
