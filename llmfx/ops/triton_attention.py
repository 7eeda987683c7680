"""Triton kernels for llmfx::paged_attention on CUDA: a varlen flash kernel and a split-KV decode kernel.

Both read K/V through the page table token by token (any power-of-two page size), pack the query
heads of one KV head group into the rows of a tile (K/V read once per group), take grids from
shapes only and never synchronize with the host, so they replay inside CUDA graphs for any lengths.

Which kernel: `triton_paged_attention` takes the decode kernel when T <= B (the decode buckets have
T == B) and the varlen kernel otherwise. The decode kernel is correct for any n_q per sequence (it
loops over query tiles), so the choice only affects speed: a T == B batch that happens to hold a
2-token chunk next to a padding sequence still gets exact results.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from llmfx.ops.attention import paged_attention
from llmfx.ops.triton_pdl import pdl_launch, wait_for_prior_kernel

_LOG2E = 1.4426950408889634
_NEG = tl.constexpr(-1.0e30)  # finite "minus infinity" for running maxima: exp2(_NEG - _NEG) stays finite

# Decode split-KV: a sequence's key range is cut into at most MAX_SPLITS splits of at least MIN_SPLIT
# tokens. The plan is a function of that sequence alone (its length, query count and window), never of
# the batch: a sequence's result is the same bits at any batch size and next to any neighbours.
# 128 x 8 was within 5% of the best setting for each batch size from 1 to 256 in the session-8 sweep
# (benchmarks/results/2026-11-30-nvidia-h200-decode-attention-sweep.json); settings that won at one
# batch size lost 38-61% at the other end (64-key splits at batch 256, 512-key splits at batch 1). The
# sweep's lengths reach 2000 (TinyLlama's context is 2048); at longer contexts and small batches, 8
# splits may leave SMs idle: not measured.
DECODE_MIN_SPLIT = 128
DECODE_MAX_SPLITS = 8

# (largest batch, num_stages) of the bf16/fp16 decode launch: pipeline depth only moves loads earlier, so
# it may follow the batch size (a static shape of a captured step) without changing any result. 3 stages
# won at batches 1-64, 2 at 128-256 in the same sweep; the bound between is interpolated.
_DECODE_STAGES = ((96, 3), (None, 2))
# Batches up to which the decode kernel prefetches its K/V rows before the PDL wait. Served steps on the H200
# (context 1024): -1.4% at batch 1, -0.3% at 8, but +6.8% at 64 and +15% at 256, where the prefetch's 96 -> 114
# and 80 -> 111 registers cost more programs an SM than the hidden latency saves (benchmarks/README.md, session 19).
_PREFETCH_KV_MAX_SEQS = 8


@triton.jit
def _first_key(first_pos, window, BLOCK_N: tl.constexpr):
    """The first key any query at position >= first_pos may see, rounded down to a BLOCK_N multiple."""
    return tl.where(window > 0, tl.maximum(first_pos - window + 1, 0), 0) // BLOCK_N * BLOCK_N


@triton.jit
def _find_seq(qsl_ptr, pid, num_seqs, BLOCK_Q: tl.constexpr):
    """The largest b in [0, num_seqs] whose first tile index qsl[b] // BLOCK_Q + b is <= pid."""
    left = 0
    right = num_seqs + 1
    while left < right:
        mid = (left + right) // 2
        if tl.load(qsl_ptr + mid) // BLOCK_Q + mid <= pid:
            left = mid + 1
        else:
            right = mid
    return left - 1


