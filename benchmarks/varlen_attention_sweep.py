"""Launch settings of the varlen (prefill) attention kernel, swept on the GPU: microseconds and TFLOP/s per setting.

    python benchmarks/varlen_attention_sweep.py --save benchmarks/results     # on the H200

One layer of the TinyLlama shape (32 heads, 4 KV heads, head_dim 64, page 16, bf16) over one full prefill
step: the offline workload's first prompts, --tokens in all, each written into pages of its own (head-major,
as KVPool stores them) and attended from position 0. Every setting's output must first equal SDPA's on the
same keys within bf16 rounding; then the call is captured in a CUDA graph and replayed. TFLOP/s counts the
causal work only (QK and PV over the keys each query may see), not the masked halves of diagonal blocks.
"""

import argparse
import dataclasses
import itertools
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from llmfx.bench import graph_replay_us, offline_prefill_lengths, parse_ints, prefill_batch, save_rows
from llmfx.ops.triton_attention import _tuning, paged_attention_varlen
from llmfx.presets import preset


def settings(args):
    """The settings to try: every combination of the lists."""
    for block_m, block_n, warps, stages in itertools.product(args.block_m, args.block_n, args.num_warps,
                                                             args.num_stages):
        yield dict(block_m=block_m, block_n=block_n, num_warps=warps, num_stages=stages)


def prefill_problem(cfg, lengths: list[int], page_size: int, dtype, device, seed: int = 0):
    """paged_attention's arguments (without scale and window) for one layer of cfg over whole prompts of these
    lengths, each on pages of its own (KVPool's layout), q/k/v random."""
    gen = torch.Generator(device=device).manual_seed(seed)
    (layer,), batch = prefill_batch(dataclasses.replace(cfg, num_layers=1), lengths, dtype, device, page_size)
    k_pages, v_pages = layer
    for pages in (k_pages, v_pages):
        pages.copy_(torch.randn(pages.shape, generator=gen, device=device))
    q = torch.randn(sum(lengths), cfg.num_heads, cfg.head_dim, generator=gen, device=device).to(dtype)
    return q, k_pages, v_pages, batch.page_table, batch.query_start_loc, batch.seq_lens


def sdpa_reference(q, k_pages, v_pages, page_table, query_start_loc, seq_lens, scale: float):
    """Causal attention of each whole prompt through torch's SDPA, keys gathered from the pages: [T, H, D]."""
    out = torch.empty_like(q)
    page_size = k_pages.shape[1]
    group = q.shape[1] // k_pages.shape[2]
    for b, n in enumerate(seq_lens.tolist()):
        lo, hi = query_start_loc[b].item(), query_start_loc[b + 1].item()
        pos = torch.arange(n, device=q.device)
        slots = page_table[b, pos // page_size].long(), pos % page_size
        k, v = (pages[slots].repeat_interleave(group, dim=1).transpose(0, 1) for pages in (k_pages, v_pages))
        out[lo:hi] = F.scaled_dot_product_attention(q[lo:hi].transpose(0, 1), k, v, is_causal=True,
                                                    scale=scale).transpose(0, 1)
    return out


def causal_flops(lengths: list[int], heads: int, head_dim: int) -> int:
    """QK and PV multiply-adds (x2) over the keys each query sees: query i of a prompt sees i + 1 keys."""
    return sum(4 * heads * head_dim * n * (n + 1) // 2 for n in lengths)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--block-m", type=parse_ints, default=(64, 128, 256))
    p.add_argument("--block-n", type=parse_ints, default=(32, 64, 128))
    p.add_argument("--num-warps", type=parse_ints, default=(4, 8))
    p.add_argument("--num-stages", type=parse_ints, default=(1, 2, 3))
    p.add_argument("--save", type=Path, default=None)
    args = p.parse_args()
    device = torch.device("cuda")
    cfg = preset("tinyllama-1.1b")
    lengths = offline_prefill_lengths(args.tokens)
    args_ = prefill_problem(cfg, lengths, 16, torch.bfloat16, device)
    scale = cfg.head_dim**-0.5
    expected = sdpa_reference(*args_, scale).float()
    flops = causal_flops(lengths, cfg.num_heads, cfg.head_dim)
    shipped = _tuning(torch.bfloat16, cfg.head_dim, len(lengths))[0]
    rows = []
    for setting in [dict(shipped, num_stages=shipped.get("num_stages", 2)), *settings(args)]:
        run = lambda: paged_attention_varlen(*args_, scale, 0, **setting)  # noqa: E731
        try:
            torch.testing.assert_close(run().float(), expected, rtol=2e-2, atol=2e-2)
            us, _ = graph_replay_us(run, iters=50)
        except Exception as err:  # a setting that does not compile (shared memory) is a row, not the end
            row = {**setting, "error": f"{type(err).__name__}: {str(err)[:120]}"}
        else:
            row = {**setting, "us": round(us, 2), "tflops": round(flops / us / 1e6, 1)}
        row["shipped"] = not rows
        print(json.dumps(row), flush=True)
        rows.append(row)
    timed = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
    print(f"{len(lengths)} prompts, {sum(lengths)} tokens: shipped {rows[0].get('us')} us, best {timed[0]}")
    if args.save:
        save_rows(args.save, "varlen-attention-sweep.json", rows, lengths=lengths, causal_flops=flops)


if __name__ == "__main__":
    main()
