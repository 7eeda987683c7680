"""Beam search: the pure selection step, beam groups in the scheduler (forks, page copies, waits), and the rules."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmfx.beam_search import BeamConfig, BeamRow, Hypothesis, beam_step
from llmfx.kv_cache import new_page_pool, num_available
from llmfx.sampling_params import SamplingParams
from llmfx.scheduler import (
    Request,
    SchedulerConfig,
    SchedulerLimits,
    abort,
    has_work,
    new_scheduler_state,
    postprocess,
    schedule,
    validate_request,
)
from llmfx.testing.strategies import EOS, fake_candidates, fake_token, reference_beam_search


def row(output, cumulative, *candidates):
    """A beam with output tokens, cumulative logprob and (token, logprob) candidates."""
    return BeamRow(output_token_ids=tuple(output), cumulative_logprob=cumulative,
                   candidates=(tuple(t for t, _ in candidates), tuple(lp for _, lp in candidates)))


def eos_finishes(token):
    return ("stop", None) if token == EOS else None


def cfg(width=2, length_penalty=1.0, early_stopping=False, max_new_tokens=10):
    return BeamConfig(width=width, length_penalty=length_penalty, early_stopping=early_stopping,
                      max_new_tokens=max_new_tokens)


# --- the selection step, worked by hand ---


def test_continuations_are_ranked_over_all_beams_by_total_logprob():
    beams = [row([3], -1.0, (5, -0.1), (6, -2.0)), row([4], -1.5, (7, -0.2), (8, -0.3))]
    running, hypotheses, done = beam_step(beams, (), eos_finishes, cfg())
    assert [(c.parent, c.token, c.cumulative_logprob) for c in running] == [(0, 5, -1.1), (1, 7, -1.7)]
    assert hypotheses == () and not done


def test_only_the_best_width_continuations_may_finish_scored_by_generated_length():
    beams = [row([3], -1.0, (EOS, -0.5), (5, -0.7), (6, -0.9)), row([4], -2.0, (EOS, -0.1), (7, -0.2))]
    running, hypotheses, done = beam_step(beams, (), eos_finishes, cfg(length_penalty=2.0))
    # Totals: (0, EOS) -1.5, (0, 5) -1.7, (0, 6) -1.9, (1, EOS) -2.1 (third best: a spare, not a hypothesis).
    assert hypotheses == (Hypothesis(token_ids=(3, EOS), cumulative_logprob=-1.5, score=-1.5 / 2 ** 2.0,
                                     finish_reason="stop"),)
    assert [(c.parent, c.token) for c in running] == [(0, 5), (0, 6)] and not done


def test_equal_totals_rank_the_lower_beam_then_the_lower_token_first():
    beams = [row([1], -1.0, (8, -1.0), (6, -1.0)), row([2], -1.0, (5, -1.0))]
    running, _, _ = beam_step(beams, (), eos_finishes, cfg(width=3))
    assert [(c.parent, c.token) for c in running] == [(0, 6), (0, 8), (1, 5)]


def test_at_the_length_limit_the_best_width_continuations_all_finish():
    beams = [row([1, 2], -1.0, (5, -0.5), (6, -0.6)), row([1, 3], -1.2, (7, -0.1))]
    running, hypotheses, done = beam_step(beams, (), lambda t: ("length", None), cfg(length_penalty=0.0))
    assert running == () and done
    assert [(h.token_ids, h.finish_reason) for h in hypotheses] == [((1, 3, 7), "length"), ((1, 2, 5), "length")]
    assert [h.score for h in hypotheses] == pytest.approx([-1.3, -1.5])


# W = 2, length penalty 1. A hypothesis of score -0.8 exists; this step finishes (1, EOS) with total
# -1.9, score -0.95 at length 2, so two hypotheses exist. The best running beam has total `best`.
@pytest.mark.parametrize(("early_stopping", "best", "done"), [
    (True, -1.0, True),  # two hypotheses: done, though -1.0 / 2 = -0.5 would beat -0.95
    (False, -1.8, False),  # -1.8 / 2 = -0.9 > -0.95: the best beam may still win at its current length
    (False, -1.95, True),  # -0.975 <= -0.95
    ("never", -1.95, False),  # judged at max_new_tokens = 10: -0.195 > -0.95
])
def test_early_stopping_decides_when_enough_hypotheses_end_the_search(early_stopping, best, done):
    first = Hypothesis(token_ids=(EOS,), cumulative_logprob=-0.8, score=-0.8, finish_reason="stop")
    beams = [row([1], -1.0, (EOS, -0.9), (5, best + 1.0))]
    _, hypotheses, is_done = beam_step(beams, (first,), eos_finishes, cfg(early_stopping=early_stopping))
    assert [h.score for h in hypotheses] == [-0.8, -0.95] and is_done == done


def test_never_with_a_negative_penalty_judges_the_best_running_beam_at_its_current_length():
    first = Hypothesis(token_ids=(EOS,), cumulative_logprob=-0.8, score=-0.8, finish_reason="stop")
    beams = [row([1], -1.0, (EOS, -0.9), (5, -0.1))]
    _, hypotheses, done = beam_step(beams, (first,), eos_finishes, cfg(length_penalty=-1.0, early_stopping="never"))
    # Kept scores -0.8 and -1.9 * 2 = -3.8; the running beam, -1.1 * 2 = -2.2 at length 2, may still win
    # (at max_new_tokens = 10 it would be -11, and the search would end).
    assert [h.score for h in hypotheses] == [-0.8, -3.8] and not done


@st.composite
def beam_rows(draw):
    """1..4 beams of one length with distinct-token candidates, best first."""
    length = draw(st.integers(0, 4))
    beams = []
    for _ in range(draw(st.integers(1, 4))):
        tokens = draw(st.lists(st.integers(0, 12), min_size=1, max_size=8, unique=True))
        logprobs = sorted(draw(st.lists(st.floats(-20, 0), min_size=len(tokens), max_size=len(tokens))), reverse=True)
        beams.append(BeamRow(output_token_ids=tuple(draw(st.lists(st.integers(0, 12), min_size=length,
                                                                  max_size=length))),
                             cumulative_logprob=draw(st.floats(-30, 0)), candidates=(tuple(tokens), tuple(logprobs))))
    return beams


@given(beam_rows(), st.integers(1, 4), st.sampled_from([-1.0, 0.0, 1.0, 2.0]), st.sampled_from([True, False, "never"]))
def test_a_step_keeps_the_best_unfinished_continuations_and_the_best_hypotheses(beams, width, penalty, early_stopping):
    running, hypotheses, done = beam_step(beams, (), eos_finishes, cfg(width, penalty, early_stopping))
    every = sorted(((b.cumulative_logprob + lp, i, t) for i, b in enumerate(beams) for t, lp in zip(*b.candidates)),
                   key=lambda c: (-c[0], c[1], c[2]))
    assert [(c.cumulative_logprob, c.parent, c.token) for c in running] == [c for c in every if c[2] != EOS][:width]
    finished = [c for c in every[:width] if c[2] == EOS]
    length = len(beams[0].output_token_ids) + 1
    assert [(h.cumulative_logprob, h.token_ids) for h in hypotheses] == [
        (total, beams[i].output_token_ids + (t,)) for total, i, t in finished]
    assert all(h.score == h.cumulative_logprob / length ** penalty for h in hypotheses)
    if running and len(hypotheses) == width and early_stopping is not True:
        hypothetical = 10 if early_stopping == "never" and penalty > 0 else length
        assert done == (running[0].cumulative_logprob / hypothetical ** penalty <= hypotheses[-1].score)
    else:
        assert done == (not running or len(hypotheses) == width)


# --- beam groups in the scheduler ---


def beam_request(rid, prompt, width=2, **params):
    """A beam-search request with beam ids rid, rid + 1, ..."""
    return Request(request_id=rid, prompt_token_ids=tuple(prompt), eos_token_ids=frozenset({EOS}),
                   beam_ids=tuple(range(rid, rid + width)),
                   params=SamplingParams(use_beam_search=True, beam_width=width, temperature=0.0, detokenize=False,
                                         **params))


def plain_request(rid, prompt, **params):
    return Request(request_id=rid, prompt_token_ids=tuple(prompt), eos_token_ids=frozenset({EOS}),
                   params=SamplingParams(detokenize=False, **params))


def limits(**kw):
    return SchedulerLimits(**({"max_batch_size": 8, "max_num_tokens": 64, "max_seq_len": 64, "page_size": 4} | kw))


def drive(requests, lim, policy="guaranteed_no_evict", num_pages=64, max_steps=2000):
    """Run requests to the end with the fake model: every request's events, and the batches."""
    state = new_scheduler_state(new_page_pool(num_pages, lim.page_size))
    cfg = SchedulerConfig(capacity_scheduler_policy=policy)
    events, batches, inbox = {}, [], tuple(requests)
    while inbox or has_work(state):
        assert len(batches) < max_steps, f"requests did not finish within {max_steps} steps"
        state, batch = schedule(state, inbox, lim, cfg)
        inbox = ()
        batches.append(batch)
        beams = {s.request_id: s for s in state.running if s.beam is not None}
        sampled = {s.request_id: fake_token(s.request_id, s.start_pos + len(s.token_ids))
                   for s in batch.seqs if s.sample}
        candidates = {rid: fake_candidates(b.request.prompt_token_ids + b.output_token_ids)
                      for rid, b in beams.items() if rid in sampled}
        state, produced = postprocess(state, batch, sampled, lim, candidates)
        for e in produced:
            events.setdefault(e.request_id, []).append(e)
    assert not state.pool.refcounts
    return events, batches