@triton.jit
def _attend_tile(acc, m_i, l_i, q, q_pos, lo_bound, kv_lo, kv_hi, seq, kv_head, k_ptr, v_ptr, table_ptr,
                 stride_pt, stride_kp, stride_ks, stride_kh, stride_kd, stride_vp, stride_vs, stride_vh,
                 stride_vd, scale_log2, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr, MASKED: tl.constexpr = True):
    """Online softmax of q [M, D] over keys kv_lo:kv_hi (kv_lo a multiple of BLOCK_N), causal and windowed.

    MASKED=False: the caller vouches that every row may see every key of the range (and that kv_hi - kv_lo
    is a multiple of BLOCK_N), so the loop loads whole blocks and skips the causal and window masks.
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    for start in range(kv_lo, kv_hi, BLOCK_N):
        k_pos = start + offs_n  # [N]
        in_page = k_pos % PAGE_SIZE
        if MASKED:
            k_ok = k_pos < kv_hi
            page = tl.load(table_ptr + seq * stride_pt + k_pos // PAGE_SIZE, mask=k_ok, other=0).to(tl.int64)
            if HEAD_DIM == BLOCK_D:  # a mask constant along D keeps the loads vectorized
                kv_mask = k_ok[:, None]
            else:
                kv_mask = k_ok[:, None] & d_ok[None, :]
            kv_other = 0.0
        else:
            page = tl.load(table_ptr + seq * stride_pt + k_pos // PAGE_SIZE).to(tl.int64)
            kv_mask = None if HEAD_DIM == BLOCK_D else d_ok[None, :]
            kv_other = None if HEAD_DIM == BLOCK_D else 0.0
        k = tl.load(k_ptr + (page * stride_kp + in_page * stride_ks + kv_head * stride_kh)[:, None]
                    + offs_d[None, :] * stride_kd, mask=kv_mask, other=kv_other)  # [N, D]
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        if MASKED:
            allowed = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] > lo_bound[:, None]) & k_ok[None, :]
            qk = tl.where(allowed, qk * scale_log2, float("-inf"))  # [M, N], log2 domain
        else:
            qk = qk * scale_log2
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + (page * stride_vp + in_page * stride_vs + kv_head * stride_vh)[:, None]
                    + offs_d[None, :] * stride_vd, mask=kv_mask, other=kv_other)  # [N, D]
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["window"])
def _varlen_kernel(out_ptr, q_ptr, k_ptr, v_ptr, table_ptr, qsl_ptr, lens_ptr, scale_log2, window,
                   num_seqs, num_tokens, stride_qt, stride_qh, stride_qd, stride_ot, stride_oh, stride_od,
                   stride_kp, stride_ks, stride_kh, stride_kd, stride_vp, stride_vs, stride_vh, stride_vd,
                   stride_pt, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, GROUP: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
                   PDL: tl.constexpr):
    """One program: BLOCK_M // GROUP queries of one sequence x the GROUP heads of one KV head."""
    BLOCK_Q: tl.constexpr = BLOCK_M // GROUP
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    # The step's inputs are read before the wait (see triton_pdl): the search is a chain of dependent loads.
    seq = _find_seq(qsl_ptr, pid, num_seqs, BLOCK_Q)
    q_start = tl.load(qsl_ptr + seq)
    n_q = tl.load(qsl_ptr + seq + 1, mask=seq < num_seqs, other=0) - q_start
    seq_len = tl.load(lens_ptr + seq, mask=seq < num_seqs, other=0)
    wait_for_prior_kernel(PDL)
    tile = pid - (q_start // BLOCK_Q + seq)
    rows = tl.arange(0, BLOCK_M)
    q_in_tile = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    if seq == num_seqs:  # past the last sequence: padding rows, written as zeros
        t = q_start + tile * BLOCK_Q + q_in_tile
        ok = (q_in_tile < BLOCK_Q) & (t < num_tokens)
        zeros = tl.zeros([BLOCK_M, BLOCK_D], dtype=out_ptr.dtype.element_ty)
        tl.store(out_ptr + t[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :] * stride_od,
                 zeros, mask=ok[:, None] & d_ok[None, :])
        return
    if tile * BLOCK_Q >= n_q:
        return
    q_local = tile * BLOCK_Q + q_in_tile
    row_ok = (q_in_tile < BLOCK_Q) & (q_local < n_q)
    q_pos = seq_len - n_q + q_local  # [M]
    lo_bound = tl.where(window > 0, q_pos - window, -1)  # keys must be > lo_bound
    t = q_start + q_local
    io_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + t[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=io_mask, other=0.0)
    first_pos = seq_len - n_q + tile * BLOCK_Q
    kv_hi = tl.minimum(first_pos + BLOCK_Q, seq_len)
    kv_lo = _first_key(first_pos, window, BLOCK_N)
    # Whole blocks every row of the tile sees: at or before its first query and, with a window, inside its
    # last query's. They run without masks; the blocks before (window edge) and after (diagonal) with.
    full_lo = tl.where(window > 0, tl.cdiv(tl.maximum(kv_hi - window, 0), BLOCK_N) * BLOCK_N, kv_lo)
    full_lo = tl.minimum(full_lo, kv_hi)
    full_hi = tl.maximum((first_pos + 1) // BLOCK_N * BLOCK_N, full_lo)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], _NEG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for part in tl.static_range(3):
        lo = kv_lo if part == 0 else (full_lo if part == 1 else full_hi)
        hi = full_lo if part == 0 else (full_hi if part == 1 else kv_hi)
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, q_pos, lo_bound, lo, hi, seq, kv_head, k_ptr, v_ptr,
                                     table_ptr, stride_pt, stride_kp, stride_ks, stride_kh, stride_kd, stride_vp,
                                     stride_vs, stride_vh, stride_vd, scale_log2, HEAD_DIM, PAGE_SIZE, BLOCK_N,
                                     BLOCK_D, IEEE, MASKED=part != 1)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + t[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=io_mask)


@triton.jit
def _split_plan(seq_len, n_q, window, MIN_SPLIT: tl.constexpr, MAX_SPLITS: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """(first key, split length, number of splits) of one sequence: a function of that sequence only."""
    kv_lo = _first_key(seq_len - n_q, window, BLOCK_N)
    span = seq_len - kv_lo
    split_len = tl.maximum(tl.cdiv(tl.cdiv(span, MAX_SPLITS), BLOCK_N) * BLOCK_N, MIN_SPLIT)
    return kv_lo, split_len, tl.cdiv(span, split_len)


@triton.jit
def _prefetch_to_l2(ptrs):
    """Ask L2 for the 128-byte line at each of ptrs: no registers held, nothing waited for."""
    return tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton.jit
def _prefetch_kv_rows(lo, hi, seq, kv_head, k_ptr, v_ptr, table_ptr, stride_pt, stride_kp, stride_ks, stride_kh,
                      stride_vp, stride_vs, stride_vh, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """Prefetch into L2 the K and V rows (one KV head) of keys lo:hi, looking their pages up in the table.

    Called before the PDL wait, so the rows' DRAM latency overlaps the prior kernel. The rows of this step's
    own tokens may be prefetched before rope_write_kv stores them: stores land in L2, so the loads after the
    wait still read the new values.
    """
    LINE: tl.constexpr = 128 // (k_ptr.dtype.element_ty.primitive_bitwidth // 8)  # elements a 128-byte line
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        k_pos = tl.minimum(start + offs_n, hi - 1)
        page = tl.load(table_ptr + seq * stride_pt + k_pos // PAGE_SIZE).to(tl.int64)
        in_page = k_pos % PAGE_SIZE
        k_row = k_ptr + page * stride_kp + in_page * stride_ks + kv_head * stride_kh
        v_row = v_ptr + page * stride_vp + in_page * stride_vs + kv_head * stride_vh
        for d in tl.static_range(0, HEAD_DIM, LINE):
            _prefetch_to_l2(k_row + d)
            _prefetch_to_l2(v_row + d)


@triton.jit(do_not_specialize=["window"])
def _decode_kernel(out_ptr, part_acc_ptr, part_ml_ptr, q_ptr, k_ptr, v_ptr, table_ptr, qsl_ptr, lens_ptr,
                   scale_log2, window, stride_qt, stride_qh, stride_qd, stride_ot, stride_oh, stride_od,
                   stride_kp, stride_ks, stride_kh, stride_kd, stride_vp, stride_vs, stride_vh, stride_vd,
                   stride_pt, stride_at, stride_as, stride_ah, stride_mt, stride_ms,
                   HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, GROUP: tl.constexpr,
                   MIN_SPLIT: tl.constexpr, MAX_SPLITS: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
                   PREFETCH_KV: tl.constexpr):
    """One program: one split of one sequence's keys x all GROUP heads of one KV head, every query."""
    BLOCK_Q: tl.constexpr = BLOCK_M // GROUP
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    # Until the wait: the step's inputs only (see triton_pdl), and at small batches the split's K/V rows into L2.
    q_start = tl.load(qsl_ptr + seq)
    n_q = tl.load(qsl_ptr + seq + 1) - q_start
    seq_len = tl.load(lens_ptr + seq)
    kv_lo, split_len, num_splits = _split_plan(seq_len, n_q, window, MIN_SPLIT, MAX_SPLITS, BLOCK_N)
    split_lo = kv_lo + split * split_len
    split_hi = tl.minimum(split_lo + split_len, seq_len)
    if PREFETCH_KV:
        if (n_q > 0) & (split < num_splits):
            _prefetch_kv_rows(split_lo, split_hi, seq, kv_head, k_ptr, v_ptr, table_ptr, stride_pt, stride_kp,
                              stride_ks, stride_kh, stride_vp, stride_vs, stride_vh, HEAD_DIM, PAGE_SIZE, BLOCK_N)
    wait_for_prior_kernel(PDL)
    if (n_q <= 0) | (split >= num_splits):
        return
    rows = tl.arange(0, BLOCK_M)
    q_in_tile = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    for tile_start in range(0, n_q, BLOCK_Q):  # one iteration for decode rows
        q_local = tile_start + q_in_tile
        row_ok = (q_in_tile < BLOCK_Q) & (q_local < n_q)
        q_pos = seq_len - n_q + q_local
        lo_bound = tl.where(window > 0, q_pos - window, -1)
        t = q_start + q_local
        io_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_ptr + t[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                    mask=io_mask, other=0.0)
        first_pos = seq_len - n_q + tile_start
        lo = tl.maximum(split_lo, _first_key(first_pos, window, BLOCK_N))
        hi = tl.minimum(split_hi, first_pos + BLOCK_Q)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], _NEG, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, q_pos, lo_bound, lo, hi, seq, kv_head, k_ptr, v_ptr,
                                     table_ptr, stride_pt, stride_kp, stride_ks, stride_kh, stride_kd,
                                     stride_vp, stride_vs, stride_vh, stride_vd, scale_log2, HEAD_DIM,
                                     PAGE_SIZE, BLOCK_N, BLOCK_D, IEEE)
        if num_splits == 1:  # the whole answer: skip the partials
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(out_ptr + t[:, None] * stride_ot + head[:, None] * stride_oh
                     + offs_d[None, :] * stride_od, out.to(out_ptr.dtype.element_ty), mask=io_mask)
        else:
            tl.store(part_acc_ptr + t[:, None] * stride_at + split * stride_as + head[:, None] * stride_ah
                     + offs_d[None, :], acc, mask=io_mask)
            ml = part_ml_ptr + t * stride_mt + split * stride_ms + head * 2
            tl.store(ml, m_i, mask=row_ok)
            tl.store(ml + 1, l_i, mask=row_ok)


@triton.jit(do_not_specialize=["window"])
def _decode_reduce_kernel(out_ptr, part_acc_ptr, part_ml_ptr, qsl_ptr, lens_ptr, window, num_seqs,
                          num_tokens, stride_ot, stride_oh, stride_od, stride_at, stride_as, stride_ah,
                          stride_mt, stride_ms, HEAD_DIM: tl.constexpr, GROUP: tl.constexpr,
                          GROUP_PAD: tl.constexpr, MIN_SPLIT: tl.constexpr, MAX_SPLITS: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    """Merge the (max, sum, acc) partials of one sequence's splits; also zero padding row `seq`."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    g = tl.arange(0, GROUP_PAD)
    head = kv_head * GROUP + g
    offs_d = tl.arange(0, BLOCK_D)
    mask = (g < GROUP)[:, None] & (offs_d < HEAD_DIM)[None, :]
    out_offs = head[:, None] * stride_oh + offs_d[None, :] * stride_od
    padding = (seq >= tl.load(qsl_ptr + num_seqs)) & (seq < num_tokens)  # step inputs: read before the wait
    q_start = tl.load(qsl_ptr + seq)
    q_end = tl.load(qsl_ptr + seq + 1)
    seq_len = tl.load(lens_ptr + seq)
    kv_lo, split_len, num_splits = _split_plan(seq_len, q_end - q_start, window, MIN_SPLIT, MAX_SPLITS,
                                               BLOCK_N)
    wait_for_prior_kernel(PDL)
    # Decode runs with T <= B, so every padding row index t in [qsl[B], T) is some program's seq.
    if padding:
        zeros = tl.zeros([GROUP_PAD, BLOCK_D], dtype=out_ptr.dtype.element_ty)
        tl.store(out_ptr + seq * stride_ot + out_offs, zeros, mask=mask)
    if num_splits <= 1:
        return
    for t in range(q_start, q_end):
        m_tot = tl.full([GROUP_PAD], _NEG, dtype=tl.float32)
        l_tot = tl.zeros([GROUP_PAD], dtype=tl.float32)
        acc = tl.zeros([GROUP_PAD, BLOCK_D], dtype=tl.float32)
        for s in range(0, num_splits):
            ml = part_ml_ptr + t * stride_mt + s * stride_ms + head * 2
            m_s = tl.load(ml, mask=g < GROUP, other=_NEG)
            l_s = tl.load(ml + 1, mask=g < GROUP, other=0.0)
            acc_s = tl.load(part_acc_ptr + t * stride_at + s * stride_as + head[:, None] * stride_ah
                            + offs_d[None, :], mask=mask, other=0.0)
            m_new = tl.maximum(m_tot, m_s)
            alpha = tl.exp2(m_tot - m_new)
            beta = tl.exp2(m_s - m_new)
            l_tot = l_tot * alpha + l_s * beta
            acc = acc * alpha[:, None] + acc_s * beta[:, None]
            m_tot = m_new
        out = acc / tl.where(l_tot > 0, l_tot, 1.0)[:, None]
        tl.store(out_ptr + t * stride_ot + out_offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _blocks(head_dim: int, group: int, block_m: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_D): rows hold at least one query's whole head group; dot needs dims >= 16."""
    return max(block_m, triton.next_power_of_2(group)), max(16, triton.next_power_of_2(head_dim))


def _check(q: Tensor, k_pages: Tensor) -> None:
    page_size, kv_heads, head_dim = k_pages.shape[1:]
    assert q.shape[2] == head_dim and q.shape[1] % kv_heads == 0, "q [T, H, D] must match pages [P, S, K, D]"
    assert page_size & (page_size - 1) == 0, "page size must be a power of two"


def paged_attention_varlen(q: Tensor, k_pages: Tensor, v_pages: Tensor, page_table: Tensor,
                           query_start_loc: Tensor, seq_lens: Tensor, scale: float, sliding_window: int, *,
                           block_m: int = 64, block_n: int = 64, num_warps: int = 4, num_stages: int = 2,
                           out: Tensor | None = None) -> Tensor:
    """llmfx::paged_attention for any batch (prefill chunks, cached prefixes, mixed decode rows): [T, H, D]."""
    _check(q, k_pages)
    (tokens, heads, head_dim), (_, page_size, kv_heads, _) = q.shape, k_pages.shape
    num_seqs, group = seq_lens.shape[0], heads // kv_heads
    out = torch.empty_like(q) if out is None else out  # every element gets written
    if tokens == 0:
        return out
    block_m, block_d = _blocks(head_dim, group, block_m)
    block_q = block_m // group
    grid = (triton.cdiv(tokens, block_q) + num_seqs, kv_heads)  # tiles of every sequence, then padding
    _varlen_kernel[grid](
        out, q, k_pages, v_pages, page_table, query_start_loc, seq_lens, scale * _LOG2E, sliding_window,
        num_seqs, tokens, *q.stride(), *out.stride(), *k_pages.stride(), *v_pages.stride(), page_table.stride(0),
        HEAD_DIM=head_dim, PAGE_SIZE=page_size, GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        IEEE=q.dtype == torch.float32, num_warps=num_warps, num_stages=num_stages, **pdl_launch(q.device))
    return out


def paged_attention_decode(q: Tensor, k_pages: Tensor, v_pages: Tensor, page_table: Tensor,
                           query_start_loc: Tensor, seq_lens: Tensor, scale: float, sliding_window: int, *,
                           min_split: int = DECODE_MIN_SPLIT, max_splits: int = DECODE_MAX_SPLITS,
                           block_n: int = 64, num_warps: int = 4, num_stages: int = 2, prefetch_kv: bool = False,
                           out: Tensor | None = None) -> Tensor:
    """llmfx::paged_attention, split-KV, for T <= B (decode): exact for any n_q, fast for n_q <= 1.

    prefetch_kv: with PDL, each program asks L2 for its split's K and V rows before waiting for the prior
    kernel (see _prefetch_kv_rows); the results are the same bits either way.
    """
    _check(q, k_pages)
    (tokens, heads, head_dim), (_, page_size, kv_heads, _) = q.shape, k_pages.shape
    num_seqs, max_pages, group = page_table.shape[0], page_table.shape[1], heads // kv_heads
    assert tokens <= num_seqs, "the decode kernel zeroes padding rows by sequence index: needs T <= B"
    assert min_split % block_n == 0, "min_split must be a multiple of block_n"
    out = torch.empty_like(q) if out is None else out  # every element gets written
    if tokens == 0:
        return out
    block_m, block_d = _blocks(head_dim, group, 16)
    # An upper bound on any sequence's split count, from shapes: seq_len <= max_pages * S.
    num_splits = max(1, min(max_splits, triton.cdiv(max_pages * page_size, min_split)))
    part_acc = torch.empty(tokens, num_splits, heads, head_dim, dtype=torch.float32, device=q.device)
    part_ml = torch.empty(tokens, num_splits, heads, 2, dtype=torch.float32, device=q.device)  # (max, sum)
    meta = dict(HEAD_DIM=head_dim, GROUP=group, MIN_SPLIT=min_split, MAX_SPLITS=max_splits, BLOCK_N=block_n,
                BLOCK_D=block_d, **pdl_launch(q.device))
    _decode_kernel[(num_seqs, kv_heads, num_splits)](
        out, part_acc, part_ml, q, k_pages, v_pages, page_table, query_start_loc, seq_lens, scale * _LOG2E,
        sliding_window, *q.stride(), *out.stride(), *k_pages.stride(), *v_pages.stride(), page_table.stride(0),
        *part_acc.stride()[:3], *part_ml.stride()[:2], PAGE_SIZE=page_size, BLOCK_M=block_m,
        IEEE=q.dtype == torch.float32, PREFETCH_KV=prefetch_kv and meta["PDL"], num_warps=num_warps,
        num_stages=num_stages, **meta)
    _decode_reduce_kernel[(num_seqs, kv_heads)](
        out, part_acc, part_ml, query_start_loc, seq_lens, sliding_window, num_seqs, tokens, *out.stride(),
        *part_acc.stride()[:3], *part_ml.stride()[:2], GROUP_PAD=triton.next_power_of_2(group), num_warps=4,
        **meta)
    return out


def _decode_stages(num_seqs: int) -> int:
    """num_stages of a bf16/fp16 decode launch over num_seqs sequences."""
    return next(stages for most, stages in _DECODE_STAGES if most is None or num_seqs <= most)


def _tuning(dtype: torch.dtype, head_dim: int, num_seqs: int) -> tuple[dict, dict]:
    """(varlen, decode) launch settings: no register spills (ptxas, sm_90), picked on an H200.

    fp32 (parity tests only) lowers dot to FMAs: small tiles. Only the decode pipeline depth and its K/V
    prefetch follow the batch size (neither changes a result); the split plan never does.
    """
    if dtype == torch.float32:
        return dict(block_m=32, block_n=32, num_warps=8, num_stages=1), dict(block_n=32, num_warps=4, num_stages=1)
    if head_dim > 128:
        return dict(block_m=64, block_n=32, num_warps=8), dict(block_n=32, num_warps=4)
    decode = dict(block_n=64, num_warps=4, num_stages=_decode_stages(num_seqs),
                  prefetch_kv=num_seqs <= _PREFETCH_KV_MAX_SEQS)
    if head_dim > 64:
        return dict(block_m=64, block_n=32, num_warps=4), decode
    # Best of 54 settings over one prefill step of the offline workload (varlen_attention_sweep.py, H200:
    # 121.0 us a layer; 2 stages 129.2; results/2026-11-30-nvidia-h200-varlen-attention-sweep.json).
    return dict(block_m=128, block_n=64, num_warps=8, num_stages=1), decode


def triton_paged_attention(q: Tensor, k_pages: Tensor, v_pages: Tensor, page_table: Tensor,
                           query_start_loc: Tensor, seq_lens: Tensor, scale: float, sliding_window: int) -> Tensor:
    """llmfx::paged_attention in Triton: split-KV decode when T <= B (a shape test), else varlen."""
    args = (q, k_pages, v_pages, page_table, query_start_loc, seq_lens, scale, sliding_window)
    varlen, decode = _tuning(q.dtype, q.shape[2], seq_lens.shape[0])
    if q.shape[0] <= seq_lens.shape[0]:
        return paged_attention_decode(*args, **decode)
    return paged_attention_varlen(*args, **varlen)


paged_attention.register_kernel("cuda")(triton_paged_attention)
