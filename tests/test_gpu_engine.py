"""The GPU engine on an H200: CUDA-graph buckets equal the eager path, never skip, never recompile."""

from __future__ import annotations

import pytest
import torch

from llmfx.buckets import make_buckets
from llmfx.kv_cache import KvCacheConfig
from llmfx.kv_pool import KVPool
from llmfx.llm import LLM
from llmfx import model_engine
from llmfx.model_engine import EngineConfig, ModelEngine, SamplerVariant, step_fn
from llmfx.sampling_params import SamplingParams
from llmfx.scheduler import Request, ScheduledBatch, ScheduledSeq, SequenceState
from llmfx.weights import load_params, resolve_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, detokenize=False)
MIXED = [[(7 * i + 3 * j) % 96 for j in range(n)] for i, n in enumerate([3, 17, 40, 9, 28, 1, 64, 12, 5, 33])]


def _serve(path, **kwargs) -> list[tuple[int, ...]]:
    with LLM(path, skip_tokenizer_init=True, dtype="float32", device="cuda", max_batch_size=8, max_num_tokens=64,
             kv_cache_config=KvCacheConfig(page_size=4, max_tokens=4096), **kwargs) as llm:
        outs = llm.generate(MIXED, [GREEDY, SamplingParams(temperature=0.8, seed=3, max_tokens=40, ignore_eos=True,
                                                            detokenize=False)] * 5, use_tqdm=False)
    assert all(o.outputs[0].finish_reason == "length" for o in outs), [o.outputs[0].error for o in outs]
    return [o.token_ids for o in outs]


def test_cuda_graph_buckets_equal_the_eager_path_without_skips(hf_checkpoint):
    _, path = hf_checkpoint("llama")
    eager = _serve(path, enforce_eager=True)
    skips_before = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
    graphs = _serve(path, cuda_graph_capture="inductor")  # a recompile after warm-up fails its step: "error"
    assert graphs == eager
    assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == skips_before == 0


def test_graphs_captured_by_hand_equal_inductors_and_the_eager_path(hf_checkpoint, monkeypatch):
    monkeypatch.setitem(model_engine.SORT_FREE_MIN_ROWS, "cuda", 4)  # buckets 4 and 8 get all three sampler variants
    _, path = hf_checkpoint("llama")
    assert _serve(path, cuda_graph_capture="manual") == _serve(path, enforce_eager=True)
    with LLM(path, skip_tokenizer_init=True, dtype="float32", device="cuda", max_batch_size=8, max_num_tokens=64,
             kv_cache_config=KvCacheConfig(page_size=4, max_tokens=4096), cuda_graph_capture="manual") as llm:
        engine = llm._engine
        keys = engine.engine_cfg.buckets.all_keys()
        forward, sampler = set(engine._forward_graphs), set(engine._sampler_graphs)
        assert forward == {engine._layout_of(k) for k in keys}
        assert sampler == {(engine._layout_of(k), v) for k in keys for v in engine.sampler_variants(k.num_seqs)}
        assert {len(engine.sampler_variants(k.num_seqs)) for k in keys} == {2, 3}
        llm.generate(MIXED, GREEDY, use_tqdm=False)
        assert (set(engine._forward_graphs), set(engine._sampler_graphs)) == (forward, sampler)  # never captures


