"""Model functions over the paged KV pool."""

from __future__ import annotations

from torch import Tensor

from llmfx.batch import ForwardBatch
from llmfx.config import ModelConfig
from llmfx.kv_pool import KVPool
from llmfx.models.transformer import Params, forward


def run(params: Params, cfg: ModelConfig, batch: ForwardBatch, kv: KVPool) -> tuple[Tensor, KVPool]:
    """Logits [B, V] and the live KV handle; kv is DONATED (spent after this call)."""
    layers = kv.take()
    logits = forward(params, cfg, batch, layers)
    return logits, KVPool(layers)


__all__ = ["Params", "forward", "run"]
