"""Triton kernel for llmfx::rope_write_kv on CUDA: rotary embedding of q and k and the paged K/V write in one pass.

One program per token loads its table row once, rotates every q head and k head in float32 with one
rounding to the output dtype, and stores rotated k and plain v at the token's slot. Rows with slot
-1 (padding) store no k or v, so padding rows never race on the null page. The grid depends only on
T, so the kernel replays inside CUDA graphs for any positions and slots.

Numerics: the float32 table and one rounding make the kernel's result apply_rope(x.float(), ...)
rounded to the output dtype; the reference rotates in x's dtype (cos and sin rounded to bf16, every
product rounded), so in bf16 the two differ by a few ulps, and the kernel is the more accurate one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from llmfx.ops.rope_kv import rope_write_kv
from llmfx.ops.triton_pdl import pdl_launch, wait_for_prior_kernel

# Elements of one half-row tile (heads x D/2) a program rotates at a time: enough to keep loads wide,
# few enough that x1, x2 and both results stay in registers at 4 warps.
_TILE_ELEMENTS = 2048


@triton.jit
def _rotate_heads(src, stride_sh, stride_sd, dst, stride_dh, stride_dd, cos, sin, enabled,
                  NUM_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr,
                  BLOCK_HALF: tl.constexpr):
    """dst[h] = rotate(src[h]) for the NUM_HEADS heads of one token, BLOCK_HEADS at a time; cos, sin [1, BLOCK_HALF]."""
    d = tl.arange(0, BLOCK_HALF)
    for first in tl.static_range(0, NUM_HEADS, BLOCK_HEADS):
        h = first + tl.arange(0, BLOCK_HEADS)
        mask = (h < NUM_HEADS)[:, None] & (d < HALF)[None, :] & enabled
        src_1 = src + h[:, None] * stride_sh + d[None, :] * stride_sd  # [heads, D/2]
        dst_1 = dst + h[:, None] * stride_dh + d[None, :] * stride_dd
        x1 = tl.load(src_1, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src_1 + HALF * stride_sd, mask=mask, other=0.0).to(tl.float32)
        tl.store(dst_1, (x1 * cos - x2 * sin).to(dst.dtype.element_ty), mask=mask)
        tl.store(dst_1 + HALF * stride_dd, (x2 * cos + x1 * sin).to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _copy_heads(src, stride_sh, stride_sd, dst, stride_dh, stride_dd, enabled, NUM_HEADS: tl.constexpr,
                HEAD_DIM: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_D: tl.constexpr):
    """dst[h] = src[h] for the NUM_HEADS heads of one token, converted to dst's dtype."""
    d = tl.arange(0, BLOCK_D)
    for first in tl.static_range(0, NUM_HEADS, BLOCK_HEADS):
        h = first + tl.arange(0, BLOCK_HEADS)
        mask = (h < NUM_HEADS)[:, None] & (d < HEAD_DIM)[None, :] & enabled
        x = tl.load(src + h[:, None] * stride_sh + d[None, :] * stride_sd, mask=mask, other=0.0)
        tl.store(dst + h[:, None] * stride_dh + d[None, :] * stride_dd, x.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _rope_write_kv_kernel(q_out_ptr, q_ptr, k_ptr, v_ptr, k_pages_ptr, v_pages_ptr, rope_ptr, positions_ptr,
                          slots_ptr, stride_ot, stride_oh, stride_od, stride_qt, stride_qh, stride_qd,
                          stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
                          stride_kp, stride_ks, stride_kph, stride_kpd, stride_vp, stride_vs, stride_vph,
                          stride_vpd, stride_rope, HEADS: tl.constexpr, KV_HEADS: tl.constexpr,
                          HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_HALF: tl.constexpr,
                          BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, PDL: tl.constexpr):
    """One program: token t's q heads rotated into q_out, its k heads rotated and v heads copied into its slot."""
    HALF: tl.constexpr = HEAD_DIM // 2
    t = tl.program_id(0).to(tl.int64)
    # The step's inputs and the rope table are read before the wait (see triton_pdl); q, k and v after it.
    position = tl.load(positions_ptr + t).to(tl.int64)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    row = rope_ptr + position * stride_rope
    cos = tl.load(row + d, mask=d < HALF, other=0.0).to(tl.float32)[None, :]  # [1, D/2]
    sin = tl.load(row + HALF + d, mask=d < HALF, other=0.0).to(tl.float32)[None, :]
    wait_for_prior_kernel(PDL)
    _rotate_heads(q_ptr + t * stride_qt, stride_qh, stride_qd, q_out_ptr + t * stride_ot, stride_oh, stride_od,
                  cos, sin, True, HEADS, HALF, BLOCK_Q, BLOCK_HALF)
    write = slot >= 0
    slot = tl.maximum(slot, 0)  # padding rows compute an address in page 0 but store nothing
    page = slot // PAGE_SIZE
    in_page = slot % PAGE_SIZE
    _rotate_heads(k_ptr + t * stride_kt, stride_kh, stride_kd, k_pages_ptr + page * stride_kp + in_page * stride_ks,
                  stride_kph, stride_kpd, cos, sin, write, KV_HEADS, HALF, BLOCK_KV, BLOCK_HALF)
    _copy_heads(v_ptr + t * stride_vt, stride_vh, stride_vd, v_pages_ptr + page * stride_vp + in_page * stride_vs,
                stride_vph, stride_vpd, write, KV_HEADS, HEAD_DIM, BLOCK_KV, 2 * BLOCK_HALF)


def _heads_per_tile(num_heads: int, block_half: int) -> int:
    return min(triton.next_power_of_2(num_heads), max(1, _TILE_ELEMENTS // block_half))


def triton_rope_write_kv(k_pages: Tensor, v_pages: Tensor, q: Tensor, k: Tensor, v: Tensor, rope: Tensor,
                         positions: Tensor, slot_mapping: Tensor, *, num_warps: int = 4) -> Tensor:
    """llmfx::rope_write_kv in Triton: rotated q [T, H, D]; k, v written into the pools (DONATED), slot -1 skipped."""
    (tokens, heads, head_dim), kv_heads = q.shape, k.shape[1]
    assert head_dim % 2 == 0, "rotary embedding needs an even head_dim"
    assert k.shape == v.shape == (tokens, kv_heads, head_dim), "k, v must be [T, K, D] with q's T and D"
    assert k_pages.shape[1:] == v_pages.shape[1:] and k_pages.shape[2:] == (kv_heads, head_dim), \
        "pools must be [P, S, K, D] with k's K and D"
    assert rope.shape[1] == head_dim and rope.stride(1) == 1, "rope must be a [N, D] cos|sin table, rows contiguous"
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if tokens == 0:
        return q_out
    block_half = triton.next_power_of_2(head_dim // 2)
    _rope_write_kv_kernel[(tokens,)](
        q_out, q, k, v, k_pages, v_pages, rope, positions, slot_mapping, *q_out.stride(), *q.stride(), *k.stride(),
        *v.stride(), *k_pages.stride(), *v_pages.stride(), rope.stride(0), HEADS=heads, KV_HEADS=kv_heads,
        HEAD_DIM=head_dim, PAGE_SIZE=k_pages.shape[1], BLOCK_HALF=block_half,
        BLOCK_Q=_heads_per_tile(heads, block_half), BLOCK_KV=_heads_per_tile(kv_heads, block_half),
        num_warps=num_warps, **pdl_launch(q.device))
    return q_out


rope_write_kv.register_kernel("cuda")(triton_rope_write_kv)
