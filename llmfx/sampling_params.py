"""SamplingParams: what a request asks of the sampler and of stop handling, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass

MAX_LOGPROBS = 20  # the sampler always computes this many top logprobs (a static shape)
# A beam's next tokens come from its row's 20 candidates, which must hold its beam_width best
# continuations that do not finish: beam_width <= 10 leaves as many places for EOS and stop tokens.
MAX_BEAM_WIDTH = MAX_LOGPROBS // 2
# Beam-search settings, accepted only at these values without use_beam_search.
_BEAM_ONLY = (("beam_width", 1), ("length_penalty", 1.0), ("early_stopping", False))


@dataclass(frozen=True, slots=True, kw_only=True)
class SamplingParams:
    """How to sample one request and when to stop it (names and semantics as in vLLM).

    Penalties act on the raw logits: repetition_penalty on tokens of the prompt OR the output
    (positive logits divided by it, others multiplied), presence/frequency_penalty on output
    tokens only. Then temperature (0 = greedy: argmax of the penalized logits), then top-k and
    min-p, then top-p over the renormalized survivors; tokens tied with the last kept one are kept.
    top_k 0 or -1 disables it. logprobs=k returns the sampled token's logprob and rank plus the
    k most likely tokens, all from log_softmax(penalized logits / temperature), temperature taken
    as 1 when greedy: after penalties, BEFORE top-k/top-p/min-p. prompt_logprobs=k gives, for each prompt
    token after the first, its logprob, rank and the k most likely tokens under the raw model logits.

    use_beam_search keeps beam_width beams (2..10) and returns the n <= beam_width best finished
    hypotheses, ranked by cumulative_logprob / len(token_ids) ** length_penalty as transformers'
    num_beams search ranks them; early_stopping is True, False or "never" with transformers'
    meaning. Beam search needs temperature 0; the filters have no effect on it, as on greedy.
    """

    max_tokens: int = 32
    min_tokens: int = 0
    temperature: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    detokenize: bool = True
    skip_special_tokens: bool = True
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    n: int = 1
    best_of: int | None = None
    use_beam_search: bool = False
    beam_width: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False

    def __post_init__(self) -> None:
        # Lists are accepted for convenience and frozen into tuples.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        _check_int(self, "max_tokens", minimum=1)
        _check_int(self, "min_tokens", minimum=0)
        if self.min_tokens > self.max_tokens:
            raise ValueError(
                f"SamplingParams.min_tokens must be <= max_tokens, got min_tokens={self.min_tokens} "
                f"and max_tokens={self.max_tokens}"
            )
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool):
            raise ValueError(f"SamplingParams.temperature must be a number >= 0, got {self.temperature!r}")
        if not self.temperature >= 0.0 or self.temperature == float("inf"):
            raise ValueError(f"SamplingParams.temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.seed is not None:
            _check_int(self, "seed", minimum=0)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"SamplingParams.stop must hold non-empty strings, got {s!r}")
        for t in self.stop_token_ids:
            if not isinstance(t, int) or isinstance(t, bool) or t < 0:
                raise ValueError(f"SamplingParams.stop_token_ids must hold token ids >= 0, got {t!r}")
        for name in ("ignore_eos", "include_stop_str_in_output", "detokenize", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"SamplingParams.{name} must be a bool, got {getattr(self, name)!r}")
        if self.stop and not self.detokenize:
            raise ValueError("SamplingParams.stop needs detokenize=True: stop strings are matched on text")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            raise ValueError(f"SamplingParams.top_k must be an integer >= 1, or 0 or -1 to disable it, got {self.top_k!r}")
        _check_number(self, "top_p", "in (0, 1]", lambda x: 0.0 < x <= 1.0)
        _check_number(self, "min_p", "in [0, 1]", lambda x: 0.0 <= x <= 1.0)
        _check_number(self, "repetition_penalty", "> 0 and finite", lambda x: 0.0 < x < float("inf"))
        _check_number(self, "presence_penalty", "in [-2, 2]", lambda x: -2.0 <= x <= 2.0)
        _check_number(self, "frequency_penalty", "in [-2, 2]", lambda x: -2.0 <= x <= 2.0)
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _check_int(self, name, minimum=0, maximum=MAX_LOGPROBS, none_ok=True)
        _check_int(self, "n", minimum=1)
        if self.best_of is not None:
            _check_int(self, "best_of", minimum=self.n)
        if not isinstance(self.use_beam_search, bool):
            raise ValueError(f"SamplingParams.use_beam_search must be a bool, got {self.use_beam_search!r}")
        _check_int(self, "beam_width", minimum=2 if self.use_beam_search else 1, maximum=MAX_BEAM_WIDTH)
        _check_number(self, "length_penalty", "that is finite", lambda x: abs(x) < float("inf"))
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise ValueError(f"SamplingParams.early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if self.use_beam_search:
            self._check_beam_search()
            return
        for name, neutral in _BEAM_ONLY:
            if getattr(self, name) != neutral:
                raise ValueError(f"SamplingParams.{name}={getattr(self, name)!r} needs use_beam_search=True; "
                                 f"leave it at {neutral!r} otherwise")
        if self.num_sequences > 1 and self.temperature == 0.0:
            raise ValueError(f"SamplingParams.n={self.n} / best_of={self.best_of} needs temperature > 0: greedy "
                             f"sequences of one prompt would all be identical")

    def _check_beam_search(self) -> None:
        if self.temperature != 0.0:
            raise ValueError(f"SamplingParams.temperature must be 0 with use_beam_search=True (beam search ranks "
                             f"every continuation; it does not sample), got {self.temperature!r}")
        if self.n > self.beam_width:
            raise ValueError(f"SamplingParams.n must be <= beam_width={self.beam_width} with use_beam_search=True "
                             f"(n of the beam_width best hypotheses are returned), got {self.n}")
        if self.best_of is not None:
            raise ValueError(f"SamplingParams.best_of must be None with use_beam_search=True (beam_width sets how many "
                             f"beams run), got {self.best_of!r}")
        if self.logprobs is not None:
            raise ValueError(f"SamplingParams.logprobs must be None with use_beam_search=True (hypotheses report "
                             f"cumulative_logprob and score), got {self.logprobs!r}")
        if self.stop:
            raise ValueError(f"SamplingParams.stop must be empty with use_beam_search=True (stop strings are matched on "
                             f"streamed text, which beams do not have); use stop_token_ids, got {self.stop!r}")

    @property
    def num_sequences(self) -> int:
        """Independent sequences generated for the request: best_of when given, else n (1 for beam search)."""
        return 1 if self.use_beam_search else self.best_of or self.n

    @property
    def greedy(self) -> bool:
        """True when the request takes the argmax token at every step."""
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """True when a repetition, presence or frequency penalty changes the logits."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def filters(self) -> bool:
        """True when a top-k, top-p or min-p filter may narrow what is sampled (never for greedy requests)."""
        return not self.greedy and (self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0)


def _check_int(params: SamplingParams, name: str, *, minimum: int, maximum: int | None = None,
               none_ok: bool = False) -> None:
    value = getattr(params, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum or (maximum is not None and value > maximum):
        allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"SamplingParams.{name} must be {'None or ' if none_ok else ''}an integer {allowed}, "
                         f"got {value!r}")


def _check_number(params: SamplingParams, name: str, allowed: str, ok) -> None:
    value = getattr(params, name)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not ok(value):  # NaN fails ok
        raise ValueError(f"SamplingParams.{name} must be a number {allowed}, got {value!r}")


def child_seed(seed: int, index: int) -> int:
    """The seed of sequence `index` of an n / best_of request whose seed is `seed` (index 0 keeps it)."""
    if index == 0:
        return seed
    mixed = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9) & ((1 << 63) - 1)
    return mixed ^ (mixed >> 31)