def test_forked_beams_share_full_pages_and_copy_a_shared_partial_page_once():
    lim = limits()
    state = new_scheduler_state(new_page_pool(32, 4))
    state, batch = schedule(state, (beam_request(0, range(1, 7), max_tokens=8),), lim, SchedulerConfig())
    assert batch.seqs[0].pages == (1, 2)  # 6 prompt tokens: a full page and a partial one
    state, _ = postprocess(state, batch, {0: 7}, lim, {0: ((7, 8, 3), (-0.1, -0.2, -3.0))})
    assert [(s.request_id, s.output_token_ids, s.pages) for s in state.running] == [(0, (7,), (1, 2)),
                                                                                  (1, (8,), (1, 2))]
    assert dict(state.pool.refcounts) == {1: 2, 2: 2}
    state, batch = schedule(state, (), lim, SchedulerConfig())
    # Both write position 6 into page 2: the first copies it before the step runs, the last holder keeps it.
    assert batch.page_copies == ((2, 3),)
    assert [(s.request_id, s.token_ids, s.pages) for s in batch.seqs] == [(0, (7,), (1, 3)), (1, (8,), (1, 2))]
    assert dict(state.pool.refcounts) == {1: 2, 2: 1, 3: 1}
    # Both next beams extend beam 1: beam 0 is dropped and its own page, the copy, is free at once.
    state, _ = postprocess(state, batch, {0: 5, 1: 4}, lim, {0: ((5, 6), (-5.0, -6.0)), 1: ((4, 6), (-0.1, -0.2))})
    assert [(s.request_id, s.output_token_ids, s.pages) for s in state.running] == [(1, (8, 4), (1, 2)),
                                                                                  (0, (8, 6), (1, 2))]
    assert dict(state.pool.refcounts) == {1: 2, 2: 2} and 3 in state.pool.free


