"""The decoder shared by Llama, Mistral, Qwen2 and Qwen3: a pure function of params, config and batch.

The families differ only in flags of ModelConfig (q/k/v bias, q/k RMSNorm, sliding window, rope
scaling, tied embeddings), so one forward serves them all.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from llmfx.batch import ForwardBatch
from llmfx.config import ModelConfig
from llmfx.kv_pool import LayerKV
from llmfx.ops import linear, paged_attention, rms_norm, rope_write_kv, silu_mul

Params = dict[str, Any]  # {"embed", "layers": tuple of per-layer dicts, "final_norm", "lm_head", "rope"}


def forward(params: Params, cfg: ModelConfig, batch: ForwardBatch, kv: tuple[LayerKV, ...]) -> Tensor:
    """Logits [B, V] float32 of each sequence's last token; writes the batch's K/V into kv (DONATED)."""
    h = params["embed"][batch.token_ids]  # [T, hidden]
    for layer, (k_pages, v_pages) in zip(params["layers"], kv, strict=True):
        h = h + _attention(layer, cfg, rms_norm(h, layer["attn_norm"], cfg.rms_norm_eps), params["rope"], batch,
                           k_pages, v_pages)
        h = h + _mlp(layer, rms_norm(h, layer["mlp_norm"], cfg.rms_norm_eps))
    last = rms_norm(h[batch.logits_indices], params["final_norm"], cfg.rms_norm_eps)  # [B, hidden]
    return linear(last, params["lm_head"]).float()  # [B, V]


def _attention(layer: Params, cfg: ModelConfig, x: Tensor, rope: Tensor, batch: ForwardBatch,
               k_pages: Tensor, v_pages: Tensor) -> Tensor:
    tokens = x.shape[0]
    qkv = linear(x, layer["wqkv"], layer.get("bqkv"))  # [T, (H + 2K) * D]
    q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
    q = q.view(tokens, cfg.num_heads, cfg.head_dim)  # [T, H, D]
    k = k.view(tokens, cfg.num_kv_heads, cfg.head_dim)  # [T, K, D]
    v = v.view(tokens, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q = rms_norm(q, layer["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, layer["k_norm"], cfg.rms_norm_eps)
    # One op rotates q and k and writes k, v into the pages (one kernel on CUDA); q comes back rotated.
    q = rope_write_kv(k_pages, v_pages, q, k, v, rope, batch.positions, batch.slot_mapping)
    out = paged_attention(q, k_pages, v_pages, batch.page_table, batch.query_start_loc, batch.seq_lens,
                          cfg.head_dim**-0.5, cfg.sliding_window or 0)  # [T, H, D]
    return linear(out.reshape(tokens, cfg.q_size), layer["wo"], layer.get("bo"))


def _mlp(layer: Params, x: Tensor) -> Tensor:
    return linear(silu_mul(linear(x, layer["w_gate_up"])), layer["w_down"])  # gate|up [T, 2I] -> [T, I]
