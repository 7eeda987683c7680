"""Beam selection: one step of a beam group, a pure host-side function, ranked as transformers ranks beams.

Each running beam has a cumulative logprob and the step's top candidates (token, logprob). A
continuation's total is beam logprob + token logprob. Candidates are ranked by total over all beams
(ties: lower beam, then lower token id first). The best `width` candidates that finish (a finishing
token, or the length limit) become hypotheses scored total / generated_len ** length_penalty, where
generated_len counts the finishing token; the best `width` that do not finish are the next running
beams. The group keeps its `width` best hypotheses. It is done when nothing runs on, or when
`width` hypotheses exist and either early_stopping is True or no running beam can still beat the
worst of them: its best total over (generated_len ** length_penalty), generated_len being the
current length, or max_new_tokens when early_stopping == "never" and length_penalty > 0
(transformers' `_check_early_stop_heuristic`; transformers 5.x `_beam_search`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

# A row's candidates: token ids and their logprobs, best first; id -1 pads rows of vocabularies under 20.
Candidates = tuple[tuple[int, ...], tuple[float, ...]]
# (finish_reason, stop_reason) for a token that ends a beam, else None.
Finish = tuple[str, "int | None"] | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Hypothesis:
    """A finished beam."""

    token_ids: tuple[int, ...]  # generated tokens, the finishing one included
    cumulative_logprob: float  # sum of the tokens' logprobs
    score: float  # cumulative_logprob / len(token_ids) ** length_penalty: the ranking key
    finish_reason: str  # "stop" | "length"
    stop_reason: int | None = None  # the stop token id; None for EOS and length


@dataclass(frozen=True, slots=True, kw_only=True)
class Continuation:
    """A running beam of the next step: the beam it extends, the token it adds, its new cumulative logprob."""

    parent: int
    token: int
    cumulative_logprob: float


@dataclass(frozen=True, slots=True, kw_only=True)
class BeamRow:
    """A running beam as the step sees it."""

    output_token_ids: tuple[int, ...]
    cumulative_logprob: float
    candidates: Candidates


@dataclass(frozen=True, slots=True, kw_only=True)
class BeamConfig:
    """The search's settings (SamplingParams names)."""

    width: int
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True | False | "never"
    max_new_tokens: int  # the length limit: the "never" rule's best hypothetical length


def beam_step(beams: Sequence[BeamRow], hypotheses: tuple[Hypothesis, ...], finish: Callable[[int], Finish],
              cfg: BeamConfig) -> tuple[tuple[Continuation, ...], tuple[Hypothesis, ...], bool]:
    """(next running beams best first, the group's best hypotheses best first, done) after one step."""
    assert beams and len({len(b.output_token_ids) for b in beams}) == 1, "the beams of a group advance together"
    length = len(beams[0].output_token_ids) + 1  # generated tokens once this step's token is added
    ranked = sorted(
        ((b.cumulative_logprob + lp, i, t) for i, b in enumerate(beams) for t, lp in zip(*b.candidates)
         if t >= 0 and lp > float("-inf")),
        key=lambda c: (-c[0], c[1], c[2]))
    running: list[Continuation] = []
    finished: list[Hypothesis] = []
    for rank, (total, i, token) in enumerate(ranked):
        if rank >= cfg.width and len(running) == cfg.width:
            break
        end = finish(token)
        if end is None:
            if len(running) < cfg.width:
                running.append(Continuation(parent=i, token=token, cumulative_logprob=total))
        elif rank < cfg.width:  # only the best `width` continuations may finish; the rest are spares
            finished.append(Hypothesis(token_ids=beams[i].output_token_ids + (token,), cumulative_logprob=total,
                                       score=total / length ** cfg.length_penalty, finish_reason=end[0],
                                       stop_reason=end[1]))
    # Stable: on equal scores the earlier hypothesis stays ahead.
    kept = tuple(sorted(hypotheses + tuple(finished), key=lambda h: -h.score)[: cfg.width])
    done = not running or (len(kept) == cfg.width and (cfg.early_stopping is True
                                                         or not _can_improve(running[0], kept[-1], length, cfg)))
    return tuple(running), kept, done


def _can_improve(best: Continuation, worst: Hypothesis, length: int, cfg: BeamConfig) -> bool:
    """Whether the best running beam may still beat the worst kept hypothesis (transformers' heuristic)."""
    hypothetical = cfg.max_new_tokens if cfg.early_stopping == "never" and cfg.length_penalty > 0 else length
    return best.cumulative_logprob / hypothetical ** cfg.length_penalty > worst.score
