"""The overlap scheduler: step n+1 launches before step n is postprocessed, and outputs do not change."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmfx.executor import AddRequest, ExecutorState, has_pending_work, step
from llmfx.kv_cache import KvCacheConfig
from llmfx.llm import LLM
from llmfx.sampling_params import SamplingParams
from llmfx.scheduler import Request, SchedulerConfig
from llmfx.startup import build_engine
from llmfx.weights import resolve_model

SOURCE = resolve_model("tiny")


def _run(requests: list[Request], *, overlap: bool, policy: str, kv_tokens: int):
    """Drive the executor by hand (no thread): outputs per request and the batch log."""
    parts = build_engine(SOURCE, device=torch.device("cpu"), max_batch_size=4, max_num_tokens=24, max_seq_len=256,
                         kv_cache_config=KvCacheConfig(page_size=4, max_tokens=kv_tokens),
                         scheduler_config=SchedulerConfig(capacity_scheduler_policy=policy), overlap=overlap)
    state = ExecutorState(sched=parts.state.sched, kv=parts.engine.warmup(parts.state.kv))
    inbox = [AddRequest(r) for r in requests]
    tokens = {r.request_id: [] for r in requests}
    finish = {}
    batches = []
    while inbox or has_pending_work(state):
        state, out = step(state, inbox, parts.engine, parts.cfg)
        inbox = []
        batches.append(out.batch)
        for e in out.events:
            tokens[e.request_id].extend(e.new_token_ids)
            if e.finish_reason:
                finish[e.request_id] = (e.finish_reason, e.stop_reason)
    return tokens, finish, batches


def _requests(draw_lengths, params) -> list[Request]:
    return [Request(request_id=i, prompt_token_ids=tuple((13 * i + 7 * j) % 250 for j in range(n)), params=p,
                    eos_token_ids=frozenset({257})) for i, (n, p) in enumerate(zip(draw_lengths, params))]


params_strategy = st.builds(
    SamplingParams,
    max_tokens=st.integers(1, 12),
    temperature=st.sampled_from([0.0, 0.7]),
    seed=st.integers(0, 5),
    ignore_eos=st.just(True),
    detokenize=st.just(False),
    repetition_penalty=st.sampled_from([1.0, 1.3]),
    frequency_penalty=st.sampled_from([0.0, 0.5]),
    stop_token_ids=st.sampled_from([(), (65,), (32, 101)]),
)


@settings(max_examples=12, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 30), params_strategy), min_size=1, max_size=6),
       st.sampled_from(["guaranteed_no_evict", "max_utilization"]), st.sampled_from([48, 200]))
def test_overlap_on_and_off_give_identical_outputs(work, policy, kv_tokens):
    requests = _requests([n for n, _ in work], [p for _, p in work])
    if any(len(r.prompt_token_ids) + r.params.max_tokens > kv_tokens for r in requests):
        return
    on = _run(requests, overlap=True, policy=policy, kv_tokens=kv_tokens)
    off = _run(requests, overlap=False, policy=policy, kv_tokens=kv_tokens)
    assert on[0] == off[0] and on[1] == off[1]


def test_a_request_stopped_by_a_token_runs_one_extra_step_whose_token_is_dropped():
    free = _run(_requests([9], [SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)]),
                overlap=False, policy="guaranteed_no_evict", kv_tokens=200)[0][0]
    stop_at = free[3]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, stop_token_ids=(stop_at,))
    tokens, finish, batches = _run(_requests([9], [params]), overlap=True, policy="guaranteed_no_evict", kv_tokens=200)
    kept = free[: free.index(stop_at) + 1]
    assert tokens[0] == kept and finish[0] == ("stop", stop_at)
    steps_with_it = sum(1 for b in batches if any(s.request_id == 0 for s in b.seqs))
    assert steps_with_it == len(kept) + 1  # the prefill, len(kept) - 1 decodes, and one extra decode


def test_llm_outputs_match_with_the_overlap_scheduler_disabled():
    prompts = ["overlap", "is invisible", "to the user", "x"]
    params = [SamplingParams(temperature=t, seed=9, max_tokens=20, ignore_eos=True, logprobs=2) for t in (0, 1, 0.5, 0)]
    results = []
    for disable in (False, True):
        with LLM("tiny", disable_overlap_scheduler=disable, kv_cache_config=KvCacheConfig(max_tokens=512)) as llm:
            results.append(llm.generate(prompts, params, use_tqdm=False))
    on, off = results
    assert [o.token_ids for o in on] == [o.token_ids for o in off]
    assert [o.outputs[0].logprobs for o in on] == [o.outputs[0].logprobs for o in off]


def test_each_step_reports_the_batch_it_postprocessed():
    for overlap in (False, True):
        parts = build_engine(SOURCE, device=torch.device("cpu"), max_batch_size=4, max_num_tokens=24,
                             max_seq_len=64, kv_cache_config=KvCacheConfig(page_size=4, max_tokens=256),
                             overlap=overlap)
        state = ExecutorState(sched=parts.state.sched, kv=parts.engine.warmup(parts.state.kv))
        inbox = [AddRequest(r) for r in _requests([5, 9], [SamplingParams(temperature=0.0, max_tokens=3,
                                                                          ignore_eos=True)] * 2)]
        launched, collected = [], []
        while inbox or has_pending_work(state):
            state, out = step(state, inbox, parts.engine, parts.cfg)
            inbox = []
            launched.append(out.batch)
            collected.append(out.collected)
            assert out.collect_s >= 0.0 and (out.collected is not None or out.collect_s == 0.0)
        if overlap:  # step n postprocesses step n-1's batch; the first step has none yet
            assert collected[0] is None and collected[1:] == [b if b.seqs else None for b in launched[:-1]]
        else:
            assert collected == [b if b.seqs else None for b in launched]


def test_a_step_trace_records_every_iteration_while_it_is_open():
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    with LLM("tiny", kv_cache_config=KvCacheConfig(max_tokens=512)) as llm:
        with llm.trace_steps() as trace:
            with pytest.raises(RuntimeError, match="already recording"):
                with llm.trace_steps():
                    pass
            outs = llm.generate(["one", "two three"], params, use_tqdm=False)
        recorded = len(trace)
        llm.generate(["after"], params, use_tqdm=False)
    assert len(trace) == recorded  # closed: nothing more is appended
    assert trace[0].waited_for_work and all(t.start <= t.end for t in trace)
    assert all(a.end <= b.start for a, b in zip(trace, trace[1:]))
    assert [t.collected for t in trace[1:]] == [t.launched for t in trace[:-1]]  # overlap: one step later
    launched = [t.launched for t in trace if t.launched is not None]
    assert all(b.launch_s > 0 for b in launched)
    prompts = sum(len(o.prompt_token_ids) for o in outs)
    # Every prompt token and every output token but the last is fed once; two prompts, 4 tokens each.
    assert sum(b.num_tokens for b in launched) == prompts + 2 * 3
    assert sum(b.num_decode for b in launched) == 2 * 3
