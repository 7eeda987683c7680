"""One sequence as the scheduler knows it: its request, its beam if it searches, and its tokens."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from llmfx.beam_search import Candidates, Hypothesis
from llmfx.persistent import TokenTape
from llmfx.records import positional_builder
from llmfx.sampling_params import SamplingParams

# A decode input whose value only the device knows yet: the token a launched step is sampling.
PLACEHOLDER = -1


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """What enters the engine."""

    request_id: int
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()  # ignored when params.ignore_eos
    arrival_time: float = 0.0
    # A sibling of an n / best_of request waits until this request's prompt is computed and its
    # full pages are in the prefix cache, then shares them instead of computing the prompt again.
    prefill_after: int | None = None
    # Beam search: the ids of its beam_width sequences, request_id first (each beam is a batch row).
    beam_ids: tuple[int, ...] = ()

    @property
    def sequence_ids(self) -> tuple[int, ...]:
        """The ids this request's sequences may take."""
        return self.beam_ids or (self.request_id,)

    @property
    def batch_rows(self) -> int:
        """Rows of a step's batch the request may occupy at once: beam_width for beam search, else 1."""
        return self.params.beam_width if self.params.use_beam_search else 1



@dataclass(frozen=True, slots=True, kw_only=True)
class Beam:
    """A beam-search sequence's part in its group's search."""

    seq_id: int  # one of Request.beam_ids
    cumulative_logprob: float = 0.0
    candidates: Candidates | None = None  # its next token's top continuations, held until every beam has its own
    hypotheses: tuple[Hypothesis, ...] = ()  # the group's finished hypotheses, best first (every beam holds them)


@dataclass(frozen=True, slots=True, kw_only=True)
class SequenceState:
    """One sequence inside the scheduler: a request, or one beam of a beam-search request."""

    request: Request
    output_token_ids: tuple[int, ...] | TokenTape = ()  # a TokenTape (equal to its tuple) when read from a running table
    num_computed_tokens: int = 0  # tokens whose KV is written or scheduled to be written
    pages: tuple[int, ...] = ()  # covers num_computed_tokens
    num_inflight: int = 0  # tokens sampled by a launched step that postprocess has not seen yet
    beam: Beam | None = None  # set on every sequence of a beam-search request

    @property
    def request_id(self) -> int:
        """The sequence's id: its request's, or a beam's own id from Request.beam_ids."""
        return self.request.request_id if self.beam is None else self.beam.seq_id

    @property
    def num_known_tokens(self) -> int:
        """Prompt plus output tokens whose values the host has."""
        return len(self.request.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus output tokens, in-flight ones included."""
        return self.num_known_tokens + self.num_inflight



# A positional constructor for the record built per sequence (llmfx/records.py says why).
build_sequence = positional_builder(SequenceState)  # request, output_token_ids, num_computed_tokens, pages, num_inflight, beam


# Tokens from here up are not vocabulary ids (the largest vocabularies hold ~262k): the simulator's fake
# tokens are unique per request and position, and caching each would grow the table without bound.
_CACHED_TOKENS = 1 << 20


class _TokenTuples(dict):
    """token -> (token,), filled on first use; a hit is one C-level lookup, no Python frame."""

    def __missing__(self, token: int) -> tuple[int]:
        if not -1 <= token < _CACHED_TOKENS:
            return (token,)
        t = self[token] = (token,)
        return t


# one_token(token) -> (token,), the same tuple object for equal tokens. Decode chunks (token_slice) and token
# events share these: one tuple per vocabulary entry instead of two new ones per sequence per step. Every new
# tuple counts toward the cyclic GC's next collection; a cached tuple of ints is untracked by the first
# collection that sees it.
one_token = _TokenTuples().__getitem__


def token_slice(seq: SequenceState, start: int, stop: int) -> tuple[int, ...]:
    """Tokens [start, stop) of seq's prompt + output; in-flight ones are PLACEHOLDER."""
    return tokens_between(seq.request.prompt_token_ids, seq.output_token_ids, start, stop)


def tokens_between(prompt: Sequence[int], output: Sequence[int], start: int, stop: int) -> tuple[int, ...]:
    """Tokens [start, stop) of prompt + output without building the whole list; those past it are PLACEHOLDER."""
    p = len(prompt)
    known = p + len(output)
    if stop == start + 1 and stop <= known:  # a decode's token: its interned tuple, no new object
        return one_token(output[start - p] if start >= p else prompt[start])
    if stop > known:  # a decode under overlap: its one token is still in flight ((x,) * 1 is x: no new object)
        tail = (PLACEHOLDER,) * (stop - max(start, known))
        return tail if start >= known else tokens_between(prompt, output, start, known) + tail
    if stop <= p:
        return tuple(prompt[start:stop])
    if start >= p:
        return tuple(output[start - p : stop - p])
    return tuple(prompt[start:]) + tuple(output[: stop - p])


@dataclass(frozen=True, slots=True)
class TokenPrefix(Sequence):
    """Tokens [0, end) of prompt + output, sliced on demand: registering a new page reads only its own tokens,
    not the whole context. `output` may hold more (a running table's shared list), which are never read;
    tokens past it read as PLACEHOLDER, as in tokens_between (the scheduler registers only known ones)."""

    prompt: tuple[int, ...]
    output: Sequence[int]
    end: int

    def __len__(self) -> int:
        return self.end

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(self.end)
            assert step == 1, "TokenPrefix slices with step 1 only"
            p = len(self.prompt)
            # A page of known output tokens: one slice of the list, the common case while decoding.
            if start >= p and stop - p <= len(self.output):
                return tuple(self.output[start - p: max(start, stop) - p])
            return tokens_between(self.prompt, self.output, start, max(start, stop))
        if not -self.end <= index < self.end:
            raise IndexError(index)
        index %= self.end
        return tokens_between(self.prompt, self.output, index, index + 1)[0]