def test_a_beam_group_is_not_scheduled_while_its_tokens_are_in_flight_beside_other_requests():
    lim = limits()
    state = new_scheduler_state(new_page_pool(32, 4))
    state, _ = schedule(state, (beam_request(0, [1, 2, 3]), plain_request(5, [4, 5], max_tokens=8)), lim,
                        SchedulerConfig())
    state, overlapped = schedule(state, (), lim, SchedulerConfig())  # before the first step's postprocess
    assert [s.request_id for s in overlapped.seqs] == [5]  # the plain request decodes its in-flight token


def test_a_beam_group_takes_beam_width_batch_rows_from_its_admission():
    lim = limits(max_batch_size=3)
    state = new_scheduler_state(new_page_pool(32, 4))
    requests = (beam_request(0, [1, 2]), plain_request(2, [3]), plain_request(3, [4]))
    state, batch = schedule(state, requests, lim, SchedulerConfig())
    assert [s.request_id for s in batch.seqs] == [0, 2] and [s.request_id for s in state.waiting] == [3]


def test_beams_find_their_search_alone_when_split_across_steps_by_the_token_budget():
    lim = limits(max_num_tokens=3, max_seq_len=32)
    r = beam_request(0, [1, 2, 3, 4, 5], width=4, max_tokens=6, length_penalty=0.5)
    events, batches = drive([r], lim)
    assert max(len(b.seqs) for b in batches) == 3  # four beams, three tokens a step
    assert events[0][-1].hypotheses == reference_beam_search(r, lim) and len(events[0][-1].hypotheses) == 4


def test_a_preempted_beam_group_restarts_and_finds_the_same_hypotheses():
    lim = limits(page_size=2, max_seq_len=40)
    old = plain_request(9, [3] * 6, max_tokens=14, ignore_eos=True)
    r = beam_request(0, [1, 2, 3, 4, 5, 6], width=3, max_tokens=10, ignore_eos=True, early_stopping="never")
    events, batches = drive([old, r], lim, policy="max_utilization", num_pages=20)
    assert any(0 in b.preempted for b in batches)
    assert events[0][-1].hypotheses == reference_beam_search(r, lim)
    assert events[9][-1].finish_reason == "length"


