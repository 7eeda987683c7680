"""Rotary position embeddings (the half-rotation layout of Llama/Qwen/Mistral checkpoints)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from llmfx.config import ModelConfig


def inverse_frequencies(cfg: ModelConfig) -> Tensor:
    """[D/2] float32 inverse frequencies, with the config's rope scaling applied."""
    d = cfg.head_dim
    # float32 throughout, as the checkpoints' reference implementation computes it.
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    assert scaling.rope_type == "llama3", scaling
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    is_medium = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return torch.where(is_medium, blended, scaled)


def rope_table(cfg: ModelConfig, max_positions: int, device: torch.device | str) -> Tensor:
    """[max_positions, D] float32: cos in the first half, sin in the second (one gather per step)."""
    positions = torch.arange(max_positions, dtype=torch.float32)
    angles = torch.outer(positions, inverse_frequencies(cfg))  # [N, D/2]
    return torch.cat([angles.cos(), angles.sin()], dim=-1).to(device)


def apply_rope(x: Tensor, cos_sin: Tensor) -> Tensor:
    """x [T, heads, D] rotated by cos_sin [T, D] (rows gathered at the tokens' positions)."""
    half = x.shape[-1] // 2
    cos = cos_sin[:, None, :half].to(x.dtype)  # [T, 1, D/2]
    sin = cos_sin[:, None, half:].to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
