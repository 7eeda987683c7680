"""llmfx.records: positional builders make the same frozen records as the dataclasses' own __init__."""

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmfx.records import positional_builder
from llmfx.sampling_params import SamplingParams
from llmfx.scheduler import Beam, Request, ScheduledSeq, SequenceState, TokenEvent, _token_event_of

ids = st.tuples(*[st.integers(0, 1000)] * 3)
small = st.integers(0, 1 << 20)
request = st.builds(Request, request_id=small, prompt_token_ids=ids, params=st.just(SamplingParams()))


@given(request, ids, small, ids, small, st.none() | st.builds(Beam, seq_id=small))
def test_sequence_state_built_positionally_equals_the_keyword_one(req, out, computed, pages, inflight, beam):
    built = positional_builder(SequenceState)(req, out, computed, pages, inflight, beam)
    made = SequenceState(request=req, output_token_ids=out, num_computed_tokens=computed, pages=pages,
                         num_inflight=inflight, beam=beam)
    assert type(built) is SequenceState and built == made and hash(built) == hash(made)


@given(small, ids, small, ids, st.booleans(), st.sampled_from([None, "stop", "length"]), st.none() | small)
def test_scheduled_seq_and_token_event_built_positionally_equal_the_keyword_ones(rid, tokens, start, pages, sample,
                                                                               finish, stop):
    assert positional_builder(ScheduledSeq)(rid, tokens, start, pages, sample) == ScheduledSeq(
        request_id=rid, token_ids=tokens, start_pos=start, pages=pages, sample=sample)
    event = _token_event_of((rid, tokens, finish, stop, ()))
    assert type(event) is TokenEvent and event == TokenEvent(request_id=rid, new_token_ids=tokens,
                                                             finish_reason=finish, stop_reason=stop)


def test_built_records_stay_frozen():
    seq = positional_builder(ScheduledSeq)(1, (2,), 0, (1,), True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        seq.request_id = 3
    with pytest.raises(AttributeError):
        _token_event_of((1, (2,), None, None, ())).request_id = 3


def test_builder_refuses_what_it_would_build_wrong():
    @dataclasses.dataclass(frozen=True)
    class Unslotted:
        a: int

    @dataclasses.dataclass(frozen=True, slots=True)
    class Validated:
        a: int

        def __post_init__(self):
            assert self.a > 0

    with pytest.raises(TypeError, match="slotted dataclass"):
        positional_builder(Unslotted)
    with pytest.raises(TypeError, match="__post_init__"):
        positional_builder(Validated)
    with pytest.raises(TypeError, match="slotted dataclass"):
        positional_builder(int)
