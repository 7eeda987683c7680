"""Beam search: the pure selection step."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmfx.beam_search import BeamConfig, BeamRow, Hypothesis, beam_step

EOS = 0


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
