"""sample_step's tensor arguments at any batch and vocabulary size, for compile tests and codegen benchmarks."""

from __future__ import annotations

import torch
from torch import Tensor

from llmfx.sampler import PenaltyState, SamplingTensors, token_words


def padding_sampler_inputs(rows: int, vocab: int, device: torch.device | str = "cpu",
                           dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> tuple[Tensor, ...]:
    """(logits, unseen, sampling, penalties, token_pool, words) for rows greedy padding rows over vocab ids,
    as the engine passes them; the logits are random and nothing has been seen (penalty state zero)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=g).to(device, dtype),
            torch.full((rows,), -1, dtype=torch.int64, device=device),
            SamplingTensors.build([], [], [], device, pad_to=rows),
            PenaltyState.build([], [], vocab, device, pad_to=rows),
            torch.zeros(rows, dtype=torch.int64, device=device),
            token_words(vocab, device))
