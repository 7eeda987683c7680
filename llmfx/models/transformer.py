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
from llmfx.ops import (add_rms_norm_linear, linear, paged_attention, rms_norm, rms_norm_linear, rope_write_kv,
                       silu_mul_linear)

Params = dict[str, Any]  # {"embed", "layers": tuple of per-layer dicts, "final_norm", "lm_head", "rope"}


def forward(params: Params, cfg: ModelConfig, batch: ForwardBatch, kv: tuple[LayerKV, ...]) -> Tensor:
    """Logits [B, V] float32 of each sequence's last token; writes the batch's K/V into kv (DONATED).

    The residual stream is carried as h plus the pending delta of the last sublayer: each RMSNorm is fused
    with the residual add before it and the linear after it (ops/fused_linear.py), as is each SiLU gate
    with the down projection, so at decode batch sizes a layer runs neither as a kernel of its own.
    """
    eps = cfg.rms_norm_eps
    h = params["embed"][batch.token_ids]  # [T, hidden]
    delta = None  # the last sublayer's output, not yet added to h
    for layer, (k_pages, v_pages) in zip(params["layers"], kv, strict=True):
        if delta is None:
            qkv = rms_norm_linear(h, layer["attn_norm"], layer["wqkv"], layer.get("bqkv"), eps)
        else:
            h, qkv = add_rms_norm_linear(h, delta, layer["attn_norm"], layer["wqkv"], layer.get("bqkv"), eps)
        attn = _attention(layer, cfg, qkv, params["rope"], batch, k_pages, v_pages)
        h, gate_up = add_rms_norm_linear(h, attn, layer["mlp_norm"], layer["w_gate_up"], None, eps)  # [T, 2I]
        delta = silu_mul_linear(gate_up, layer["w_down"])
    last = h[batch.logits_indices] if delta is None else (h + delta)[batch.logits_indices]  # [B, hidden]
    return rms_norm_linear(last, params["final_norm"], params["lm_head"], None, eps).float()  # [B, V]


def _attention(layer: Params, cfg: ModelConfig, qkv: Tensor, rope: Tensor, batch: ForwardBatch,
               k_pages: Tensor, v_pages: Tensor) -> Tensor:
    """The attention sublayer's output [T, hidden] from its qkv projection [T, (H + 2K) * D]."""
    tokens = qkv.shape[0]
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
