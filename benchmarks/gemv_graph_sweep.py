"""The GEMV's launch settings, swept inside a small-batch decode forward's CUDA graph (GPU only).

benchmarks/small_m_gemm.py times each GEMV alone (cold L2, one launch); in a decode step the GEMVs run
back to back with PDL inside one graph, where what counts is the forward's time. For the TinyLlama
shape at --batch rows (default 1; dummy bf16 weights, context 1024) this compiles the forward once
(`bench.compile_static`: as the engine compiles a step, without its cudagraphs); then, for each
candidate config of one shape class of `triton_gemv._CONFIGS` at that row count (the other classes as
shipped), it captures the forward as a CUDA graph and times
its replays with CUDA events. llmfx::linear is opaque to inductor and reads its config and its routing
(`triton_linear.LINEAR_GEMV_ROWS`) when called, so a candidate costs a capture, not a compile. The
shipped table is re-timed between classes to show drift; above LINEAR_GEMV_ROWS rows, where serving
runs another kernel (the Triton matmul to 16 rows, then cuBLAS), the forward as served is timed too.

With --no-pdl-trace it also captures the forward with llmfx's kernels launched without PDL and prints
its kernel table: with PDL each kernel's time in a trace includes its wait for the one before, so
only the table without PDL splits the step into kernels.

    python benchmarks/gemv_graph_sweep.py [--batch 1] [--classes square,wide,deep] [--no-pdl-trace] [--save DIR]
"""

import argparse
import itertools
import json
from pathlib import Path

import torch

from llmfx.bench import (compile_static, decode_batch, graph_replay_us, preset_dummy_params, print_kernel_table,
                         save_rows)
from llmfx.models import forward
from llmfx.ops import triton_gemv, triton_linear, triton_pdl
from llmfx.ops.triton_gemv import GemvConfig


def candidates(rows: int = 1) -> list[GemvConfig]:
    """Configs for rows rows: 16-byte loads at least (8 weight elements a thread), at most 128 accumulators a thread."""
    out = []
    for block_n, block_k, split_k, warps in itertools.product((4, 8, 16, 32), (128, 256, 512, 1024), (1, 2, 4, 8),
                                                             (4, 8)):
        per_thread = block_n * block_k // (32 * warps)
        if per_thread >= 8 and rows * per_thread <= 128:
            out.append(GemvConfig(block_n, block_k, split_k, warps, 1))
    return out


def with_config(shape_class: str, rows: int, config: GemvConfig) -> None:
    """Make config the shape class's setting for the row counts its table entry covering rows covers."""
    table = triton_gemv._CONFIGS[shape_class]
    at = next(i for i, (most, _) in enumerate(table) if rows <= most)
    triton_gemv._CONFIGS[shape_class] = table[:at] + ((table[at][0], config),) + table[at + 1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tinyllama-1.1b")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1, help=f"decode rows, 1 to {triton_gemv.MAX_ROWS}")
    parser.add_argument("--classes", default="square,wide,deep")
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--no-pdl-trace", action="store_true")
    parser.add_argument("--save", default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    cfg, params = preset_dummy_params(args.model, device)
    kv, inputs = decode_batch(cfg, args.batch, args.context, torch.bfloat16, device)
    fwd = compile_static(lambda: forward(params, cfg, inputs, kv), device)
    shipped = dict(triton_gemv._CONFIGS)
    served_rows = triton_linear.LINEAR_GEMV_ROWS
    rows = []

    def timed(label: dict) -> float:
        us, graph = graph_replay_us(fwd, args.iters)
        del graph
        rows.append({**label, "forward_us": us})
        print(json.dumps(rows[-1]), flush=True)
        return us

    with torch.inference_mode():
        if args.batch > served_rows:
            timed({"class": "as served at this batch"})
        triton_linear.LINEAR_GEMV_ROWS = max(served_rows, args.batch)  # the GEMV at this batch from here on
        for shape_class in args.classes.split(","):
            timed({"class": "shipped"})
            for config in candidates(args.batch):
                with_config(shape_class, args.batch, config)
                timed({"class": shape_class, "config": [config.block_n, config.block_k, config.split_k,
                                                        config.num_warps, config.num_stages]})
            triton_gemv._CONFIGS[shape_class] = shipped[shape_class]
        timed({"class": "shipped"})
        best = {}
        for shape_class in args.classes.split(","):
            mine = [r for r in rows if r["class"] == shape_class]
            best[shape_class] = min(mine, key=lambda r: r["forward_us"])
            with_config(shape_class, args.batch, GemvConfig(*best[shape_class]["config"]))
        timed({"class": "best of each class together", "configs": {k: v["config"] for k, v in best.items()}})
        triton_gemv._CONFIGS.update(shipped)
        timed({"class": "shipped"})
        if args.batch > served_rows:
            triton_linear.LINEAR_GEMV_ROWS = served_rows
            timed({"class": "as served at this batch"})
        if args.no_pdl_trace:
            triton_pdl._capable = lambda index: False  # llmfx's kernels launch without PDL from here on
            us, graph = graph_replay_us(fwd, args.iters)
            rows.append({"class": "shipped, llmfx kernels without PDL", "forward_us": us})
            print(json.dumps(rows[-1]), flush=True)
            print_kernel_table(graph, args.save and Path(args.save, f"gemv_graph_sweep_trace_no_pdl_b{args.batch}.txt"))
    if args.save:
        save_rows(Path(args.save), f"gemv_graph_sweep_b{args.batch}.json", rows, model=args.model,
                  context=args.context, batch=args.batch)


if __name__ == "__main__":
    main()
