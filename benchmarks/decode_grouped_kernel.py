"""Candidate split-KV decode kernel: one program reads every KV head of one split (3-D tiles), for A/B on the GPU.

The shipped kernel (llmfx.ops.triton_attention._decode_kernel) gives each KV head its own program, so a
token's K row is read as KV_HEADS separate 128-byte pieces by different programs. Here one program loads
[KV_HEADS, BLOCK_N, D] tiles (a token's heads are contiguous in the page: 512 bytes for TinyLlama), looks
each key's page up once for all heads, and runs the per-head products as one batched tl.dot. Partials and
the reduce kernel are the shipped ones.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from llmfx.ops.triton_attention import _LOG2E, _NEG, _check, _decode_reduce_kernel, _first_key, _split_plan


@triton.jit(do_not_specialize=["window"])
def _decode_grouped_kernel(out_ptr, part_acc_ptr, part_ml_ptr, q_ptr, k_ptr, v_ptr, table_ptr, qsl_ptr, lens_ptr,
                           scale_log2, window, stride_qt, stride_qh, stride_qd, stride_ot, stride_oh, stride_od,
                           stride_kp, stride_ks, stride_kh, stride_kd, stride_vp, stride_vs, stride_vh, stride_vd,
                           stride_pt, stride_at, stride_as, stride_ah, stride_mt, stride_ms,
                           HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, GROUP: tl.constexpr,
                           KV_HEADS: tl.constexpr, BLOCK_H: tl.constexpr, MIN_SPLIT: tl.constexpr,
                           MAX_SPLITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_D: tl.constexpr, SPLIT_FIRST: tl.constexpr):
    """One program: one split of one sequence's keys x every query head, every query."""
    BLOCK_Q: tl.constexpr = BLOCK_M // GROUP
    if SPLIT_FIRST:
        split = tl.program_id(0)
        seq = tl.program_id(1)
    else:
        seq = tl.program_id(0)
        split = tl.program_id(1)
    q_start = tl.load(qsl_ptr + seq)
    n_q = tl.load(qsl_ptr + seq + 1) - q_start
    seq_len = tl.load(lens_ptr + seq)
    kv_lo, split_len, num_splits = _split_plan(seq_len, n_q, window, MIN_SPLIT, MAX_SPLITS, BLOCK_N)
    if (n_q <= 0) | (split >= num_splits):
        return
    split_lo = kv_lo + split * split_len
    split_hi = tl.minimum(split_lo + split_len, seq_len)
    h = tl.arange(0, BLOCK_H)
    rows = tl.arange(0, BLOCK_M)
    q_in_tile = rows // GROUP
    head = h[:, None] * GROUP + (rows % GROUP)[None, :]  # [H, M]
    h_ok = h < KV_HEADS
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    for tile_start in range(0, n_q, BLOCK_Q):  # one iteration for decode rows
        q_local = tile_start + q_in_tile
        row_ok = (q_in_tile < BLOCK_Q) & (q_local < n_q)
        q_pos = seq_len - n_q + q_local
        lo_bound = tl.where(window > 0, q_pos - window, -1)
        t = q_start + q_local
        io_mask = h_ok[:, None, None] & row_ok[None, :, None] & d_ok[None, None, :]
        q = tl.load(q_ptr + t[None, :, None] * stride_qt + head[:, :, None] * stride_qh
                    + offs_d[None, None, :] * stride_qd, mask=io_mask, other=0.0)  # [H, M, D]
        first_pos = seq_len - n_q + tile_start
        lo = tl.maximum(split_lo, _first_key(first_pos, window, BLOCK_N))
        hi = tl.minimum(split_hi, first_pos + BLOCK_Q)
        acc = tl.zeros([BLOCK_H, BLOCK_M, BLOCK_D], dtype=tl.float32)
        m_i = tl.full([BLOCK_H, BLOCK_M], _NEG, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_H, BLOCK_M], dtype=tl.float32)
        for start in range(lo, hi, BLOCK_N):
            k_pos = start + offs_n
            k_ok = k_pos < hi
            page = tl.load(table_ptr + seq * stride_pt + k_pos // PAGE_SIZE, mask=k_ok, other=0).to(tl.int64)
            in_page = k_pos % PAGE_SIZE
            kv_mask = h_ok[:, None, None] & k_ok[None, :, None] & d_ok[None, None, :]
            k = tl.load(k_ptr + (page * stride_kp + in_page * stride_ks)[None, :, None]
                        + h[:, None, None] * stride_kh + offs_d[None, None, :] * stride_kd,
                        mask=kv_mask, other=0.0)  # [H, N, D]
            qk = tl.dot(q, tl.permute(k, (0, 2, 1)))  # [H, M, N]
            allowed = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] > lo_bound[:, None]) & k_ok[None, :]
            qk = tl.where(allowed[None, :, :], qk * scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 2))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, :, None])
            l_i = l_i * alpha + tl.sum(p, 2)
            v = tl.load(v_ptr + (page * stride_vp + in_page * stride_vs)[None, :, None]
                        + h[:, None, None] * stride_vh + offs_d[None, None, :] * stride_vd,
                        mask=kv_mask, other=0.0)  # [H, N, D]
            acc = acc * alpha[:, :, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        if num_splits == 1:
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, :, None]
            tl.store(out_ptr + t[None, :, None] * stride_ot + head[:, :, None] * stride_oh
                     + offs_d[None, None, :] * stride_od, out.to(out_ptr.dtype.element_ty), mask=io_mask)
        else:
            tl.store(part_acc_ptr + t[None, :, None] * stride_at + split * stride_as + head[:, :, None] * stride_ah
                     + offs_d[None, None, :], acc, mask=io_mask)
            ml = part_ml_ptr + t[None, :] * stride_mt + split * stride_ms + head * 2
            ml_mask = h_ok[:, None] & row_ok[None, :]
            tl.store(ml, m_i, mask=ml_mask)
            tl.store(ml + 1, l_i, mask=ml_mask)


