"""Every supported family matches Hugging Face transformers on the same random weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from llmfx.batch import SequenceChunk
from llmfx.step_inputs import pack
from llmfx.kv_pool import KVPool
from llmfx.models import run
from llmfx.testing.reference import greedy_generate
from llmfx.weights import load_params, resolve_model
from tests.conftest import HF_CASES

PROMPT_LEN = 20  # longer than mistral's window of 8 so the sliding mask matters


@pytest.mark.parametrize("case", list(HF_CASES))
def test_prefill_logits_match_transformers_at_every_position(hf_checkpoint, case):
    model, path = hf_checkpoint(case)
    source = resolve_model(path)
    params = load_params(source, dtype="float32")
    ids = torch.randint(0, source.config.vocab_size, (PROMPT_LEN,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids[None]).logits[0]  # [T, V]
    page_size = 4
    kv = KVPool.allocate(source.config, PROMPT_LEN // page_size + 2, page_size, torch.float32, "cpu")
    pages = tuple(range(PROMPT_LEN // page_size, 0, -1))  # reversed order: page ids need not be contiguous
    batch = pack([SequenceChunk(tuple(ids.tolist()), 0, pages)], page_size)
    every_row = dataclasses.replace(batch, logits_indices=torch.arange(PROMPT_LEN))
    with torch.no_grad():
        logits, kv = run(params, source.config, every_row, kv)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("case", list(HF_CASES))
def test_greedy_decode_through_shuffled_pages_matches_transformers(hf_checkpoint, case):
    model, path = hf_checkpoint(case)
    source = resolve_model(path)
    params = load_params(source, dtype="float32")
    prompt = torch.randint(0, source.config.vocab_size, (PROMPT_LEN,), generator=torch.Generator().manual_seed(2))
    model.generation_config.eos_token_id = None  # compare 32 raw argmax steps, EOS included
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        expected = model.generate(prompt[None], attention_mask=torch.ones(1, PROMPT_LEN, dtype=torch.long),
                                  max_new_tokens=32, do_sample=False)[0, PROMPT_LEN:].tolist()
    ours = greedy_generate(params, source.config, prompt.tolist(), 32, page_size=4, shuffle_pages_seed=3)
    assert len(set(expected)) > 4, "the random model should not collapse onto one token"
    assert ours == expected
