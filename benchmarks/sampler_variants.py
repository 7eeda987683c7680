"""The sampler's variants per batch size, on either device: with the filters' sort, without it, without noise, lean.

    python benchmarks/sampler_variants.py --device cpu --save benchmarks/results
    python benchmarks/sampler_variants.py --device cuda --save benchmarks/results

Greedy rows over a TinyLlama-sized vocabulary: `sorting` is the general sampler, `sort_free` skips
the filters' sort (filtering=False), `greedy` also skips the Gumbel noise (noise=False, which the
eager engine path takes for a greedy-only batch), `lean` skips the sort and the top-20
(top_logprobs=False: what a compiled batch without filters, logprobs or beams runs). All give the
same tokens, logprobs and ranks (checked before timing; the top-20 too, except lean's, which has
none); only the cost differs. On CUDA each variant is compiled and replayed as a CUDA graph
(launch overhead out); on the CPU it runs eagerly, as the engine's CPU path does, the variants
alternating so that the box's drift hits them all, and the figure is the median of the rounds' medians.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from llmfx.bench import graph_replay_us, save_rows
from llmfx.sampler import SamplingTensors, sample, token_words
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
        words = token_words(args.vocab, args.device)  # as the engine passes them: computed once
        tensors = SamplingTensors.build([SamplingParams(temperature=0.0)] * batch, [1] * batch, [3] * batch,
                                        args.device)
        variants = {"sorting": {}, "sort_free": {"filtering": False}, "greedy": {"filtering": False, "noise": False},
                    "lean": {"filtering": False, "top_logprobs": False}}
        expected = sample(logits, tensors, words=words)
        for variant in variants.values():
            got = sample(logits, tensors, words=words, **variant)
            assert torch.equal(got.tokens, expected.tokens) and torch.equal(got.ranks, expected.ranks)
            assert torch.equal(got.logprobs, expected.logprobs)
            assert torch.equal(got.topk_ids, expected.topk_ids if variant.get("top_logprobs", True)
                               else torch.full_like(expected.topk_ids, -1))
        row = {"batch": batch, "vocab": args.vocab, "device": args.device}
        if args.device == "cuda":
            for name, variant in variants.items():
                torch._dynamo.reset()  # one lambda code object across variants and batches: compile each afresh
                compiled = torch.compile(lambda v=variant: sample(logits, tensors, words=words, **v), fullgraph=True,
                                         dynamic=False)
                row[f"{name}_us"], _ = graph_replay_us(compiled)
        else:
            rounds = {name: [] for name in variants}
            for _ in range(args.rounds):  # alternate, one round each
                for name, variant in variants.items():
                    rounds[name].append(cpu_ms(lambda v=variant: sample(logits, tensors, words=words, **v), args.iters))
            for name, times in rounds.items():
                row[f"{name}_ms"], row[f"{name}_round_ms"] = statistics.median(times), times
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("round_ms")}), flush=True)
        rows.append(row)
    if args.save:
        save_rows(args.save, f"sampler-variants-{args.device}.json", rows, threads=torch.get_num_threads())


if __name__ == "__main__":
    main()