def test_max_utilization_never_preempts_the_oldest_beam_group_and_both_groups_finish():
    # Two groups short of pages: preempting the newest frees its pages, including those its beams
    # share with each other, and stops there (counting sequences, not groups, looped forever).
    lim = limits(page_size=2, max_seq_len=24, max_batch_size=6)
    old = beam_request(0, [1, 2, 3, 4, 5, 6], width=2, max_tokens=8, ignore_eos=True, early_stopping="never")
    new = beam_request(10, [7, 8, 9, 10, 11, 12], width=2, max_tokens=8, ignore_eos=True, early_stopping="never")
    events, batches = drive([old, new], lim, policy="max_utilization", num_pages=12, max_steps=500)
    assert not any(0 in b.preempted for b in batches) and any(10 in b.preempted for b in batches)
    assert events[0][-1].hypotheses == reference_beam_search(old, lim)
    assert events[10][-1].hypotheses == reference_beam_search(new, lim)


def test_abort_ends_a_beam_group_whole_and_frees_its_pages():
    lim = limits()
    state = new_scheduler_state(new_page_pool(32, 4))
    state, batch = schedule(state, (beam_request(0, [1, 2, 3], width=3),), lim, SchedulerConfig())
    state, _ = postprocess(state, batch, {}, lim, {0: fake_candidates([1, 2, 3])})
    assert len(state.running) == 3
    state, events = abort(state, [0])
    assert [(e.request_id, e.finish_reason) for e in events] == [(0, "abort")]
    assert not has_work(state) and num_available(state.pool) == 31


def test_a_beam_groups_worst_case_counts_the_prompts_full_pages_once():
    r = beam_request(0, range(6), width=3, max_tokens=10)  # 16 tokens: 4 pages, the first shared by every beam
    with pytest.raises(ValueError, match="needs 10 KV pages"):
        validate_request(r, limits(), SchedulerConfig(), num_pages=10)
    validate_request(r, limits(), SchedulerConfig(), num_pages=11)


BEAM3 = SamplingParams(use_beam_search=True, beam_width=3, temperature=0.0)


@pytest.mark.parametrize(("request_", "message"), [
    (Request(request_id=0, prompt_token_ids=(1,), params=BEAM3, beam_ids=(0, 1)), "Request.beam_ids must hold"),
    (Request(request_id=0, prompt_token_ids=(1,), params=BEAM3, beam_ids=(1, 0, 2)), "Request.beam_ids must hold"),
    (Request(request_id=0, prompt_token_ids=(1,), params=SamplingParams(), beam_ids=(0, 1)), "Request.beam_ids needs"),
    (beam_request(0, [1], width=4), "beam_width=4 exceeds max_batch_size=3"),
    (beam_request(0, [1], width=2, stop_token_ids=tuple(range(10, 29))), "at most 18 EOS and stop token ids"),
])
def test_invalid_beam_requests_are_refused_naming_the_field(request_, message):
    with pytest.raises(ValueError, match=message):
        validate_request(request_, limits(max_batch_size=3), SchedulerConfig(), num_pages=64)


# --- SamplingParams ---


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(beam_width=2), "SamplingParams.temperature must be 0 with use_beam_search=True"),
    (dict(beam_width=2, temperature=0.0, n=3), "SamplingParams.n must be <= beam_width=2"),
    (dict(beam_width=1, temperature=0.0), r"SamplingParams.beam_width must be an integer in \[2, 10\]"),
    (dict(beam_width=11, temperature=0.0), r"SamplingParams.beam_width must be an integer in \[2, 10\]"),
    (dict(beam_width=2, temperature=0.0, best_of=2), "SamplingParams.best_of must be None"),
    (dict(beam_width=2, temperature=0.0, logprobs=1), "SamplingParams.logprobs must be None"),
    (dict(beam_width=2, temperature=0.0, stop=["x"]), "SamplingParams.stop must be empty"),
    (dict(beam_width=2, temperature=0.0, early_stopping=1), "SamplingParams.early_stopping must be True, False"),
])
def test_bad_beam_search_params_are_refused_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(use_beam_search=True, **kwargs)


@pytest.mark.parametrize("field", [dict(beam_width=3), dict(length_penalty=0.5), dict(early_stopping=True)])
def test_beam_settings_without_beam_search_are_refused(field):
    with pytest.raises(ValueError, match=f"SamplingParams.{next(iter(field))}=.* needs use_beam_search=True"):
        SamplingParams(**field)


def test_beam_search_accepts_n_up_to_the_width_at_temperature_0():
    params = SamplingParams(use_beam_search=True, beam_width=4, n=4, temperature=0.0, length_penalty=-1.0,
                            early_stopping="never")
    assert params.num_sequences == 1  # one engine request; its beams are its sequences
