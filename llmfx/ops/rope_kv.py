"""Rotary embedding and the KV write as one op per layer, so that a GPU kernel reads q, k and v once.

The default implementation is the reference, `apply_rope` then `write_kv`: on CPU it computes exactly
what the decoder computed before the two were fused, and it is the oracle of the Triton kernel
(ops/triton_rope_kv.py), which serves the op on CUDA.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmfx.ops.attention import write_kv
from llmfx.ops.rope import apply_rope


def rope_write_kv_reference(k_pages: Tensor, v_pages: Tensor, q: Tensor, k: Tensor, v: Tensor, rope: Tensor,
                            positions: Tensor, slot_mapping: Tensor) -> Tensor:
    """The op's reference, on any device: apply_rope to q and k, then write_kv (slot -1 to the null page)."""
    cos_sin = rope[positions]  # [T, D]
    write_kv(k_pages, v_pages, apply_rope(k, cos_sin), v, slot_mapping)
    return apply_rope(q, cos_sin)


@torch.library.custom_op("llmfx::rope_write_kv", mutates_args=("k_pages", "v_pages"))
def rope_write_kv(k_pages: Tensor, v_pages: Tensor, q: Tensor, k: Tensor, v: Tensor, rope: Tensor,
                  positions: Tensor, slot_mapping: Tensor) -> Tensor:
    """Rotated q [T, H, D]; writes rotated k and v [T, K, D] into the pools [P, S, K, D] (DONATED).

    Token t is rotated by the row rope[positions[t]] of the cos|sin table [N, D] and written at slot
    slot_mapping[t] (page * S + offset). Slot -1 is a padding row: its q is still rotated (at its
    position, which must be a row of the table), and its k and v reach no real page. The reference
    writes them to the null page 0, the CUDA kernel skips them; page 0 is never read unmasked.
    """
    return rope_write_kv_reference(k_pages, v_pages, q, k, v, rope, positions, slot_mapping)


@rope_write_kv.register_fake
def _(k_pages, v_pages, q, k, v, rope, positions, slot_mapping):
    return q.new_empty(q.shape)  # contiguous, like apply_rope's result and the kernel's output
