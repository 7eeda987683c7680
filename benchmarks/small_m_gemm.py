"""cuBLAS vs the Triton gemv (llmfx/ops/triton_gemv.py) at decode batch sizes, on the GPU: us and TB/s.

    python benchmarks/small_m_gemm.py --save benchmarks/results     # on the H200, ~3 minutes

TinyLlama-1.1B's linear layers (qkv, o, gate_up, down) and lm_head at M = 1, 2, 4, 8 rows, bf16. For
each (shape, M), cuBLAS (F.linear) and every candidate launch config: the output must first match
F.linear in float32 within bf16 rounding; then the call is captured in a CUDA graph after a read of
256 MB (the L2 starts cold, as in a decode step, where each layer's weights were evicted since their
last use) and the read's own time is subtracted. TB/s counts the weight bytes, read once.

Prints one JSON line per (shape, M, config), then per (shape, M) cuBLAS against the best config, the
per-layer sum (qkv + o + gate_up + down) per M, and per shape class of triton_gemv._CONFIGS and M the
one config with the least summed time over the class's shapes (what the table should hold).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from llmfx.bench import ColdL2Timer, linear_shapes, parse_ints, save_rows
from llmfx.ops.triton_gemv import GemvConfig, gemv, gemv_config, shape_class
from llmfx.presets import preset

SHAPES = linear_shapes(preset("tinyllama-1.1b"))
LAYER = ("qkv", "o", "gate_up", "down")  # one decoder layer's matmuls
NUM_LAYERS = preset("tinyllama-1.1b").num_layers

# (block_n, block_k) per M at 4 warps: each row keeps a [block_n, block_k] float32 accumulator, so the
# tile per thread (block_n * block_k / 128 elements, >= 8 for one 16-byte load) shrinks as M grows
# (rows x tile <= ~64-128 registers). `python -m tests.sm90_compile --gemv --candidates` shows their spills.
TILES = {1: ((8, 256), (16, 256), (16, 512), (32, 256)),
         2: ((4, 256), (8, 256), (16, 256), (8, 512)),
         4: ((4, 256), (8, 128), (8, 256), (4, 512)),
         8: ((2, 512), (4, 256), (8, 128), (8, 256))}


def tiles_for(m: int) -> tuple[tuple[int, int], ...]:
    """The candidate tiles of the smallest TILES entry holding m rows."""
    return TILES[min(t for t in TILES if t >= m)]


def candidates(m: int, split_k=(1, 2, 4, 8, 16), num_warps=(4,), num_stages=(1, 2)):
    """Every candidate config for m rows (before removing the ones that are the same launch for a shape)."""
    for (block_n, block_k), splits, warps, stages in itertools.product(tiles_for(m), split_k, num_warps, num_stages):
        yield GemvConfig(block_n, block_k, splits, warps, stages)


def distinct_for_shape(configs, k: int):
    """configs without repeats of the same launch at this K (split_k values that give the same splits)."""
    seen = set()
    for cfg in configs:
        key = (cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages, cfg.splits(k))
        if key not in seen:
            seen.add(key)
            yield cfg


def tbps(n: int, k: int, us: float) -> float:
    """Weight bytes (bf16) per second, in TB/s."""
    return 2 * n * k / (us * 1e-6) / 1e12


def summarize(rows: list[dict]) -> list[dict]:
    """Per (shape, M): cuBLAS, the shipped config and the best Triton config with their times."""
    out = []
    keys = sorted({(r["shape"], r["M"]) for r in rows}, key=lambda s: (list(SHAPES).index(s[0]), s[1]))
    for shape, m in keys:
        here = [r for r in rows if r["shape"] == shape and r["M"] == m and "us" in r]
        cublas = next((r["us"] for r in here if r["system"] == "cublas"), None)
        triton = sorted((r for r in here if r["system"] == "triton"), key=lambda r: r["us"])
        shipped = next((r["us"] for r in triton if r.get("shipped")), None)
        n, k = SHAPES[shape]
        line = {"shape": shape, "M": m, "cublas_us": cublas, "shipped_us": shipped,
                "best_us": triton[0]["us"] if triton else None, "best_config": triton[0]["config"] if triton else None}
        if cublas and triton:
            line["speedup"] = cublas / triton[0]["us"]
            line["cublas_tbps"], line["best_tbps"] = tbps(n, k, cublas), tbps(n, k, triton[0]["us"])
        out.append(line)
    return out


def layer_sums(summary: list[dict]) -> list[dict]:
    """Per M: qkv + o + gate_up + down for cuBLAS and for each shape's best config, per layer and x 22."""
    out = []
    for m in sorted({s["M"] for s in summary}):
        per = {s["shape"]: s for s in summary if s["M"] == m and s["shape"] in LAYER}
        if set(per) != set(LAYER) or any(per[s]["cublas_us"] is None or per[s]["best_us"] is None for s in LAYER):
            continue
        cublas = sum(per[s]["cublas_us"] for s in LAYER)
        best = sum(per[s]["best_us"] for s in LAYER)
        out.append({"M": m, "layer_cublas_us": cublas, "layer_best_triton_us": best,
                    "model_cublas_us": cublas * NUM_LAYERS, "model_best_triton_us": best * NUM_LAYERS,
                    "saved_per_step_us": (cublas - best) * NUM_LAYERS})
    return out


