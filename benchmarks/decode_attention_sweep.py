"""Launch settings of the split-KV decode kernel, swept on the GPU: microseconds and KV bandwidth per setting.

    python benchmarks/decode_attention_sweep.py --save benchmarks/results     # on the H200

One layer of the TinyLlama shape (32 heads, 4 KV heads, head_dim 64, page 16, bf16), every sequence
decoding one token, lengths drawn uniformly from each --lengths range, pages scattered over the pool as
a served batch's are. For each setting the output must first equal the shipped setting's (the one
llmfx.ops.triton_attention._tuning picks for that batch size) within bf16 rounding; then the call is
captured in a CUDA graph after a read of 256 MB (the L2 starts cold, as after a layer's GEMMs), and the
read's own time is subtracted. Bandwidth counts the K and V bytes the batch must read once.
"""

import argparse
import itertools
import json
from pathlib import Path

import torch

from llmfx.bench import H200_COPY_BYTES_PER_S, ColdL2Timer, parse_ints, save_rows
from llmfx.ops.triton_attention import DECODE_MAX_SPLITS, DECODE_MIN_SPLIT, _tuning, paged_attention_decode


def parse_ranges(text: str) -> tuple[tuple[int, int], ...]:
    return tuple(tuple(int(x) for x in r.split("-")) for r in text.split(","))


def parse_splits(text: str) -> tuple[tuple[int, int], ...]:
    """'256x32,512x1' -> ((min_split, max_splits), ...)."""
    return tuple(tuple(int(x) for x in s.split("x")) for s in text.split(","))


def shipped_setting(batch: int) -> dict:
    """What triton_paged_attention launches for a bf16 decode batch of this size."""
    return {"min_split": DECODE_MIN_SPLIT, "max_splits": DECODE_MAX_SPLITS, **_tuning(torch.bfloat16, 64, batch)[1]}


def settings(args):
    """The settings to try."""
    for block_n, warps, stages, (min_split, max_splits), prefetch in itertools.product(
            args.block_n, args.num_warps, args.num_stages, args.splits, args.prefetch_kv):
        if min_split % block_n == 0:
            yield dict(block_n=block_n, num_warps=warps, num_stages=stages, min_split=min_split, max_splits=max_splits,
                       prefetch_kv=bool(prefetch))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=parse_ints, default=(1, 8, 32, 64, 128, 256))
    p.add_argument("--lengths", type=parse_ranges, default=((100, 600), (1000, 2000), (100, 2000)))
    p.add_argument("--block-n", type=parse_ints, default=(32, 64))
    p.add_argument("--num-warps", type=parse_ints, default=(4,))
    p.add_argument("--num-stages", type=parse_ints, default=(2, 3))
    p.add_argument("--splits", type=parse_splits,
                   default=parse_splits("64x32,128x32,256x32,512x32,1024x32,128x1,128x2,128x4,128x8"))
    p.add_argument("--prefetch-kv", type=parse_ints, default=(0, 1),
                   help="0 and/or 1: the L2 prefetch before the PDL wait (timed alone, no prior kernel hides it)")
    p.add_argument("--layout", choices=("hnd", "nhd"), default="hnd",
                   help="page memory order: head-major as KVPool stores it, or token-major (before session 12)")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--save", type=Path, default=None)
    args = p.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    heads, kv_heads, head_dim, page = 32, 4, 64, 16
    cold_us = ColdL2Timer(device, args.iters)  # a read, not b3801b4's write (whose write-back the timed kernel met)
    trials = list(settings(args))
    rows = []
    for batch, (low, high) in itertools.product(args.batches, args.lengths):
        gen = torch.Generator(device=device).manual_seed(batch * 7919 + low)
        lens = torch.randint(low, high + 1, (batch,), device=device, generator=gen, dtype=torch.int32)
        per_seq = -(-high // page)
        num_pages = 1 + batch * per_seq
        # The kernel takes [P, S, K, D] by strides; "hnd" stores each KV head's slice of a page contiguously.
        dims = (num_pages, page, kv_heads, head_dim) if args.layout == "nhd" else (num_pages, kv_heads, page, head_dim)
        k_pages, v_pages = (torch.randn(dims, device=device, dtype=dtype, generator=gen) for _ in range(2))
        if args.layout == "hnd":
            k_pages, v_pages = k_pages.transpose(1, 2), v_pages.transpose(1, 2)
        table = (1 + torch.randperm(num_pages - 1, device=device, generator=gen)).view(batch, per_seq).int()
        q = torch.randn(batch, heads, head_dim, device=device, dtype=dtype, generator=gen)
        qsl = torch.arange(batch + 1, device=device, dtype=torch.int32)
        kv_bytes = 2 * int(lens.sum()) * kv_heads * head_dim * dtype.itemsize
        run_args = (q, k_pages, v_pages, table, qsl, lens, head_dim ** -0.5, 0)
        shipped = shipped_setting(batch)
        reference = paged_attention_decode(*run_args, **shipped)
        for setting in trials:
            row = {"batch": batch, "lengths": f"{low}-{high}", "layout": args.layout, **setting,
                   "shipped": setting == shipped}
            try:
                out = torch.empty_like(q)
                paged_attention_decode(*run_args, **setting, out=out)
                torch.testing.assert_close(out, reference, rtol=2e-2, atol=2e-2)
                row["us"] = cold_us(lambda: paged_attention_decode(*run_args, **setting, out=out))
                row["copy_bandwidth_fraction"] = kv_bytes / (row["us"] * 1e-6) / H200_COPY_BYTES_PER_S
            except Exception as err:  # noqa: BLE001 -- a setting that does not compile or fit is a result too
                row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
            print(json.dumps(row), flush=True)
            rows.append(row)
    summary = []
    for batch in args.batches:
        # A setting's score: its mean time over the length ranges (each range's batch is one served step).
        scores = {}
        for setting in trials:
            times = [r["us"] for r in rows if r["batch"] == batch and all(r[k] == v for k, v in setting.items())
                     and "us" in r]
            if len(times) == len(args.lengths):
                scores[json.dumps(setting, sort_keys=True)] = sum(times) / len(times)
        ranked = sorted(scores.items(), key=lambda kv: kv[1])
        line = {"batch": batch, "shipped_us": scores.get(json.dumps(shipped_setting(batch), sort_keys=True)),
                "best": [(json.loads(k), v) for k, v in ranked[:5]]}
        print(json.dumps(line), flush=True)
        summary.append(line)
    if args.save:
        save_rows(args.save, "decode-attention-sweep.json", rows, summary=summary, flush_us=cold_us.flush_us)


if __name__ == "__main__":
    main()
