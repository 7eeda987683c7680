"""Launch settings of the split-KV decode kernel, swept on the GPU: microseconds and KV bandwidth per setting.

    python benchmarks/decode_attention_sweep.py --save benchmarks/results     # on the H200

One layer of the TinyLlama shape (32 heads, 4 KV heads, head_dim 64, page 16, bf16), every
sequence decoding at --context, pages scattered over the pool as a served batch's are. For each
(block_n, num_warps, num_stages, min_split) the kernel must first give the output of the shipped
setting (llmfx.ops.triton_attention._tuning) within bf16 rounding; then it is captured in a CUDA
graph and replayed, so launch overhead is out of the figures. Bandwidth counts the K and V bytes
the batch must read once, so 100% of the copy bandwidth would be the floor.
"""

import argparse
import itertools
import json
from pathlib import Path

import torch

from llmfx.bench import H200_COPY_BYTES_PER_S, graph_replay_us, save_rows
from llmfx.ops.triton_attention import _tuning, paged_attention_decode


def parse_ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=parse_ints, default=(256, 64, 1))
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--block-n", type=parse_ints, default=(32, 64, 128))
    p.add_argument("--num-warps", type=parse_ints, default=(2, 4, 8))
    p.add_argument("--num-stages", type=parse_ints, default=(2, 3, 4))
    p.add_argument("--min-split", type=parse_ints, default=(256, 512, 1024))
    p.add_argument("--save", type=Path, default=None)
    args = p.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    heads, kv_heads, head_dim, page = 32, 4, 64, 16
    shipped = _tuning(dtype, head_dim)[1]
    rows = []
    for batch in args.batches:
        gen = torch.Generator(device=device).manual_seed(batch)
        per_seq = -(-(args.context + 1) // page)
        num_pages = 1 + batch * per_seq
        k_pages = torch.randn(num_pages, page, kv_heads, head_dim, device=device, dtype=dtype, generator=gen)
        v_pages = torch.randn(num_pages, page, kv_heads, head_dim, device=device, dtype=dtype, generator=gen)
        table = (1 + torch.randperm(num_pages - 1, device=device, generator=gen)).view(batch, per_seq).int()
        q = torch.randn(batch, heads, head_dim, device=device, dtype=dtype, generator=gen)
        qsl = torch.arange(batch + 1, device=device, dtype=torch.int32)
        lens = torch.full((batch,), args.context + 1, device=device, dtype=torch.int32)
        kv_bytes = 2 * batch * (args.context + 1) * kv_heads * head_dim * dtype.itemsize
        run_args = (q, k_pages, v_pages, table, qsl, lens, head_dim ** -0.5, 0)
        reference = paged_attention_decode(*run_args, **shipped)
        for block_n, warps, stages, min_split in itertools.product(args.block_n, args.num_warps, args.num_stages,
                                                                   args.min_split):
            if min_split % block_n:
                continue
            setting = dict(block_n=block_n, num_warps=warps, num_stages=stages, min_split=min_split)
            row = {"batch": batch, "context": args.context, **setting, "shipped": setting == shipped}
            try:
                out = torch.empty_like(q)
                fn = lambda: paged_attention_decode(*run_args, **setting, out=out)  # noqa: E731
                fn()
                torch.testing.assert_close(out, reference, rtol=2e-2, atol=2e-2)
                row["us"], _ = graph_replay_us(fn, iters=100)
                row["copy_bandwidth_fraction"] = kv_bytes / (row["us"] * 1e-6) / H200_COPY_BYTES_PER_S
            except Exception as err:  # noqa: BLE001 -- a setting that does not compile or fit is a result too
                row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
            print(json.dumps(row), flush=True)
            rows.append(row)
    for batch in args.batches:
        timed = sorted((r for r in rows if r["batch"] == batch and "us" in r), key=lambda r: r["us"])
        base = next(r for r in timed if r["shipped"])
        print(f"batch {batch}: shipped {base['us']:.1f} us; best", json.dumps(timed[0]))
    if args.save:
        save_rows(args.save, "decode-attention-sweep.json", rows)


if __name__ == "__main__":
    main()