def paged_attention_decode_grouped(q: Tensor, k_pages: Tensor, v_pages: Tensor, page_table: Tensor,
                                   query_start_loc: Tensor, seq_lens: Tensor, scale: float, sliding_window: int, *,
                                   min_split: int = 256, max_splits: int = 32, block_n: int = 32,
                                   num_warps: int = 4, num_stages: int = 2, split_first: bool = False,
                                   out: Tensor | None = None) -> Tensor:
    """llmfx::paged_attention for T <= B, one program per (sequence, split) over all KV heads."""
    _check(q, k_pages)
    (tokens, heads, head_dim), (_, page_size, kv_heads, _) = q.shape, k_pages.shape
    num_seqs, max_pages, group = page_table.shape[0], page_table.shape[1], heads // kv_heads
    assert tokens <= num_seqs and min_split % block_n == 0
    out = torch.empty_like(q) if out is None else out
    if tokens == 0:
        return out
    block_m, block_d = max(16, triton.next_power_of_2(group)), max(16, triton.next_power_of_2(head_dim))
    num_splits = max(1, min(max_splits, triton.cdiv(max_pages * page_size, min_split)))
    part_acc = torch.empty(tokens, num_splits, heads, head_dim, dtype=torch.float32, device=q.device)
    part_ml = torch.empty(tokens, num_splits, heads, 2, dtype=torch.float32, device=q.device)
    meta = dict(HEAD_DIM=head_dim, GROUP=group, MIN_SPLIT=min_split, MAX_SPLITS=max_splits, BLOCK_N=block_n,
                BLOCK_D=block_d)
    grid = (num_splits, num_seqs) if split_first else (num_seqs, num_splits)
    _decode_grouped_kernel[grid](
        out, part_acc, part_ml, q, k_pages, v_pages, page_table, query_start_loc, seq_lens, scale * _LOG2E,
        sliding_window, *q.stride(), *out.stride(), *k_pages.stride(), *v_pages.stride(), page_table.stride(0),
        *part_acc.stride()[:3], *part_ml.stride()[:2], PAGE_SIZE=page_size, KV_HEADS=kv_heads,
        BLOCK_H=triton.next_power_of_2(kv_heads), BLOCK_M=block_m, SPLIT_FIRST=split_first, num_warps=num_warps,
        num_stages=num_stages, **meta)
    _decode_reduce_kernel[(num_seqs, kv_heads)](
        out, part_acc, part_ml, query_start_loc, seq_lens, sliding_window, num_seqs, tokens, *out.stride(),
        *part_acc.stride()[:3], *part_ml.stride()[:2], GROUP_PAD=triton.next_power_of_2(group), num_warps=4,
        **meta)
    return out
