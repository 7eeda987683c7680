"""cuBLAS vs the Triton tensor-core matmul (llmfx/ops/triton_gemm.py) at decode batches of 16-256 rows, on the GPU.

    python benchmarks/mid_m_gemm.py --save benchmarks/results     # on the H200

TinyLlama-1.1B's linear layers (qkv, o, gate_up, down) and lm_head, bf16. For each (shape, M), cuBLAS (F.linear)
and every candidate config: the output must first match F.linear within bf16 rounding; then the call
is captured in a CUDA graph after a read of 256 MB (the layer's weights start cold, as in a decode
step) and the read's own time is subtracted. Prints one JSON line per (shape, M, config), then per
(shape, M) cuBLAS against the best config, and per M the decoder layer's four matmuls summed both ways.
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from llmfx.bench import ColdL2Timer, linear_shapes, parse_ints, save_rows
from llmfx.ops.triton_gemm import GemmConfig, gemm
from llmfx.presets import preset

SHAPES = linear_shapes(preset("tinyllama-1.1b"))
LAYER = ("qkv", "o", "gate_up", "down")  # one decoder layer's matmuls


def candidates(m: int, args) -> list[GemmConfig]:
    """Configs whose row tile is at least 16 (tl.dot) and at most M's next power of two (bigger tiles only pad)."""
    row_tiles = [b for b in args.block_m if b <= max(16, 1 << (m - 1).bit_length())]
    return [GemmConfig(bm, bn, bk, split, warps, stages)
            for bm, bn, bk, split, warps, stages in itertools.product(
                row_tiles, args.block_n, args.block_k, args.split_k, args.num_warps, args.num_stages)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=parse_ints, default=(16, 32, 64, 128, 256))
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--block-m", type=parse_ints, default=(16, 32, 64, 128))
    p.add_argument("--block-n", type=parse_ints, default=(32, 64, 128))
    p.add_argument("--block-k", type=parse_ints, default=(64, 128))
    p.add_argument("--split-k", type=parse_ints, default=(1, 2, 4))
    p.add_argument("--num-warps", type=parse_ints, default=(4,))
    p.add_argument("--num-stages", type=parse_ints, default=(4,))
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--save", type=Path, default=None)
    args = p.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    cold_us = ColdL2Timer(device, args.iters)
    gen = torch.Generator(device=device).manual_seed(0)
    rows, summary = [], []
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        weight = torch.randn(n, k, device=device, dtype=dtype, generator=gen) * k ** -0.5
        for m in args.rows:
            x = torch.randn(m, k, device=device, dtype=dtype, generator=gen)
            expected = F.linear(x.float(), weight.float())
            cublas_us = cold_us(lambda: F.linear(x, weight))
            rows.append({"shape": name, "m": m, "system": "cublas", "us": cublas_us})
            print(json.dumps(rows[-1]), flush=True)
            best = None
            for cfg in candidates(m, args):
                row = {"shape": name, "m": m, "system": "triton", **asdict(cfg)}
                try:
                    torch.testing.assert_close(gemm(x, weight, cfg).float(), expected, rtol=2e-2, atol=2e-2)
                    row["us"] = cold_us(lambda cfg=cfg: gemm(x, weight, cfg))
                    if best is None or row["us"] < best["us"]:
                        best = row
                except Exception as err:  # noqa: BLE001 -- a config that does not compile or fit is a result too
                    row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
                print(json.dumps(row), flush=True)
                rows.append(row)
            line = {"shape": name, "m": m, "cublas_us": cublas_us, "best": best}
            print(json.dumps(line), flush=True)
            summary.append(line)
    for m in args.rows:
        mine = [s for s in summary if s["m"] == m and s["best"] and s["shape"] in LAYER]
        print(json.dumps({"m": m, "layer_cublas_us": sum(s["cublas_us"] for s in mine),
                          "layer_best_triton_us": sum(s["best"]["us"] for s in mine)}), flush=True)
    if args.save:
        save_rows(args.save, "mid-m-gemm.json", rows, summary=summary, flush_us=cold_us.flush_us)


if __name__ == "__main__":
    main()