@pytest.mark.parametrize("capture", ["manual", "inductor"])
def test_every_compiled_step_equals_the_eager_step_on_the_same_inputs(hf_checkpoint, capture, monkeypatch):
    # Stricter than comparing finished outputs: after each replay, step_fn runs eagerly on the very
    # inputs the graph read (same staged buffer, KV pool and token pool), and every sampled token,
    # and the top-20 where the variant computes it, must match. Seeded sampled rows make the noise
    # path count, not only the argmax. The eager step always filters and ranks: once the short top-p
    # request finishes, the graphs run the sampler without the filters (top-20 by topk), and once
    # the logprobs request finishes, without the top-20 too; each must sample the same tokens.
    monkeypatch.setitem(model_engine.SORT_FREE_MIN_ROWS, "cuda", 1)  # every bucket has all three variants
    _, path = hf_checkpoint("qwen2")
    compared, variants = [], set()
    with LLM(path, skip_tokenizer_init=True, dtype="float32", device="cuda", max_batch_size=8, max_num_tokens=64,
             kv_cache_config=KvCacheConfig(page_size=4, max_tokens=4096), cuda_graph_capture=capture,
             disable_overlap_scheduler=True) as llm:
        engine = llm._engine
        launch, choose = engine.launch, engine._sampler_variant
        chosen = []
        engine._sampler_variant = lambda *args: chosen.append(choose(*args)) or chosen[-1]

        def launch_and_compare(kv, batch, sequences):
            layers = kv.layers
            kv, inflight = launch(kv, batch, sequences)
            torch.cuda.synchronize()
            n, variant = len(batch.seqs), chosen[-1]
            variants.add(variant)
            columns = [0, *range(3, 8)] if variant.top_logprobs else [0]  # the token, then the top-5 ids
            layout = engine._layout(batch)
            with torch.inference_mode():
                eager = step_fn(engine.params, engine.cfg, layers,
                                *engine._step_args(layout, engine._penalties_of(layout.num_seqs)), filtering=True)
            compared.append((layout, inflight.host[:n, columns].tolist(), eager[:n, columns].cpu().tolist()))
            return kv, inflight

        engine.launch = launch_and_compare
        top_p = SamplingParams(temperature=0.9, top_p=0.8, seed=5, max_tokens=6, ignore_eos=True, detokenize=False)
        logprobs = SamplingParams(temperature=0.0, logprobs=3, max_tokens=14, ignore_eos=True, detokenize=False)
        llm.generate(MIXED, [GREEDY, SamplingParams(temperature=0.8, seed=3, max_tokens=40, ignore_eos=True,
                                                    detokenize=False), logprobs, top_p, GREEDY] * 2, use_tqdm=False)
    assert len({layout for layout, _, _ in compared}) >= 3  # decode and mixed buckets both ran
    assert variants == {SamplerVariant(True, True, True), SamplerVariant(False, True, True),
                        SamplerVariant(False, True, False)}  # sort, sort-free, lean
    assert [(layout, graph) for layout, graph, _ in compared] == [(layout, eager) for layout, _, eager in compared]


@pytest.mark.parametrize("dtype, enforce_eager", [("float32", False), ("bfloat16", True)])
def test_launch_and_reading_results_never_synchronize_with_the_device(hf_checkpoint, monkeypatch, dtype,
                                                                      enforce_eager):
    monkeypatch.setitem(model_engine.SORT_FREE_MIN_ROWS, "cuda", 1)
    # torch raises on any synchronizing call (item, tolist, pageable copy, nonzero) while the guard is
    # on; the requests cover both sampler variants, penalties (their scatter) and beams (page copies).
    # Eager bf16 runs every op and every Triton wrapper's host code (the GEMV / matmul routing, the
    # attention and rope + KV launches) at every step under the guard; compiled, they ran at capture.
    _, path = hf_checkpoint("llama")
    params = [GREEDY, SamplingParams(temperature=0.8, top_p=0.9, seed=1, max_tokens=40, ignore_eos=True,
                                     detokenize=False),
              SamplingParams(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.5, max_tokens=40,
                             ignore_eos=True, detokenize=False),
              SamplingParams(use_beam_search=True, beam_width=3, n=2, temperature=0.0, max_tokens=40, ignore_eos=True,
                             detokenize=False), GREEDY]
    launched = []
    with LLM(path, skip_tokenizer_init=True, dtype=dtype, device="cuda", max_batch_size=16, max_num_tokens=64,
             enforce_eager=enforce_eager, kv_cache_config=KvCacheConfig(page_size=4, max_tokens=4096)) as llm:
        engine = llm._engine
        launch = engine.launch

        def guarded_launch(kv, batch, sequences):
            torch.cuda.set_sync_debug_mode("error")
            try:
                result = launch(kv, batch, sequences)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            launched.append(bool(batch.page_copies))
            return result

        def guarded_collect(inflight):
            inflight.ready.synchronize()  # the step's one intended sync; reading its results must add none
            torch.cuda.set_sync_debug_mode("error")
            try:
                result = model_engine.read_results(inflight)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            collected.append(len(result.sampled))
            return result

        collected = []
        engine.launch, engine.collect = guarded_launch, guarded_collect
        outs = llm.generate(MIXED, params * 2, use_tqdm=False)
    assert all(o.finish_reason == "length" for out in outs for o in out.outputs), [o.outputs[0].error for o in outs]
    assert len(launched) >= 40 and any(launched)  # every step guarded, beams' page copies among them
    assert len(collected) == len(launched)  # and every step's results read under the guard


