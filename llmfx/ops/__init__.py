"""Shared model ops: attention over the paged KV pool, KV write, rotary embeddings (fused with the write), RMSNorm,
linear, the SiLU-gated activation."""

import torch

from llmfx.ops.activation import silu_mul
from llmfx.ops.attention import paged_attention, write_kv
from llmfx.ops.linear import linear
from llmfx.ops.norm import rms_norm
from llmfx.ops.rope import apply_rope, rope_table
from llmfx.ops.rope_kv import rope_write_kv

if torch.cuda.is_available():  # registers the Triton kernels; CPU-only torch wheels ship no triton
    try:
        from llmfx.ops import triton_activation, triton_attention, triton_linear, triton_rope_kv  # noqa: F401
    except ModuleNotFoundError as missing:
        if missing.name != "triton":
            raise

__all__ = ["apply_rope", "linear", "paged_attention", "rms_norm", "rope_table", "rope_write_kv", "silu_mul",
           "write_kv"]
