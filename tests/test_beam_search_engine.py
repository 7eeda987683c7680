"""Beam search end to end: parity with transformers' num_beams search, continuous batching, aborts, streaming."""

from __future__ import annotations

import time

import pytest
import torch

from llmfx.executor import AddRequest, ExecutorState, has_pending_work, step
from llmfx.kv_cache import KvCacheConfig, num_available
from llmfx.llm import LLM
from llmfx.sampling_params import SamplingParams
from llmfx.scheduler import Request
from llmfx.startup import build_engine
from llmfx.weights import resolve_model
from tests.conftest import make_hf_model

EOS = 32  # a token the random model below picks often, so hypotheses finish and early_stopping matters
PROMPTS = [torch.randint(0, 96, (7,), generator=torch.Generator().manual_seed(seed)).tolist() for seed in (0, 3)]
# (beam_width, length_penalty, early_stopping, max_new_tokens)
SEARCHES = [(2, 1.0, True, 10), (2, 1.0, False, 10), (3, 2.0, True, 10), (3, 2.0, False, 10), (4, 0.0, "never", 10),
            (2, 1.0, "never", 14), (3, -1.0, False, 10)]
CASES = [(p, *search) for p in range(len(PROMPTS)) for search in SEARCHES]


def beam_params(width, length_penalty, early_stopping, max_tokens, n=None):
    return SamplingParams(use_beam_search=True, beam_width=width, n=n or width, temperature=0.0,
                          length_penalty=length_penalty, early_stopping=early_stopping, max_tokens=max_tokens,
                          detokenize=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random fp32 Llama whose EOS is EOS, saved for llmfx."""
    model = make_hf_model("llama")
    model.config.eos_token_id = EOS
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = EOS
    path = tmp_path_factory.mktemp("beam-llama")
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def llmfx_outputs(checkpoint):
    """Every case's llmfx output, all searched at once in one continuous batch."""
    with LLM(checkpoint[1], skip_tokenizer_init=True, kv_cache_config=KvCacheConfig(page_size=4, max_tokens=2048)) as llm:
        outputs = llm.generate([PROMPTS[p] for p, *_ in CASES], [beam_params(*search) for _, *search in CASES],
                               use_tqdm=False)
        pool = llm.scheduler_state.pool
        assert num_available(pool) == pool.num_pages - 1
    return dict(zip(CASES, outputs))


def transformers_beam_search(model, prompt, width, length_penalty, early_stopping, max_new_tokens):
    """(generated tokens, sequences_scores) of transformers' num_beams search, best first."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             num_beams=width, do_sample=False, length_penalty=length_penalty,
                             early_stopping=early_stopping, max_new_tokens=max_new_tokens, num_return_sequences=width,
                             output_scores=True, return_dict_in_generate=True)
    lengths = (out.beam_indices >= 0).sum(dim=1).tolist()  # generated tokens of each returned sequence
    return [(tuple(out.sequences[k, len(prompt): len(prompt) + n].tolist()), out.sequences_scores[k].item())
            for k, n in enumerate(lengths)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "prompt{}-w{}-lp{}-es{}-max{}".format(*c))
def test_beam_search_equals_transformers_num_beams_search(checkpoint, llmfx_outputs, case):
    p, width, length_penalty, early_stopping, max_new = case
    expected = transformers_beam_search(checkpoint[0], PROMPTS[p], width, length_penalty, early_stopping, max_new)
    outputs = llmfx_outputs[case].outputs
    assert [o.token_ids for o in outputs] == [tokens for tokens, _ in expected]
    assert [o.score for o in outputs] == pytest.approx([score for _, score in expected], rel=1e-4)
    for o in outputs:
        assert o.cumulative_logprob == pytest.approx(o.score * len(o.token_ids) ** length_penalty)
        assert o.finish_reason == ("stop" if o.token_ids[-1] == EOS else "length")


def test_the_parity_cases_reach_eos_and_depend_on_early_stopping(llmfx_outputs):
    reasons = {o.finish_reason for out in llmfx_outputs.values() for o in out.outputs}
    assert reasons == {"stop", "length"}
    by_rule = {}
    for (p, width, lp, rule, max_new), out in llmfx_outputs.items():
        by_rule.setdefault((p, width, lp, max_new), set()).add(tuple(o.token_ids for o in out.outputs))
    assert any(len(found) > 1 for found in by_rule.values())  # early_stopping changed the result


def _run(path, requests, overlap):
    """Drive the executor by hand: each request's events, and the launched batches."""
    parts = build_engine(resolve_model(path), device=torch.device("cpu"), max_batch_size=8, max_num_tokens=12,
                         max_seq_len=64, kv_cache_config=KvCacheConfig(page_size=4, max_tokens=512), overlap=overlap)
    state = ExecutorState(sched=parts.state.sched, kv=parts.engine.warmup(parts.state.kv))
    pending, events, batches = list(requests), {}, []
    while pending or has_pending_work(state):
        state, out = step(state, [AddRequest(pending.pop(0))] if pending else [], parts.engine, parts.cfg)
        batches.append(out.batch)
        for e in out.events:
            events.setdefault(e.request_id, []).append(e)
    assert not state.sched.pool.refcounts
    return events, batches


@pytest.mark.parametrize("overlap", [True, False])
def test_a_beam_search_beside_other_requests_changes_neither(checkpoint, overlap):
    beam = Request(request_id=0, prompt_token_ids=tuple(PROMPTS[1]) * 2, params=beam_params(3, 1.0, False, 10),
                   eos_token_ids=frozenset({EOS}), beam_ids=(0, 1, 2))
    others = [Request(request_id=10 + i, prompt_token_ids=tuple(range(5 + i, 25 + 3 * i)), eos_token_ids=frozenset({EOS}),
                      params=SamplingParams(temperature=t, seed=7, max_tokens=12, detokenize=False))
              for i, t in enumerate([0.0, 0.8, 0.0])]
    together, batches = _run(checkpoint[1], [others[0], beam, *others[1:]], overlap)
    alone = _run(checkpoint[1], [beam], overlap)[0]
    found, expected = together[0][-1].hypotheses, alone[0][-1].hypotheses
    assert [(h.token_ids, h.finish_reason) for h in found] == [(h.token_ids, h.finish_reason) for h in expected]
    # Batch composition moves float32 logits by rounding only.
    assert [h.score for h in found] == pytest.approx([h.score for h in expected], rel=1e-5)
    for r in others:
        tokens = lambda events: [t for e in events[r.request_id] for t in e.new_token_ids]
        assert tokens(together) == tokens(_run(checkpoint[1], [r], overlap)[0])
    beam_rows = set(range(3))
    assert any(b.page_copies for b in batches)  # forks copied partial pages on the device
    assert any({s.request_id for s in b.seqs} & beam_rows and {s.request_id for s in b.seqs} - beam_rows
               for b in batches)  # beams and other requests shared steps


@pytest.fixture(scope="module")
def tiny():
    with LLM("tiny", kv_cache_config=KvCacheConfig(page_size=4, max_tokens=4096)) as llm:
        yield llm


def test_outputs_are_the_n_best_hypotheses_detokenized(tiny):
    params = SamplingParams(use_beam_search=True, beam_width=4, n=2, temperature=0.0, max_tokens=8, ignore_eos=True)
    out = tiny.generate("Beams of", params)
    assert [o.index for o in out.outputs] == [0, 1] and out.outputs[0].score >= out.outputs[1].score
    for o in out.outputs:
        assert o.text == tiny.tokenizer.decode(list(o.token_ids)) and len(o.token_ids) == 8
        assert o.cumulative_logprob == pytest.approx(o.score * 8)
    assert out.metrics.num_generated_tokens == 16


def test_streaming_a_beam_search_delivers_the_final_output_only(tiny):
    params = SamplingParams(use_beam_search=True, beam_width=2, temperature=0.0, max_tokens=6, ignore_eos=True)
    updates = list(tiny.generate_async("stream beams", params, streaming=True))
    assert len(updates) == 1 and updates[0].finished and updates[0].outputs[0].text_diff == updates[0].outputs[0].text


def test_aborting_a_beam_search_frees_every_page(tiny):
    params = SamplingParams(use_beam_search=True, beam_width=3, temperature=0.0, max_tokens=900, ignore_eos=True)
    handle = tiny.generate_async("abort these beams", params)
    deadline = time.monotonic() + 30
    while not any(s.output_token_ids for s in tiny.scheduler_state.running) and time.monotonic() < deadline:
        time.sleep(0.01)
    handle.abort()
    final = handle.result(timeout=30)
    assert [o.finish_reason for o in final.outputs] == ["abort"]
    pool = tiny.scheduler_state.pool
    while num_available(pool) != pool.num_pages - 1 and time.monotonic() < deadline:
        time.sleep(0.01)
        pool = tiny.scheduler_state.pool
    assert num_available(pool) == pool.num_pages - 1
