"""Device time of the sampler's top-20 (ties lower id first) for batches that skip the filters' sort (GPU).

    python benchmarks/top_ranked.py --save benchmarks/results

Three ways to get the first 20 of a stable descending sort of each row, each compiled (inductor,
fullgraph) and replayed as a CUDA graph: `sort` sorts the row (what the filtering sampler does
anyway), `float_topk` takes the k-th value from a float topk and then makes the exact choice among
ties, and `shipped` is llmfx.sampler.top_ranked (torch.topk on an int64 key of value and id). Rows
are logits rounded to bf16, so ties are as common as in served logits; every variant must equal
`sort` before it is timed.
"""

import argparse
import json
from pathlib import Path

import torch

from llmfx.bench import graph_replay_us, save_rows
from llmfx.sampler import TOP_LOGPROBS, cumsum_rows, top_ranked


def by_sort(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    top, ids = values.sort(dim=-1, descending=True, stable=True)
    return top[:, :k], ids[:, :k]


def by_float_topk(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """topk for the k-th value, then every value above it and the lowest ids equal to it, ranked by a small sort."""
    vocab = values.shape[1]
    kth = values.topk(k, dim=-1).values[:, -1:]
    above, tied = values > kth, values == kth
    wanted = k - above.sum(dim=-1, keepdim=True)
    chosen = above | (tied & (cumsum_rows(tied.int()) <= wanted))
    column = torch.where(chosen, cumsum_rows(chosen.int()) - 1, k).long()
    ids = torch.arange(vocab, device=values.device).expand_as(values)
    chosen_ids = values.new_zeros(values.shape[0], k + 1, dtype=torch.int64).scatter(1, column, ids)[:, :k]
    top_values, order = values.gather(1, chosen_ids).sort(dim=-1, descending=True, stable=True)
    return top_values, chosen_ids.gather(1, order)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,8,64,256")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--save", type=Path, default=None)
    args = p.parse_args()
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        gen = torch.Generator(device="cuda").manual_seed(batch)
        values = (torch.randn(batch, args.vocab, device="cuda", generator=gen) * 3).bfloat16().float()
        expected = by_sort(values, TOP_LOGPROBS)
        row = {"batch": batch, "vocab": args.vocab}
        for name, fn in (("sort", by_sort), ("float_topk", by_float_topk), ("shipped", top_ranked)):
            compiled = torch.compile(fn, fullgraph=True, dynamic=False)
            got = compiled(values, TOP_LOGPROBS)
            assert all(torch.equal(g, e) for g, e in zip(got, expected)), f"{name} differs from the stable sort"
            row[f"{name}_us"], _ = graph_replay_us(lambda: compiled(values, TOP_LOGPROBS))  # noqa: B023
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.save:
        save_rows(args.save, "top-ranked.json", rows)


if __name__ == "__main__":
    main()
