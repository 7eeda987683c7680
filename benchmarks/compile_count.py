"""Graphs torch.compile builds while the engine warms up, on the CPU (the same dynamo logic as on the GPU).

    python benchmarks/compile_count.py [--sort-free-min-rows 2] [--batch-sizes 1,2,4,8,16] [--save DIR]

Builds the tiny preset's engine with compile=True over decode buckets --batch-sizes (and their mixed
buckets), warms it up, and reports dynamo's unique_graphs counter and the warm-up seconds. Every
compile is seconds of startup on the H200 even with a warm cache, so this counts what startup pays
for the sampler variants; --sort-free-min-rows sets SORT_FREE_MIN_ROWS["cpu"] as CUDA's is set (2),
since the CPU's own value (1) would compile more variants at one row than the GPU does.
Run it with PYTHONPATH=<another tree> to count that tree's compiles; --label names the tree in the results.
"""

import argparse
import time
from pathlib import Path

import torch

from llmfx import bench, model_engine
from llmfx.buckets import make_buckets
from llmfx.kv_pool import KVPool
from llmfx.model_engine import EngineConfig, ModelEngine
from llmfx.weights import load_params, resolve_model


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sort-free-min-rows", type=int, default=2)
    p.add_argument("--batch-sizes", default="1,2,4,8,16")
    p.add_argument("--label", default="", help="which tree ran (the results' commit field is the cwd's HEAD)")
    p.add_argument("--save", type=Path, default=None)
    args = p.parse_args(argv)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    model_engine.SORT_FREE_MIN_ROWS["cpu"] = args.sort_free_min_rows
    source = resolve_model("tiny")
    engine = ModelEngine(load_params(source), source.config, EngineConfig(
        page_size=4, seed=0, max_pages_per_seq=16, buckets=make_buckets(max(sizes), 64, sizes), compile=True))
    torch._dynamo.reset()
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    start = time.perf_counter()
    engine.warmup(KVPool.allocate(source.config, 80, 4, torch.float32, "cpu"))
    row = {"label": args.label, "batch_sizes": sizes, "sort_free_min_rows": args.sort_free_min_rows,
           "unique_graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"] - before,
           "warmup_s": round(time.perf_counter() - start, 1)}
    print(row)
    if args.save:
        print("saved", bench.save_rows(args.save, f"{time.strftime('%Y-%m-%d')}-cpu-compile-count{args.label}.json",
                                       [row]))


if __name__ == "__main__":
    main()
