"""prompt_logprobs: each prompt token's logprob, rank and top-20 given the tokens before it.

A separate eager forward over a scratch KV pool, with logits for every prompt row, run on the
caller's thread when a request asks for it. The served step keeps static shapes by computing
logits for each sequence's last row only, so scoring costs one extra prefill of the prompts that
ask, and it reads its results back to the host (a synchronization the step path never makes).
"""

from __future__ import annotations

import dataclasses

import torch

from llmfx.batch import SequenceChunk
from llmfx.step_inputs import pack
from llmfx.config import ModelConfig
from llmfx.kv_pool import KVPool
from llmfx.model_engine import SampledToken
from llmfx.models import Params, forward
from llmfx.sampler import score_tokens


def score_prompt(params: Params, cfg: ModelConfig, page_size: int, token_ids: tuple[int, ...]) -> tuple[SampledToken, ...]:
    """Logprob, rank and top-20 of prompt tokens 1..L-1 under the model, each given the tokens before it."""
    device = params["embed"].device
    pages = tuple(range(1, -(-len(token_ids) // page_size) + 1))
    scratch = KVPool.allocate(cfg, len(pages) + 1, page_size, params["embed"].dtype, device)
    inputs = pack([SequenceChunk(token_ids, 0, pages)], page_size, device)
    every_row = torch.arange(len(token_ids) - 1, device=device)  # row i predicts token i + 1
    inputs = dataclasses.replace(inputs, logits_indices=every_row)
    with torch.inference_mode():
        logits = forward(params, cfg, inputs, scratch.take())  # [L - 1, V]
        scored = score_tokens(logits, inputs.token_ids[1:])
        tokens, logprobs, ranks, top_ids, top_logprobs = (
            t.cpu().numpy() for t in (scored.tokens, scored.logprobs, scored.ranks, scored.topk_ids, scored.topk_logprobs))
    return tuple(SampledToken(token=int(tokens[i]), logprob=float(logprobs[i]), rank=int(ranks[i]),
                              top_ids=tuple(map(int, top_ids[i])), top_logprobs=tuple(map(float, top_logprobs[i])))
                 for i in range(len(tokens)))
