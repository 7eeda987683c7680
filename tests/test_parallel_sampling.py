"""n and best_of: sibling sequences of one prompt, sharing its computed pages."""

from __future__ import annotations

import pytest

from llmfx.kv_cache import KvCacheConfig, new_page_pool
from llmfx.llm import LLM
from llmfx.sampling_params import SamplingParams, child_seed
from llmfx.scheduler import Request, SchedulerConfig, SchedulerLimits, new_scheduler_state, postprocess, schedule

PROMPT = "Several ways to continue this prompt"


@pytest.fixture(scope="module")
def tiny():
    with LLM("tiny", kv_cache_config=KvCacheConfig(page_size=4, max_tokens=2048)) as llm:
        yield llm


def test_siblings_wait_for_the_first_prompt_then_share_its_full_pages():
    limits = SchedulerLimits(max_batch_size=8, max_num_tokens=64, max_seq_len=128, page_size=4)
    params = SamplingParams(max_tokens=4, ignore_eos=True, temperature=1.0)
    prompt = tuple(range(10, 40))  # 30 tokens: 7 full pages
    first = Request(request_id=0, prompt_token_ids=prompt, params=params)
    siblings = tuple(Request(request_id=i, prompt_token_ids=prompt, params=params, prefill_after=0) for i in (1, 2))
    state = new_scheduler_state(new_page_pool(64, 4, True))
    state, batch = schedule(state, (first, *siblings), limits, SchedulerConfig())
    assert [s.request_id for s in batch.seqs] == [0]  # the siblings wait for the prompt
    state, _ = postprocess(state, batch, {0: 7}, limits)
    state, batch = schedule(state, (), limits, SchedulerConfig())
    seqs = {s.request_id: s for s in batch.seqs}
    assert set(seqs) == {0, 1, 2}
    shared = seqs[0].pages[:7]
    for rid in (1, 2):
        assert seqs[rid].pages[:7] == shared  # the prompt's full pages, copy-free
        assert seqs[rid].start_pos == 28 and seqs[rid].token_ids == prompt[28:]  # only the partial page is recomputed
    assert all(state.pool.refcounts[p] == 3 for p in shared)


def test_n_returns_n_distinct_sequences_the_first_as_with_n_1(tiny):
    params = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=12, ignore_eos=True)
    out = tiny.generate(PROMPT, params)
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({o.token_ids for o in out.outputs}) == 3
    for o in out.outputs:
        alone = tiny.generate(PROMPT, SamplingParams(temperature=1.0, seed=child_seed(11, o.index), max_tokens=12,
                                                     ignore_eos=True))
        assert alone.token_ids == o.token_ids
    assert out.metrics.num_generated_tokens == 36


def test_best_of_keeps_the_n_sequences_with_the_highest_cumulative_logprob(tiny):
    every = tiny.generate(PROMPT, SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=10, ignore_eos=True))
    best = tiny.generate(PROMPT, SamplingParams(n=2, best_of=4, temperature=1.0, seed=5, max_tokens=10,
                                                ignore_eos=True))
    ranked = sorted(every.outputs, key=lambda o: -o.cumulative_logprob)[:2]
    assert {o.token_ids for o in best.outputs} == {o.token_ids for o in ranked}
    assert [o.index for o in best.outputs] == sorted(o.index for o in ranked)


def test_streaming_with_n_yields_every_sequence(tiny):
    handle = tiny.generate_async(PROMPT, SamplingParams(n=2, temperature=0.9, seed=1, max_tokens=6, ignore_eos=True),
                                 streaming=True)
    updates = list(handle)
    final = updates[-1]
    assert final.finished and len(final.outputs) == 2
    for i in range(2):
        assert "".join(u.outputs[i].text_diff for u in updates) == final.outputs[i].text


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(n=3, best_of=2, temperature=1.0), "SamplingParams.best_of must be an integer >= 3"),
    (dict(n=2, temperature=0.0), "needs temperature > 0"),
    (dict(n=0), "SamplingParams.n must be an integer >= 1"),
])
def test_bad_n_and_best_of_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_streaming_best_of_is_refused(tiny):
    with pytest.raises(ValueError, match="streaming needs best_of == n"):
        tiny.generate_async(PROMPT, SamplingParams(n=1, best_of=3, temperature=1.0), streaming=True)
