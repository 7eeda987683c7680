"""A stand-in for the compiled step: no device work, so what remains of a step is its host side."""

from __future__ import annotations

import torch

from llmfx.model_engine import OUT_COLUMNS


def instant_step(max_rows: int, token: int = 1):
    """A replacement for ModelEngine._step (the eager path's step) whose every row samples `token` with logprob 0."""
    out = torch.zeros(max_rows, OUT_COLUMNS, dtype=torch.float64)
    out[:, 0] = token
    out[:, 2] = 1  # rank

    def step(kv, inputs, sampling, gather_rows, penalties, token_pool, words, variant):
        return out[: inputs.logits_indices.shape[0]]

    return step
