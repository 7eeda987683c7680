"""A packed batch gives each sequence the logits it would get alone."""

from __future__ import annotations

import random

import torch
from hypothesis import given
from hypothesis import strategies as st

from llmfx.batch import SequenceChunk
from llmfx.step_inputs import pack
from llmfx.kv_pool import KVPool
from llmfx.models import run
from llmfx.weights import load_params, resolve_model

PAGE = 4


def _run(params, cfg, chunks, kv, **padding):
    with torch.no_grad():
        return run(params, cfg, pack(chunks, PAGE, **padding), kv)


def test_mixed_prefill_prefix_continuation_and_decode_equal_each_sequence_alone(hf_checkpoint):
    _, path = hf_checkpoint("qwen3")
    source = resolve_model(path)
    cfg = source.config
    params = load_params(source, dtype="float32")
    rng = torch.Generator().manual_seed(0)
    seq = [tuple(torch.randint(0, cfg.vocab_size, (n,), generator=rng).tolist()) for n in (13, 6, 9, 11)]
    pages = [(1, 2, 3, 4), (5, 6), (7, 8, 9), (10, 11, 12)]
    kv = KVPool.allocate(cfg, 13, PAGE, torch.float32, "cpu")
    # Warm the cache: sequence 2 has its first 8 tokens cached, sequence 3 its first 10 (decode next).
    _, kv = _run(params, cfg, [SequenceChunk(seq[2][:8], 0, pages[2]), SequenceChunk(seq[3][:10], 0, pages[3])], kv)
    mixed = [
        SequenceChunk(seq[0], 0, pages[0]),  # fresh prefill
        SequenceChunk(seq[1], 0, pages[1]),  # fresh prefill of another length
        SequenceChunk(seq[2][8:], 8, pages[2]),  # prefill continuing a cached prefix
        SequenceChunk(seq[3][10:], 10, pages[3]),  # one decode token
    ]
    packed, kv = _run(params, cfg, mixed, kv, num_tokens=24, num_seqs=6)  # padded like a graph bucket

    for b, tokens in enumerate(seq):
        alone_kv = KVPool.allocate(cfg, 5, PAGE, torch.float32, "cpu")
        alone, _ = _run(params, cfg, [SequenceChunk(tokens, 0, (1, 2, 3, 4))], alone_kv)
        torch.testing.assert_close(packed[b], alone[0], rtol=0, atol=1e-5)


def test_padding_rows_write_only_the_null_page(hf_checkpoint):
    _, path = hf_checkpoint("llama")
    source = resolve_model(path)
    params = load_params(source, dtype="float32")
    kv = KVPool.allocate(source.config, 4, PAGE, torch.float32, "cpu")
    _, kv = _run(params, source.config, [SequenceChunk((1, 2, 3), 0, (2,))], kv, num_tokens=8, num_seqs=3)
    for k, v in kv.layers:
        assert k[2, :3].abs().sum() > 0 and v[2, :3].abs().sum() > 0
        assert k[1].abs().sum() == 0 and k[3].abs().sum() == 0 and k[2, 3:].abs().sum() == 0


@given(st.sampled_from([1, 2, 4, 16]),
       st.lists(st.tuples(st.integers(0, 60), st.integers(1, 40)), min_size=1, max_size=5), st.integers(0, 2**16))
def test_pack_maps_every_token_to_its_page_slot(page_size, spans, seed):
    rng = random.Random(seed)
    free = rng.sample(range(1, 2000), sum(-(-(s + n) // page_size) for s, n in spans))
    chunks = []
    for start, n in spans:
        pages = tuple(free.pop() for _ in range(-(-(start + n) // page_size)))
        chunks.append(SequenceChunk(tuple(range(n)), start, pages))
    batch = pack(chunks, page_size, num_tokens=sum(n for _, n in spans) + 3)
    expected = [c.pages[p // page_size] * page_size + p % page_size
                for c in chunks for p in range(c.start_pos, c.start_pos + len(c.token_ids))]
    assert batch.slot_mapping.tolist() == expected + [-1] * 3
    assert batch.positions.tolist() == [p for c in chunks for p in range(c.start_pos, c.start_pos + len(c.token_ids))] + [0] * 3
