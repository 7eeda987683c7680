"""Bucket choice, padding and the compiled step, on CPU (the GPU runs the same code with CUDA graphs)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch._inductor.custom_graph_pass import CustomGraphPass

from llmfx.buckets import BucketKey, default_decode_sizes, make_buckets
from llmfx.kv_pool import KVPool
from llmfx.llm import LLM
from llmfx import model_engine
from llmfx.model_engine import EngineConfig, ModelEngine, SamplerVariant, step_fn
from llmfx.sampling_params import SamplingParams
from llmfx.scheduler import Request, ScheduledBatch, ScheduledSeq, SequenceState
from llmfx.weights import load_params, resolve_model


def _batch(sizes: list[int]) -> ScheduledBatch:
    return ScheduledBatch(seqs=tuple(ScheduledSeq(request_id=i, token_ids=(1,) * n, start_pos=0, pages=(1,),
                                                  sample=True) for i, n in enumerate(sizes)))


@given(st.integers(1, 64), st.integers(16, 512), st.lists(st.integers(1, 40), min_size=1, max_size=64))
def test_a_batch_pads_to_the_smallest_bucket_that_holds_it(max_batch, max_tokens, sizes):
    sizes = sizes[:max_batch]
    if sum(sizes) > max_tokens:
        return
    buckets = make_buckets(max_batch, max_tokens)
    key = buckets.key(_batch(sizes))
    b, t = len(sizes), sum(sizes)
    assert key.num_seqs >= b and key.num_tokens >= t
    assert key.decode == (t == b)
    if key.decode:
        assert key.num_tokens == key.num_seqs == min(s for s in buckets.decode_sizes if s >= b)
    else:
        assert key.num_seqs == max_batch and key.num_tokens == min(c for c in buckets.token_counts if c >= t)
    assert key in buckets.all_keys()


@given(st.integers(1, 300), st.integers(16, 4096), st.none() | st.lists(st.integers(1, 300), min_size=1, max_size=8))
def test_warmup_order_is_one_row_then_decode_descending_then_token_counts(max_batch, max_tokens, user_sizes):
    user_sizes = None if user_sizes is None else [min(s, max_batch) for s in user_sizes]
    buckets = make_buckets(max_batch, max_tokens, user_sizes)
    order = buckets.warmup_order()
    assert sorted(order, key=repr) == sorted(buckets.all_keys(), key=repr)  # every bucket, once
    decode = [k.num_seqs for k in order if k.decode]
    mixed = [k.num_tokens for k in order if not k.decode]
    assert order[: len(decode)] == tuple(k for k in order if k.decode)  # decode buckets before mixed ones
    ones = [k for k in order if k.num_seqs == 1]
    assert order[: len(ones)] == tuple(ones)  # one row first: it compiles apart (0/1 specialization)
    rest = [b for b in decode if b != 1]
    assert rest == sorted(rest, reverse=True) and mixed == sorted(mixed, reverse=True)


def test_default_decode_sizes_follow_the_design():
    assert default_decode_sizes(256)[:6] == (1, 2, 4, 8, 16, 24) and default_decode_sizes(256)[-1] == 256
    assert default_decode_sizes(20) == (1, 2, 4, 8, 16, 20)


@pytest.mark.parametrize("sizes", [[0, 4], [3, 99], []])
def test_bad_cuda_graph_batch_sizes_are_rejected(sizes):
    with pytest.raises(ValueError, match=r"cuda_graph_batch_sizes must be integers in \[1, max_batch_size=8\]"):
        make_buckets(8, 64, sizes)


def _engine(compile: bool, buckets) -> tuple[ModelEngine, KVPool]:
    source = resolve_model("tiny")
    params = load_params(source)
    engine = ModelEngine(params, source.config, EngineConfig(page_size=4, seed=0, max_pages_per_seq=16,
                                                             buckets=buckets, compile=compile))
    kv = KVPool.allocate(source.config, 40, 4, torch.float32, "cpu")
    return engine, engine.warmup(kv)


def _mixed_then_decode(engine: ModelEngine, kv: KVPool) -> list[dict[int, int]]:
    """Three prefills of different lengths (one mixed step), then decode steps of shrinking batch size."""
    params = SamplingParams(temperature=0.0)
    requests = {i: SequenceState(request=Request(request_id=i, prompt_token_ids=(5,) * 9, params=params))
                for i in range(3)}
    pages = {0: (1, 2, 3, 4), 1: (9, 8, 7, 6), 2: (20, 21, 22, 23)}
    prompts = {0: (3, 1, 4, 1, 5), 1: (9, 2, 6, 5, 3, 5, 8), 2: (2, 7)}
    seqs = [ScheduledSeq(request_id=i, token_ids=prompts[i], start_pos=0, pages=pages[i], sample=True) for i in range(3)]
    kv, sampled = engine.execute(kv, ScheduledBatch(seqs=tuple(seqs)), requests)
    history = [dict(sampled.tokens)]
    lengths = {i: len(prompts[i]) for i in range(3)}
    for live in ([0, 1, 2], [0, 2], [2]):
        seqs = [ScheduledSeq(request_id=i, token_ids=(history[-1].get(i, history[0][i]),), start_pos=lengths[i],
                             pages=pages[i], sample=True) for i in live]
        kv, sampled = engine.execute(kv, ScheduledBatch(seqs=tuple(seqs)), requests)
        for i in live:
            lengths[i] += 1
        history.append({**history[-1], **sampled.tokens})
    return history


def test_padding_to_buckets_does_not_change_any_token():
    exact = _mixed_then_decode(*_engine(False, None))
    padded = _mixed_then_decode(*_engine(False, make_buckets(4, 32, [1, 2, 4])))
    assert padded == exact


class _RecordAsserts(CustomGraphPass):
    """An inductor post-grad pass that only records the runtime-assert nodes of each compiled graph."""

    def __init__(self) -> None:
        self.per_graph: list[list[str]] = []

    def __call__(self, graph: torch.fx.Graph) -> None:
        asserts = (torch.ops.aten._assert_scalar.default, torch._check, torch._check_is_size)
        self.per_graph.append([str(node.target) for node in graph.nodes if node.target in asserts])

    def uuid(self) -> None:
        return None  # no cache entry: every graph is compiled, so every graph is seen


def test_compiled_graphs_hold_no_runtime_asserts():
    # A runtime assert in a graph made torch 2.11's AOTAutograd cache refuse it (a traced torch._check),
    # so every warm start on the H200 traced the three sampler variants again (session 14, same call:
    # warm 24.7 s with it, 22.6 without). The sampler's batch dimension is bounded by the token pool
    # instead: nothing is left to assert.
    torch._dynamo.reset()
    recorder = _RecordAsserts()
    source = resolve_model("tiny")
    engine = ModelEngine(load_params(source), source.config, EngineConfig(
        page_size=4, seed=0, max_pages_per_seq=16, buckets=make_buckets(4, 32, [1, 2, 4]), compile=True,
        inductor_options=(("post_grad_custom_post_pass", recorder),)))
    engine.warmup(KVPool.allocate(source.config, 40, 4, torch.float32, "cpu"))
    assert len(recorder.per_graph) >= 5 and not any(recorder.per_graph), recorder.per_graph


def test_compiled_step_serves_every_bucket_without_recompiling_after_warmup():
    torch._dynamo.reset()
    exact = _mixed_then_decode(*_engine(False, None))
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    # execute() runs under fail_on_recompile: any recompile after warm-up raises instead of passing.
    compiled = _mixed_then_decode(*_engine(True, make_buckets(4, 32, [1, 2, 4])))
    assert compiled == exact
    # Shape-generic after the first sizes: at most 3 graphs for the model half, and exactly one for each of
    # the sampler half's three variants (sort, sort-free, lean), one row included, for all seven buckets.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before <= 3 + 3


def test_bucket_key_is_hashable_for_graph_tables():
    assert len({BucketKey(num_tokens=4, num_seqs=4, decode=True), BucketKey(num_tokens=4, num_seqs=4, decode=True)}) == 1


def test_the_compile_cache_defaults_to_llmfx_but_respects_the_user(monkeypatch, tmp_path):
    from llmfx.startup import DEFAULT_COMPILE_CACHE, use_persistent_compile_cache

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "recorded")  # so that teardown restores the original
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    assert use_persistent_compile_cache() == DEFAULT_COMPILE_CACHE
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    assert use_persistent_compile_cache() == tmp_path


def test_unknown_cuda_graph_capture_is_refused_before_loading(monkeypatch):
    import llmfx.startup

    monkeypatch.setattr(llmfx.startup, "load_params", lambda *a, **k: pytest.fail("weights loaded before validation"))
    with pytest.raises(ValueError, match=r"cuda_graph_capture must be one of \('manual', 'inductor'\), got 'cupti'"):
        LLM("tiny", cuda_graph_capture="cupti")


def test_results_land_in_a_contiguous_pinned_slice():
    # A non-blocking device-to-host copy into a strided tensor goes through a temporary that is read
    # back before the device wrote it (wrong tokens on CUDA); the output slice must be contiguous.
    engine, kv = _engine(False, make_buckets(4, 32, [1, 2, 4]))
    requests = {i: SequenceState(request=Request(request_id=i, prompt_token_ids=(5,), params=SamplingParams()))
                for i in range(3)}
    seqs = tuple(ScheduledSeq(request_id=i, token_ids=(3,), start_pos=0, pages=(1 + i,), sample=True) for i in range(3))
    kv, inflight = engine.launch(kv, ScheduledBatch(seqs=seqs), requests)
    assert inflight.host.shape[0] == 4 and inflight.host.is_contiguous()
    assert set(engine.collect(inflight).sampled) == {0, 1, 2}


def _variant_of_a_step(engine, kv, params: list[SamplingParams]):
    """The SamplerVariant the engine runs one decode step of requests with these params with."""
    calls, step = [], engine._step
    engine._step = lambda *args: calls.append(args[-1]) or step(*args)
    requests = {i: SequenceState(request=Request(request_id=i, prompt_token_ids=(5,), params=p))
                for i, p in enumerate(params)}
    seqs = tuple(ScheduledSeq(request_id=i, token_ids=(3,), start_pos=0, pages=(1 + i,), sample=True)
                 for i in range(len(params)))
    engine.execute(kv, ScheduledBatch(seqs=seqs), requests)
    assert len(calls) == 1
    return calls[0]


GREEDY_LOGPROBS = SamplingParams(temperature=0.0, logprobs=2)
BEAM = SamplingParams(temperature=0.0, use_beam_search=True, beam_width=2)


@pytest.mark.parametrize(("min_rows", "params", "expected"), [
    # (filtering, noise, top_logprobs); the other row is greedy without logprobs
    (64, SamplingParams(temperature=0.0), (False, False, False)),  # nothing to sort or rank, at any size
    (64, GREEDY_LOGPROBS, (True, False, True)),  # a small batch takes its top-20 from the sort
    (1, GREEDY_LOGPROBS, (False, False, True)),
    (1, BEAM, (False, False, True)),  # beams choose among their top-20
    (1, SamplingParams(temperature=0.8, seed=1), (False, True, False)),
    (1, SamplingParams(temperature=0.0, top_k=3), (False, False, False)),  # greedy rows ignore their filters
    (1, SamplingParams(temperature=0.8, top_p=0.9), (True, True, True)),  # the sort gives the top-20 anyway
    (1, SamplingParams(temperature=0.8, min_p=0.1), (True, True, True)),
])
def test_a_batch_runs_the_sampler_variant_its_requests_allow(monkeypatch, min_rows, params, expected):
    monkeypatch.setitem(model_engine.SORT_FREE_MIN_ROWS, "cpu", min_rows)
    engine, kv = _engine(False, None)
    assert _variant_of_a_step(engine, kv, [SamplingParams(temperature=0.0), params]) == SamplerVariant(*expected)


def test_warmup_compiles_every_variant_a_bucket_can_run(monkeypatch):
    monkeypatch.setitem(model_engine.SORT_FREE_MIN_ROWS, "cpu", 2)
    source = resolve_model("tiny")
    engine = ModelEngine(load_params(source), source.config, EngineConfig(
        page_size=4, seed=0, max_pages_per_seq=16, buckets=make_buckets(4, 32, [1, 2, 4]), compile=True))
    variants = set()  # (rows, variant) of each step warm-up runs; the eager halves stand in for the compiled ones
    engine._forward_half, engine._sampler_half = model_engine.forward_step, model_engine.sample_step
    step = engine._step
    engine._step = lambda layers, inputs, *args: variants.add((inputs.logits_indices.shape[0], args[-1])) or step(
        layers, inputs, *args)
    engine.warmup(KVPool.allocate(source.config, 40, 4, torch.float32, "cpu"))
    sort, sort_free, lean = SamplerVariant(True, True, True), SamplerVariant(False, True, True), SamplerVariant(
        False, True, False)  # compiled steps always draw the noise
    assert variants == {(1, sort), (1, lean)} | {(rows, v) for rows in (2, 4) for v in (sort, sort_free, lean)}
    assert engine.sampler_variants(1) == (sort, lean)


@pytest.mark.parametrize(("temperatures", "noise"), [((0.0, 0.0), False), ((0.0, 0.7), True)])
def test_the_eager_step_skips_the_noise_only_for_a_greedy_batch(temperatures, noise):
    engine, kv = _engine(False, None)
    calls, step = [], engine._step
    engine._step = lambda *args: calls.append(args[-1].noise) or step(*args)
    requests = {i: SequenceState(request=Request(request_id=i, prompt_token_ids=(5,),
                                                 params=SamplingParams(temperature=t, seed=1)))
                for i, t in enumerate(temperatures)}
    seqs = tuple(ScheduledSeq(request_id=i, token_ids=(3,), start_pos=0, pages=(1 + i,), sample=True) for i in range(2))
    engine.execute(kv, ScheduledBatch(seqs=seqs), requests)
    assert calls == [noise]


def test_sizes_seen_by_other_compiles_in_the_process_stay_static(monkeypatch):
    # Dynamo keeps the sizes a function was compiled at for the whole process: after sample_step ran at two
    # other vocabularies (another engine, a test), automatic dynamic shapes made this engine's vocabulary a
    # symbol, and inductor's sampler compile failed on the H200 (session 18). The engine pins every size
    # that never changes; only the batch dimension is dynamic.
    from llmfx.testing.sampler_inputs import padding_sampler_inputs

    torch._dynamo.reset()
    seen = []

    def recording(gm, example_inputs):  # the sizes the graph was traced with, symbols included
        values = [node.meta.get("example_value") for node in gm.graph.nodes if node.op == "placeholder"]
        seen.append([tuple(v.shape) for v in values if isinstance(v, torch.Tensor)])
        return gm

    elsewhere = torch.compile(model_engine.sample_step, backend=recording, fullgraph=True)
    for vocab in (300, 400):
        elsewhere(*padding_sampler_inputs(2, vocab, dtype=torch.float32), True, True, True)
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, options=None, **kwargs: compile_(fn, backend=recording, **kwargs))
    seen.clear()
    engine, _ = _engine(True, make_buckets(4, 32, [1, 2, 4]))
    vocab = engine.cfg.vocab_size
    # The sampler's graphs: their first input is the logits [B, V]; B is a symbol, V must not be.
    sampler_graphs = [shapes for shapes in seen if len(shapes[0]) == 2 and not isinstance(shapes[0][0], int)]
    assert sampler_graphs, seen
    for shapes in sampler_graphs:
        assert shapes[0][1] == vocab and all(all(isinstance(size, int) for size in shape[1:]) for shape in shapes), \
            shapes
    torch._dynamo.reset()
