"""Shared model ops: attention over the paged KV pool, KV write, rotary embeddings, RMSNorm."""

from llmfx.ops.attention import paged_attention, write_kv
from llmfx.ops.norm import rms_norm
from llmfx.ops.rope import apply_rope, rope_table

__all__ = ["apply_rope", "paged_attention", "rms_norm", "rope_table", "write_kv"]
