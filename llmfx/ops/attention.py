"""Paged attention and the KV write, as custom ops so that torch.compile(fullgraph=True) traces them.

The implementations here are the reference: they gather a sequence's pages and run masked attention
in float32, the oracle every fused GPU kernel is tested against. The attention reference reads
sequence lengths on the host, so it runs on CPU only: on CUDA the Triton kernels serve the op, and
without them a step fails loudly instead of synchronizing the device on every layer.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("llmfx::write_kv", mutates_args=("k_pages", "v_pages"))
def write_kv(k_pages: Tensor, v_pages: Tensor, k: Tensor, v: Tensor, slot_mapping: Tensor) -> None:
    """Scatter k, v [T, K, D] into the pools [P, S, K, D] (any strides) at slot_mapping [T] (page * S + offset).

    Slot -1 means padding and lands in the null page 0, whose contents are never read unmasked.
    """
    page_size = k_pages.shape[1]
    slots = slot_mapping.clamp_min(0).long()
    pages, offsets = slots // page_size, slots % page_size
    k_pages.index_put_((pages, offsets), k.to(k_pages.dtype))
    v_pages.index_put_((pages, offsets), v.to(v_pages.dtype))


@write_kv.register_fake
def _(k_pages: Tensor, v_pages: Tensor, k: Tensor, v: Tensor, slot_mapping: Tensor) -> None:
    return None


@torch.library.custom_op("llmfx::paged_attention", mutates_args=())
def paged_attention(
    q: Tensor,
    k_pages: Tensor,
    v_pages: Tensor,
    page_table: Tensor,
    query_start_loc: Tensor,
    seq_lens: Tensor,
    scale: float,
    sliding_window: int,
) -> Tensor:
    """Causal attention of packed queries q [T, H, D] over paged K/V [P, S, K, D].

    Sequence b owns query rows query_start_loc[b]:query_start_loc[b+1] (int32 [B+1]); its context
    is seq_lens[b] tokens (int32 [B]) on pages page_table[b] (int32 [B, max_pages]), the queries
    being its last tokens. sliding_window > 0 limits each query to that many most recent keys.
    Rows past query_start_loc[B] are padding and come back as zeros.
    """
    if q.device.type != "cpu":
        raise RuntimeError(f"llmfx::paged_attention has no {q.device.type} kernel: the reference reads lengths on "
                           "the host (a device sync per layer); on CUDA the Triton kernels serve it: install triton")
    out = torch.zeros_like(q)
    page_size = k_pages.shape[1]
    group = q.shape[1] // k_pages.shape[2]
    starts = query_start_loc.tolist()  # CPU tensors: reading them syncs nothing
    lens = seq_lens.tolist()
    for b, context_len in enumerate(lens):
        start, end = starts[b], starts[b + 1]
        if end == start:
            continue
        pages = page_table[b, : -(-context_len // page_size)].long()
        k = k_pages[pages].flatten(0, 1)[:context_len].float()  # [L, K, D]
        v = v_pages[pages].flatten(0, 1)[:context_len].float()
        k = k.repeat_interleave(group, dim=1).transpose(0, 1)  # [H, L, D]
        v = v.repeat_interleave(group, dim=1).transpose(0, 1)
        query = q[start:end].float().transpose(0, 1)  # [H, Tq, D]
        q_pos = torch.arange(context_len - (end - start), context_len, device=q.device)[:, None]
        k_pos = torch.arange(context_len, device=q.device)[None, :]
        allowed = k_pos <= q_pos
        if sliding_window > 0:
            allowed &= k_pos > q_pos - sliding_window
        scores = (query @ k.transpose(1, 2)) * scale  # [H, Tq, L]
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[start:end] = (scores.softmax(-1) @ v).transpose(0, 1).to(q.dtype)
    return out


@paged_attention.register_fake
def _(q, k_pages, v_pages, page_table, query_start_loc, seq_lens, scale, sliding_window):
    return torch.empty_like(q)
