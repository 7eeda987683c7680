"""The sampler with the filters' vocabulary sort against without it, per batch size, on either device.

    python benchmarks/sampler_variants.py --device cpu --save benchmarks/results
    python benchmarks/sampler_variants.py --device cuda --save benchmarks/results

Greedy rows over a TinyLlama-sized vocabulary: both variants give the same output (checked before
timing); only the cost differs. On CUDA each variant is compiled and replayed as a CUDA graph
(launch overhead out); on the CPU it runs eagerly, as the engine's CPU path does, the two variants
alternating so that the box's drift hits both, and the figure is the median of the rounds' medians.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from llmfx.bench import graph_replay_us, save_rows
from llmfx.sampler import SamplingTensors, sample
from llmfx.sampling_params import SamplingParams


def cpu_ms(fn, iters: int) -> float:
    """Median milliseconds of fn over iters calls, after one untimed call."""
    fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--batches", default="1,8,64,256")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--rounds", type=int, default=5, help="CPU: alternating rounds per variant")
    p.add_argument("--iters", type=int, default=10, help="CPU: calls per round")
    p.add_argument("--save", type=Path, default=None)
    args = p.parse_args(argv)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        gen = torch.Generator(device=args.device).manual_seed(batch)
        logits = torch.randn(batch, args.vocab, device=args.device, generator=gen)
        tensors = SamplingTensors.build([SamplingParams(temperature=0.0)] * batch, [1] * batch, [3] * batch,
                                        args.device)
        expected = sample(logits, tensors)
        got = sample(logits, tensors, filtering=False)
        assert torch.equal(got.tokens, expected.tokens) and torch.equal(got.topk_ids, expected.topk_ids)
        row = {"batch": batch, "vocab": args.vocab, "device": args.device}
        if args.device == "cuda":
            for name, filtering in (("sorting_us", True), ("sort_free_us", False)):
                compiled = torch.compile(lambda f=filtering: sample(logits, tensors, filtering=f), fullgraph=True,
                                         dynamic=False)
                row[name], _ = graph_replay_us(compiled)
        else:
            sorting, sort_free = [], []
            for _ in range(args.rounds):  # alternate, one round each
                sorting.append(cpu_ms(lambda: sample(logits, tensors), args.iters))
                sort_free.append(cpu_ms(lambda: sample(logits, tensors, filtering=False), args.iters))
            row["sorting_ms"], row["sort_free_ms"] = statistics.median(sorting), statistics.median(sort_free)
            row["sorting_round_ms"], row["sort_free_round_ms"] = sorting, sort_free
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("round_ms")}), flush=True)
        rows.append(row)
    if args.save:
        save_rows(args.save, f"sampler-variants-{args.device}.json", rows, threads=torch.get_num_threads())


if __name__ == "__main__":
    main()