def class_table(rows: list[dict]) -> list[dict]:
    """Per shape class and M: the config with the least summed time over every measured shape of the class."""
    out = []
    triton = [r for r in rows if r["system"] == "triton" and "us" in r]
    for cls, m in sorted({(shape_class(*SHAPES[r["shape"]]), r["M"]) for r in triton}):
        shapes = {r["shape"] for r in triton if r["M"] == m and shape_class(*SHAPES[r["shape"]]) == cls}
        totals: dict[str, dict] = {}
        for r in triton:
            if r["M"] == m and r["shape"] in shapes:
                entry = totals.setdefault(json.dumps(r["config"], sort_keys=True), {"us": 0.0, "shapes": set()})
                entry["us"] += r["us"]
                entry["shapes"].add(r["shape"])
        complete = {c: e["us"] for c, e in totals.items() if e["shapes"] == shapes}
        if complete:
            best = min(complete, key=complete.get)
            out.append({"class": cls, "M": m, "shapes": sorted(shapes), "config": json.loads(best),
                        "summed_us": complete[best]})
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", type=lambda s: tuple(s.split(",")), default=tuple(SHAPES),
                   help=f"comma-separated, of {','.join(SHAPES)}")
    p.add_argument("--m", type=parse_ints, default=(1, 2, 4, 8))
    p.add_argument("--split-k", type=parse_ints, default=(1, 2, 4, 8, 16))
    p.add_argument("--num-warps", type=parse_ints, default=(4,))
    p.add_argument("--num-stages", type=parse_ints, default=(1, 2))
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--save", type=Path, default=None, help="directory for small-m-gemm.json")
    args = p.parse_args(argv)
    assert set(args.shapes) <= set(SHAPES), f"unknown shape in {args.shapes}"
    assert torch.cuda.is_available(), "needs a CUDA device"
    device, dtype = torch.device("cuda"), torch.bfloat16
    cold_us = ColdL2Timer(device, args.iters)
    print(json.dumps({"flush_us": cold_us.flush_us}), flush=True)
    start, rows = time.perf_counter(), []
    for shape in args.shapes:
        n, k = SHAPES[shape]
        gen = torch.Generator(device=device).manual_seed(n + k)
        weight = (torch.randn(n, k, device=device, generator=gen) / k**0.5).to(dtype)
        for m in args.m:
            x = torch.randn(m, k, device=device, generator=gen).to(dtype)
            expected = F.linear(x.float(), weight.float())
            scale = max(1.0, expected.abs().amax().item())
            base = {"shape": shape, "N": n, "K": k, "M": m}
            row = {**base, "system": "cublas", "us": cold_us(lambda: F.linear(x, weight))}
            row["tbps"] = tbps(n, k, row["us"])
            print(json.dumps(row), flush=True)
            rows.append(row)
            shipped = gemv_config(m, n, k)
            configs = list(candidates(m, args.split_k, args.num_warps, args.num_stages))
            for cfg in distinct_for_shape([shipped] + [c for c in configs if c != shipped], k):
                row = {**base, "system": "triton", "config": asdict(cfg), "splits": cfg.splits(k)[0],
                       "shipped": cfg == shipped}
                try:
                    out = gemv(x, weight, config=cfg)
                    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2 * scale)
                    row["us"] = cold_us(lambda cfg=cfg: gemv(x, weight, config=cfg))
                    row["tbps"] = tbps(n, k, row["us"])
                except Exception as err:  # noqa: BLE001 -- a config that fails to compile or to match is a result
                    row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
                print(json.dumps(row), flush=True)
                rows.append(row)
            print(f"# {shape} M={m} done, {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    summary = summarize(rows)
    sums, table = layer_sums(summary), class_table(rows)
    for line in summary + sums + table:
        print(json.dumps(line), flush=True)
    if args.save:
        print(save_rows(args.save, "small-m-gemm.json", rows, summary=summary, layer_sums=sums, class_table=table,
                        flush_us=cold_us.flush_us))


if __name__ == "__main__":
    main()
