"""Benchmark helpers: the offline warm-up leaves the timed run nothing to hit in the prefix cache."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from llmfx.bench import offline_workload, warmup_prompts


@given(st.integers(2, 300))
def test_warmup_prompts_keep_shapes_and_change_every_token(vocab):
    prompts = [[t % vocab for t in p] for p, _ in offline_workload(vocab, num_requests=8)]
    warm = warmup_prompts(prompts, vocab)
    assert [len(p) for p in warm] == [len(p) for p in prompts]
    assert all(a != b for p, w in zip(prompts, warm) for a, b in zip(p, w))
    assert all(0 <= t < vocab for p in warm for t in p)
