"""The one-row GEMV's launch settings, swept inside the batch-1 forward's CUDA graph (GPU only).

benchmarks/small_m_gemm.py times each GEMV alone (cold L2, one launch); at batch 1 the GEMVs run
back to back with PDL inside one graph, where what counts is the forward's time. For the TinyLlama
shape at batch 1 (dummy bf16 weights, context 1024) this compiles the forward once (inductor, no
cudagraphs); then, for each candidate config of one shape class of `triton_gemv._CONFIGS` (the other
classes as shipped), it captures the forward as a CUDA graph and times its replays with CUDA events.
llmfx::linear is opaque to inductor and reads its config when called, so a candidate costs a capture,
not a compile. The shipped table is re-timed between classes to show drift.

With --no-pdl-trace it also captures the forward with llmfx's kernels launched without PDL and prints
its kernel table: with PDL each kernel's time in a trace includes its wait for the one before, so
only the table without PDL splits the step into kernels.

    python benchmarks/gemv_graph_sweep.py [--classes square,wide,deep] [--no-pdl-trace] [--save DIR]
"""

import argparse
import itertools
import json
from pathlib import Path

import torch

from llmfx.batch import SequenceChunk
from llmfx.bench import graph_replay_us, save_rows
from llmfx.kv_pool import KVPool
from llmfx.models import forward
from llmfx.ops import triton_gemv, triton_pdl
from llmfx.ops.triton_gemv import GemvConfig
from llmfx.step_inputs import pack
from llmfx.weights import load_params, resolve_model


def candidates() -> list[GemvConfig]:
    """One-row configs: 16-byte loads at least (block_n * block_k >= 8 elements a thread), at most 128 a thread."""
    out = []
    for block_n, block_k, split_k, warps in itertools.product((4, 8, 16, 32), (128, 256, 512, 1024), (1, 2, 4, 8),
                                                             (4, 8)):
        per_thread = block_n * block_k // (32 * warps)
        if 8 <= per_thread <= 128:
            out.append(GemvConfig(block_n, block_k, split_k, warps, 1))
    return out


def with_one_row_config(shape_class: str, config: GemvConfig) -> None:
    """Make config the shape class's setting for one row (the rows above keep theirs)."""
    table = triton_gemv._CONFIGS[shape_class]
    triton_gemv._CONFIGS[shape_class] = ((1, config),) + tuple(row for row in table if row[0] > 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tinyllama-1.1b")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--classes", default="square,wide,deep")
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--no-pdl-trace", action="store_true")
    parser.add_argument("--save", default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    source = resolve_model(args.model)
    cfg = source.config
    params = load_params(source, dtype="bfloat16", device=device, load_format="dummy", seed=0, max_positions=4096)
    page = 16
    per_seq = -(-(args.context + 1) // page)
    kv = KVPool.allocate(cfg, per_seq + 1, page, torch.bfloat16, device).take()
    inputs = pack([SequenceChunk((5,), args.context, tuple(range(1, 1 + per_seq)))], page, device, max_pages=per_seq)
    fwd = torch.compile(lambda: forward(params, cfg, inputs, kv), fullgraph=True, dynamic=False)
    shipped = {name: table[0][1] for name, table in triton_gemv._CONFIGS.items()}
    rows = []

    def timed(label: dict) -> float:
        us, graph = graph_replay_us(fwd, args.iters)
        del graph
        rows.append({**label, "forward_us": us})
        print(json.dumps(rows[-1]), flush=True)
        return us

    with torch.inference_mode():
        for shape_class in args.classes.split(","):
            timed({"class": "shipped"})
            for config in candidates():
                with_one_row_config(shape_class, config)
                timed({"class": shape_class, "config": [config.block_n, config.block_k, config.split_k,
                                                        config.num_warps, config.num_stages]})
            with_one_row_config(shape_class, shipped[shape_class])
        timed({"class": "shipped"})
        best = {}
        for shape_class in args.classes.split(","):
            mine = [r for r in rows if r["class"] == shape_class]
            best[shape_class] = min(mine, key=lambda r: r["forward_us"])
            with_one_row_config(shape_class, GemvConfig(*best[shape_class]["config"]))
        timed({"class": "best of each class together", "configs": {k: v["config"] for k, v in best.items()}})
        for shape_class in args.classes.split(","):
            with_one_row_config(shape_class, shipped[shape_class])
        timed({"class": "shipped"})
        if args.no_pdl_trace:
            triton_pdl._capable = lambda index: False  # llmfx's kernels launch without PDL from here on
            us, graph = graph_replay_us(fwd, args.iters)
            rows.append({"class": "shipped, llmfx kernels without PDL", "forward_us": us})
            print(json.dumps(rows[-1]), flush=True)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    graph.replay()
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40)
            print(table)
            if args.save:
                Path(args.save, "gemv_graph_sweep_trace_no_pdl_b1.txt").write_text(table)
    if args.save:
        save_rows(Path(args.save), "gemv_graph_sweep.json", rows, model=args.model, context=args.context)


if __name__ == "__main__":
    main()
