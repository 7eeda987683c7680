"""Reference generation: one sequence at a time through the paged path, no scheduler, no compile.

It is the simplest correct use of the model functions: the oracle for engine tests and a readable
example of the ForwardBatch/KVPool protocol.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch

from llmfx.batch import SequenceChunk
from llmfx.step_inputs import pack
from llmfx.config import ModelConfig
from llmfx.kv_pool import KVPool
from llmfx.models import Params, run


def greedy_generate(params: Params, cfg: ModelConfig, prompt: Sequence[int], max_new_tokens: int, *,
                    page_size: int = 4, shuffle_pages_seed: int | None = None,
                    stop_token_ids: Sequence[int] = ()) -> list[int]:
    """Greedy tokens after `prompt`; pages assigned in shuffled order when shuffle_pages_seed is set."""
    device = params["embed"].device
    total = len(prompt) + max_new_tokens
    num_pages = -(-total // page_size) + 1
    pages = list(range(1, num_pages))
    if shuffle_pages_seed is not None:
        random.Random(shuffle_pages_seed).shuffle(pages)
    kv = KVPool.allocate(cfg, num_pages, page_size, params["embed"].dtype, device)
    tokens = list(prompt)
    start = 0
    generated: list[int] = []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            chunk = SequenceChunk(tuple(tokens[start:]), start, tuple(pages))
            logits, kv = run(params, cfg, pack([chunk], page_size, device), kv)
            next_token = int(logits[0].argmax())
            start = len(tokens)
            tokens.append(next_token)
            generated.append(next_token)
            if next_token in stop_token_ids:
                break
    return generated