@pytest.mark.parametrize("enforce_eager", [False, True])
def test_overlap_on_and_off_give_identical_outputs_on_gpu(hf_checkpoint, enforce_eager):
    _, path = hf_checkpoint("qwen2")
    assert _serve(path, enforce_eager=enforce_eager) == _serve(path, enforce_eager=enforce_eager,
                                                               disable_overlap_scheduler=True)


def test_beam_search_through_cuda_graphs_equals_the_eager_path(hf_checkpoint):
    _, path = hf_checkpoint("llama")
    beams = [SamplingParams(use_beam_search=True, beam_width=w, n=w, temperature=0.0, max_tokens=30, ignore_eos=True,
                            length_penalty=lp, detokenize=False) for w, lp in ((2, 1.0), (4, 0.0), (3, 2.0))]
    params = [beams[i % 3] if i % 2 else GREEDY for i in range(len(MIXED))]

    def serve(**kwargs):
        with LLM(path, skip_tokenizer_init=True, dtype="float32", device="cuda", max_batch_size=16, max_num_tokens=64,
                 kv_cache_config=KvCacheConfig(page_size=4, max_tokens=4096), **kwargs) as llm:
            outs = llm.generate(MIXED, params, use_tqdm=False)
        assert all(o.finish_reason == "length" for out in outs for o in out.outputs), [o.outputs[0].error for o in outs]
        return [[o.token_ids for o in out.outputs] for out in outs]

    skips_before = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
    assert serve() == serve(enforce_eager=True)  # page copies run beside the graphs, before each replay
    assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == skips_before == 0


def _recorded_graphs() -> int:
    from torch._inductor.cudagraph_trees import get_container

    manager = get_container(torch.cuda.current_device()).tree_manager
    if manager is None:
        return 0

    def count(nodes) -> int:
        return sum(1 + count([c for cs in node.children.values() for c in cs]) for node in nodes)

    return count([n for nodes in manager.roots.values() for n in nodes])


def test_every_bucket_is_recorded_at_warmup_and_only_replayed_after(hf_checkpoint):
    torch._dynamo.reset()
    _, path = hf_checkpoint("qwen3")
    source = resolve_model(path)
    params = load_params(source, device="cuda")
    buckets = make_buckets(8, 64, [1, 2, 4, 8])
    engine = ModelEngine(params, source.config, EngineConfig(page_size=4, seed=0, max_pages_per_seq=32,
                                                             buckets=buckets, compile=True, graph_capture="inductor"))
    kv = engine.warmup(KVPool.allocate(source.config, 140, 4, torch.float32, "cuda"))
    recorded = _recorded_graphs()
    assert recorded >= len(buckets.all_keys())
    requests = {i: SequenceState(request=Request(request_id=i, prompt_token_ids=(1,), params=GREEDY))
                for i in range(8)}
    for sizes in ([5], [1, 1, 1], [30, 1, 1], [1] * 8, [60], [1, 1]):
        seqs = tuple(ScheduledSeq(request_id=i, token_ids=(2,) * n, start_pos=0, pages=tuple(range(1 + 16 * i, 17 + 16 * i)),
                                  sample=True) for i, n in enumerate(sizes))
        kv, sampled = engine.execute(kv, ScheduledBatch(seqs=seqs), requests)
        assert set(sampled.sampled) == set(range(len(sizes)))
    assert _recorded_graphs() == recorded
