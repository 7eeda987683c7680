"""What a request gives back: RequestOutput snapshots with their CompletionOutputs and metrics."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Logprob:
    """A token's log-probability and its rank (1 = most likely; ties share the best rank)."""

    logprob: float
    rank: int


@dataclass(frozen=True, slots=True, kw_only=True)
class CompletionOutput:
    """One generated sequence; the *_diff fields hold what is new since the previous snapshot."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    text_diff: str = ""
    token_ids_diff: tuple[int, ...] = ()
    cumulative_logprob: float | None = None  # sum of the sampled tokens' logprobs
    score: float | None = None  # beam search: cumulative_logprob / len(token_ids) ** length_penalty, the ranking key
    logprobs: tuple[Mapping[int, Logprob], ...] | None = None  # per token: sampled + top-k, when asked
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    error: str | None = None  # the message of the failure when finish_reason == "error"


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestMetrics:
    """Wall-clock times (time.monotonic seconds) and token counts of one request."""

    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestOutput:
    """A snapshot of a request: the final one has finished=True."""

    request_id: int
    prompt: str | None
    prompt_token_ids: tuple[int, ...]
    outputs: tuple[CompletionOutput, ...]
    finished: bool
    metrics: RequestMetrics
    # With SamplingParams.prompt_logprobs: per prompt token (None for the first, which has no context).
    prompt_logprobs: tuple[Mapping[int, Logprob] | None, ...] | None = None

    @property
    def text(self) -> str:
        """The first completion's text, for the common n=1 case."""
        return self.outputs[0].text

    @property
    def token_ids(self) -> tuple[int, ...]:
        """The first completion's token ids."""
        return self.outputs[0].token_ids
