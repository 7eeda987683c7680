"""LLM.generate end to end on CPU: parity with transformers, seeds, streaming, stops, aborts, errors, and the
executor loop's GC threshold."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmfx.kv_cache import KvCacheConfig, num_available
from llmfx.kv_pool import KVPool
from llmfx.llm import LLM
from llmfx.model_engine import StepFailed
from llmfx.sampling_params import SamplingParams
from llmfx.scheduler import SchedulerConfig

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, detokenize=False)


def _prompts(vocab: int, lengths, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def tiny():
    with LLM("tiny", kv_cache_config=KvCacheConfig(page_size=4, max_tokens=1024)) as llm:
        yield llm


def test_batched_greedy_with_chunked_prefill_and_preemption_equals_transformers(hf_checkpoint):
    model, path = hf_checkpoint("llama")
    prompts = _prompts(96, [5, 17, 33, 9, 26, 12])
    # 40 pages of 4 tokens cannot hold six sequences of up to 57 tokens: max_utilization must preempt.
    with LLM(path, skip_tokenizer_init=True, max_num_tokens=16, max_batch_size=6,
             kv_cache_config=KvCacheConfig(page_size=4, max_tokens=160),
             scheduler_config=SchedulerConfig(capacity_scheduler_policy="max_utilization")) as llm:
        outputs = llm.generate(prompts, GREEDY)
        assert llm.scheduler_state.num_preemptions > 0
    for prompt, out in zip(prompts, outputs):
        assert list(out.token_ids) == _hf_greedy(model, prompt, 24)
        assert out.outputs[0].finish_reason == "length"


def test_guaranteed_no_evict_serves_a_batch_larger_than_the_pool_without_preempting(hf_checkpoint):
    model, path = hf_checkpoint("qwen2")
    prompts = _prompts(96, [20, 7, 30, 14], seed=1)
    with LLM(path, skip_tokenizer_init=True, max_num_tokens=32,
             kv_cache_config=KvCacheConfig(page_size=4, max_tokens=64)) as llm:
        outputs = llm.generate(prompts, GREEDY)
        assert llm.scheduler_state.num_preemptions == 0
    assert [list(o.token_ids) for o in outputs] == [_hf_greedy(model, p, 24) for p in prompts]


def test_seeded_sampling_is_independent_of_batch_composition_and_order(tiny):
    params = SamplingParams(temperature=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    alone = tiny.generate("The seed decides", params)
    others = [SamplingParams(temperature=1.0, max_tokens=n, ignore_eos=True) for n in (5, 20, 11)]
    batch = tiny.generate(["x", "The seed decides", "yy", "zzz"], [others[0], params, others[1], others[2]])
    reordered = tiny.generate(["zzz", "yy", "The seed decides"], [others[2], others[1], params])
    assert alone.token_ids == batch[1].token_ids == reordered[2].token_ids
    assert len(set(alone.token_ids)) > 1  # sampling, not a constant


def test_unseeded_requests_differ(tiny):
    params = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    a, b = tiny.generate(["same prompt", "same prompt"], params)
    assert a.token_ids != b.token_ids


def test_streaming_deltas_concatenate_to_the_final_text(tiny):
    handle = tiny.generate_async("Stream me", SamplingParams(temperature=0.7, seed=5, max_tokens=30,
                                                             ignore_eos=True), streaming=True)
    updates = list(handle)
    final = handle.result()
    assert updates[-1] == final and final.finished and len(updates) > 1
    assert "".join(u.outputs[0].text_diff for u in updates) == final.text
    assert sum((u.outputs[0].token_ids_diff for u in updates), ()) == final.token_ids


def test_async_iteration_yields_the_final_output(tiny):
    import asyncio

    async def collect():
        handle = tiny.generate_async("async", SamplingParams(max_tokens=6, ignore_eos=True), streaming=True)
        return [u async for u in handle]

    updates = asyncio.run(collect())
    assert updates[-1].finished and len(updates[-1].token_ids) == 6


def test_stop_string_spanning_tokens_ends_and_trims(tiny):
    free = tiny.generate("Stop here", SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    ids = free.token_ids
    i = next(i for i in range(3, len(ids) - 1) if ids[i] < 128 and ids[i + 1] < 128)
    stop = tiny.tokenizer.decode(ids[i:i + 2])
    cut = free.text.find(stop)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=[stop])
    stopped = tiny.generate("Stop here", params)
    assert stopped.text == free.text[:cut]
    assert stopped.outputs[0].finish_reason == "stop" and stopped.outputs[0].stop_reason == stop
    kept = tiny.generate("Stop here", SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=[stop],
                                                     include_stop_str_in_output=True))
    assert kept.text == free.text[:cut + len(stop)]


def test_stop_token_id_ends_the_request_and_is_kept(tiny):
    free = tiny.generate("Stop token", SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    target = free.token_ids[6]
    out = tiny.generate("Stop token", SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True,
                                                     stop_token_ids=[target]))
    first = free.token_ids.index(target)
    assert out.token_ids == free.token_ids[: first + 1]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == target


def test_abort_ends_the_request_and_frees_its_pages(tiny):
    handle = tiny.generate_async("abort me", SamplingParams(max_tokens=900, ignore_eos=True), streaming=True)
    next(iter(handle))  # it is running
    handle.abort()
    final = handle.result(timeout=30)
    assert final.outputs[0].finish_reason == "abort" and 0 < len(final.token_ids) < 900
    deadline = time.monotonic() + 10
    pool = tiny.scheduler_state.pool
    while num_available(pool) != pool.num_pages - 1 and time.monotonic() < deadline:
        time.sleep(0.01)
        pool = tiny.scheduler_state.pool
    assert num_available(pool) == pool.num_pages - 1


@pytest.mark.parametrize(("prompt", "params", "message"), [
    ("", None, "prompt must not be empty"),
    ([1, 2, 10_000], None, "token id 10000 is outside the vocabulary"),
    ("x" * 3000, None, "max_seq_len=2048"),
    ("ok", SamplingParams(max_tokens=2000), "needs .* KV pages"),  # the pool holds 1024 tokens
])
def test_bad_requests_raise_before_entering_the_engine(tiny, prompt, params, message, monkeypatch):
    submitted = []
    monkeypatch.setattr(tiny._executor, "submit", submitted.append)
    with pytest.raises(ValueError, match=message):
        tiny.generate(["fine prompt", prompt], params)
    assert submitted == []  # the good prompt beside the bad one was not started either


@pytest.mark.parametrize(("field", "value"), [("temperature", -0.5), ("max_tokens", 0), ("top_p", 1.5),
                                              ("min_tokens", -1), ("seed", -3)])
def test_invalid_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**{field: value})


def test_an_exception_in_a_step_fails_only_that_steps_requests():
    with LLM("tiny", kv_cache_config=KvCacheConfig(page_size=4, max_tokens=1024)) as llm:
        engine = llm._executor._engine
        real = engine.launch

        def failing(kv, batch, sequences):  # fails any step that carries a prompt ending in "!"
            if any(s.token_ids and s.token_ids[-1] == ord("!") for s in batch.seqs):
                raise StepFailed(KVPool(kv.take()), RuntimeError("injected failure"))
            return real(kv, batch, sequences)

        engine.launch = failing
        bad = llm.generate("boom!", SamplingParams(max_tokens=4))
        assert bad.outputs[0].finish_reason == "error" and "injected failure" in bad.outputs[0].error
        good = llm.generate("fine", SamplingParams(max_tokens=4, ignore_eos=True))
        assert good.outputs[0].finish_reason == "length" and len(good.token_ids) == 4


def test_shutdown_with_requests_in_flight_aborts_them_and_returns():
    llm = LLM("tiny", kv_cache_config=KvCacheConfig(page_size=4, max_tokens=8192))
    handles = [llm.generate_async(f"long {i}", SamplingParams(max_tokens=1500, ignore_eos=True)) for i in range(4)]
    time.sleep(0.2)
    done = threading.Event()
    threading.Thread(target=lambda: (llm.shutdown(), done.set()), daemon=True).start()
    assert done.wait(30), "shutdown hung"
    finals = [h.result(timeout=5) for h in handles]
    assert all(f.outputs[0].finish_reason == "abort" for f in finals)
    with pytest.raises(RuntimeError, match="stopped"):
        llm.generate_async("after", SamplingParams(max_tokens=2))


def test_logprobs_equal_log_softmax_of_transformers_logits(hf_checkpoint):
    model, path = hf_checkpoint("llama")
    prompt = _prompts(96, [11], seed=4)[0]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, detokenize=False, logprobs=3)
    with LLM(path, skip_tokenizer_init=True, kv_cache_config=KvCacheConfig(page_size=4, max_tokens=256)) as llm:
        out = llm.generate(prompt, params).outputs[0]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + list(out.token_ids)])).logits[0]
    expected = torch.log_softmax(logits[len(prompt) - 1: -1].double(), dim=-1)  # [6, V]
    cumulative = 0.0
    for i, (token, table) in enumerate(zip(out.token_ids, out.logprobs)):
        assert table[token].rank == 1 and abs(table[token].logprob - expected[i, token].item()) < 1e-4
        top = expected[i].topk(3)
        assert set(top.indices.tolist()) <= set(table)
        for t, lp in zip(top.indices.tolist(), top.values.tolist()):
            assert abs(table[t].logprob - lp) < 1e-4
        cumulative += expected[i, token].item()
    assert abs(out.cumulative_logprob - cumulative) < 1e-3


def test_prompt_logprobs_equal_log_softmax_of_transformers_logits(hf_checkpoint):
    model, path = hf_checkpoint("qwen2")
    prompt = _prompts(96, [13], seed=6)[0]
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, detokenize=False, prompt_logprobs=2)
    with LLM(path, skip_tokenizer_init=True, kv_cache_config=KvCacheConfig(page_size=4, max_tokens=256)) as llm:
        out = llm.generate(prompt, params)
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([prompt])).logits[0].double(), dim=-1)  # [T, V]
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for i in range(1, len(prompt)):
        table = out.prompt_logprobs[i]
        assert abs(table[prompt[i]].logprob - expected[i - 1, prompt[i]].item()) < 1e-4
        assert table[prompt[i]].rank == 1 + int((expected[i - 1] > expected[i - 1, prompt[i]]).sum())
        top = expected[i - 1].topk(2)
        for rank, (t, lp) in enumerate(zip(top.indices.tolist(), top.values.tolist()), start=1):
            assert table[t].rank == rank and abs(table[t].logprob - lp) < 1e-4


def test_the_executor_loop_serves_under_its_gc_threshold_and_restores_python_s():
    import gc

    from llmfx.executor import DEFAULT_GC_GEN0_THRESHOLD

    before = gc.get_threshold()
    seen = []
    with LLM("tiny", kv_cache_config=KvCacheConfig(page_size=4, max_tokens=1024)) as llm:
        seen.append(gc.get_threshold())
        llm.generate("hi", SamplingParams(max_tokens=2))
    assert seen == [(DEFAULT_GC_GEN0_THRESHOLD, *before[1:])] and gc.get_threshold() == before
    with LLM("tiny", kv_cache_config=KvCacheConfig(page_size=4, max_tokens=1024),
             garbage_collection_gen0_threshold=None):
        assert gc.get_threshold() == before  # None: Python's own thresholds, untouched


def test_a_higher_gc_threshold_runs_fewer_young_collections_while_serving():
    import gc

    from llmfx.bench import GcTimer

    prompts = [f"prompt {i}" for i in range(128)]  # a wide batch: a young collection every few steps at 700
    params = SamplingParams(max_tokens=24, ignore_eos=True, detokenize=False)
    young = {}
    for threshold in (700, 50_000):
        with LLM("tiny", kv_cache_config=KvCacheConfig(page_size=4, max_tokens=8192),
                 garbage_collection_gen0_threshold=threshold) as llm:
            llm.generate(prompts, params, use_tqdm=False)  # warm-up: caches, first-call paths
            timer = GcTimer()
            gc.callbacks.append(timer)
            try:
                llm.generate(prompts, params, use_tqdm=False)
            finally:
                gc.callbacks.remove(timer)
        young[threshold] = timer.collections[0]
    assert young[700] >= 10 and young[50_000] <= young[700] // 5, young


@pytest.mark.parametrize("value", [0, -5, 2.5, True, "20000"])
def test_a_bad_gc_threshold_is_refused_before_anything_loads(value, monkeypatch):
    import llmfx.llm as llm_module

    monkeypatch.setattr(llm_module, "resolve_model", lambda *a: pytest.fail("the model was resolved"))
    with pytest.raises(ValueError, match="garbage_collection_gen0_threshold must be an integer >= 1 or None"):
        LLM("tiny", garbage_collection_gen0_threshold=value)


@settings(max_examples=25)  # each example with a threshold runs a full collection of the test process
@given(st.one_of(st.none(), st.integers(1, 10**6)), st.booleans())
def test_gc_gen0_threshold_holds_inside_the_block_and_is_restored_after_it_even_on_error(value, fail):
    import gc

    from llmfx.executor import gc_gen0_threshold

    before = gc.get_threshold()
    full = []  # full collections run on entering the block
    track = lambda phase, info: phase == "stop" and info["generation"] == 2 and full.append(1)  # noqa: E731
    gc.callbacks.append(track)
    try:
        with contextlib.suppress(KeyError):
            with gc_gen0_threshold(value):
                entered = len(full)
                assert gc.get_threshold() == (before if value is None else (value, *before[1:]))
                if fail:
                    raise KeyError("the block failed")
    finally:
        gc.callbacks.remove(track)
    assert gc.get_threshold() == before
    assert (entered >= 1) == (value is not None)  # a fresh start for the counters, only when it takes over


@settings(max_examples=20, deadline=None)  # every opening runs a full collection
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 10**6), st.integers(0, 10)), min_size=1, max_size=6))
def test_overlapping_gc_thresholds_follow_the_newest_open_block_and_python_s_returns_with_the_last(ops):
    import gc

    from llmfx.executor import gc_gen0_threshold

    python = gc.get_threshold()
    opened: list[tuple[object, int]] = []  # (context manager, its value), in opening order
    try:
        for is_open, value, pick in ops:
            if is_open or not opened:
                cm = gc_gen0_threshold(value)
                cm.__enter__()
                opened.append((cm, value))
            else:  # close any open block, not only the newest: LLMs stop in any order
                cm, _ = opened.pop(pick % len(opened))
                cm.__exit__(None, None, None)
            assert gc.get_threshold() == ((opened[-1][1], *python[1:]) if opened else python)
    finally:
        for cm, _ in reversed(opened):
            cm.__exit__(None, None, None)
    assert gc.get_threshold() == python
