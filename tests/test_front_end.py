"""The front end's per-token delivery (LLM._dispatch -> RequestHandle) driven by hand-made step outputs.

Most tokens of a non-streaming request take a path that only appends them; these tests pin that it
gives what the full per-token path gives, and that everything it leaves out still happens.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from types import MappingProxyType

import pytest

from llmfx.executor import StepOutput
from llmfx.llm import LLM, RequestHandle
from llmfx.model_engine import SampledToken
from llmfx.sampling_params import SamplingParams
from llmfx.scheduler import Request, TokenEvent
from llmfx.tokenizer import ByteTokenizer

QUIET = SamplingParams(max_tokens=8, ignore_eos=True, detokenize=False)


class _Executor:
    """Records the aborts the front end asks for."""

    def __init__(self) -> None:
        self.aborted: list[int] = []

    def abort(self, request_ids) -> None:
        self.aborted.extend(request_ids)


def _front_end(tokenizer=None) -> LLM:
    """An LLM without an engine: only what delivery touches."""
    llm = object.__new__(LLM)
    llm.tokenizer, llm._handles, llm._lock, llm._executor = tokenizer, {}, threading.Lock(), _Executor()
    llm._sinks = {}
    return llm


def _submit(llm: LLM, params: SamplingParams, request_ids, streaming: bool = False, keep: int = 1) -> RequestHandle:
    requests = [Request(request_id=r, prompt_token_ids=(1, 2, 3), params=params) for r in request_ids]
    handle = RequestHandle(llm, requests, None, keep, streaming)
    llm._handles.update(dict.fromkeys(request_ids, handle))
    return handle


def _step(tokens: dict[int, int], finished=(), logprob=lambda rid: -0.5) -> StepOutput:
    """One step: request id -> its new token; those in `finished` end at "length"."""
    return StepOutput(
        events=tuple(TokenEvent(request_id=r, new_token_ids=(t,), finish_reason="length" if r in finished else None)
                     for r, t in tokens.items()),
        sampled=MappingProxyType({r: SampledToken(token=t, logprob=logprob(r), rank=1, top_ids=(), top_logprobs=())
                                  for r, t in tokens.items()}))


def test_non_streaming_output_equals_the_final_streaming_snapshot():
    llm = _front_end()
    quiet, streamed = _submit(llm, QUIET, [0]), _submit(llm, QUIET, [1], streaming=True)
    for t in range(8):
        llm._dispatch(_step({0: 10 + t, 1: 10 + t}, finished={0, 1} if t == 7 else (), logprob=lambda r: -0.25 * t))
    a, b = quiet.result(timeout=0), streamed.result(timeout=0)
    assert a.outputs == b.outputs
    assert a.outputs[0].token_ids == tuple(range(10, 18)) and a.outputs[0].token_ids_diff == (17,)
    assert a.outputs[0].cumulative_logprob == pytest.approx(-0.25 * sum(range(8)))
    assert a.metrics.num_generated_tokens == b.metrics.num_generated_tokens == 8
    assert len(list(streamed)) == 8 and list(quiet) == [a]  # a non-streaming request publishes only its end


def test_first_token_time_is_the_first_tokens_even_without_streaming():
    llm = _front_end()
    handle = _submit(llm, QUIET, [0])
    before = time.monotonic()
    llm._dispatch(_step({0: 5}))
    after_first = time.monotonic()
    time.sleep(0.01)
    llm._dispatch(_step({0: 6}))
    llm._dispatch(_step({0: 7}, finished={0}))
    metrics = handle.result(timeout=0).metrics
    assert before <= metrics.first_token_time <= after_first < metrics.finished_time


def test_best_of_keeps_the_highest_cumulative_logprob_summed_over_every_token():
    llm = _front_end()
    handle = _submit(llm, QUIET, [0, 1, 2], keep=1)
    for t in range(6):  # sequence 1 starts least likely but is the most likely over all six tokens
        first = {0: -0.3, 1: -1.0, 2: -2.0}
        llm._dispatch(_step({0: 1, 1: 2, 2: 3}, finished={0, 1, 2} if t == 5 else (),
                            logprob=lambda r: first[r] if t == 0 or r != 1 else -0.01))
    (kept,) = handle.result(timeout=0).outputs
    assert kept.index == 1 and kept.token_ids == (2,) * 6
    assert kept.cumulative_logprob == pytest.approx(-1.05)


def test_tokens_after_a_sequence_finished_are_dropped():
    llm = _front_end()
    handle = _submit(llm, QUIET, [0, 1], keep=2)
    llm._dispatch(_step({0: 4, 1: 4}))
    llm._dispatch(_step({0: 5, 1: 5}, finished={0}))
    llm._dispatch(_step({0: 6, 1: 6}))  # 0 already ended: a stale token of an overlapped step
    llm._dispatch(_step({1: 7}, finished={1}))
    first, second = handle.result(timeout=0).outputs
    assert first.token_ids == (4, 5) and second.token_ids == (4, 5, 6, 7)


def test_steady_tokens_of_a_batch_job_skip_the_handle_and_nothing_is_left_behind(monkeypatch):
    llm = _front_end()
    quiet, logged = _submit(llm, QUIET, [0, 1], keep=2), _submit(llm, replace(QUIET, logprobs=0), [2])
    calls = []
    on_event = RequestHandle._on_event
    monkeypatch.setattr(RequestHandle, "_on_event", lambda self, event, *a: (calls.append(event.request_id),
                                                                             on_event(self, event, *a))[1])
    for t in range(5):
        llm._dispatch(_step({0: t, 1: t, 2: t}, finished={0, 1, 2} if t == 4 else ()))
    # The batch job's sequences: their first token and their last; the logprobs request: every token.
    assert sorted(calls) == [0, 0, 1, 1] + [2] * 5
    assert [o.token_ids for o in quiet.result(timeout=0).outputs] == [(0, 1, 2, 3, 4)] * 2
    assert logged.result(timeout=0).outputs[0].token_ids == (0, 1, 2, 3, 4)
    assert llm._sinks == {} and llm._handles == {}


def test_logprobs_are_kept_for_every_token_without_streaming():
    llm = _front_end()
    handle = _submit(llm, replace(QUIET, logprobs=0), [0])
    for t in range(4):
        llm._dispatch(_step({0: 20 + t}, finished={0} if t == 3 else ()))
    out = handle.result(timeout=0).outputs[0]
    assert [list(lp) for lp in out.logprobs] == [[20], [21], [22], [23]]


def test_a_stop_string_ends_a_non_streaming_request_and_aborts_it_in_the_engine():
    llm = _front_end(ByteTokenizer())
    handle = _submit(llm, SamplingParams(max_tokens=20, ignore_eos=True, stop=("cd",)), [0])
    for byte in b"abcde":
        llm._dispatch(_step({0: byte}))
    out = handle.result(timeout=0).outputs[0]
    assert (out.text, out.finish_reason, out.stop_reason) == ("ab", "stop", "cd")
    assert llm._executor.aborted == [0]
