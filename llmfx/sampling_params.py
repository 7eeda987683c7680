"""SamplingParams: what a request asks of the sampler and of stop handling, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass

# Fields whose sampler support has not landed yet: they are accepted only at their neutral value,
# so a request never silently runs with a setting the engine would ignore.
_NOT_YET_SUPPORTED = {
    "top_k": 0,
    "top_p": 1.0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "logprobs": None,
    "prompt_logprobs": None,
    "n": 1,
    "best_of": None,
    "use_beam_search": False,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class SamplingParams:
    """How to sample one request and when to stop it (names as in TensorRT-LLM and vLLM)."""

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
        for name, neutral in _NOT_YET_SUPPORTED.items():
            if getattr(self, name) != neutral:
                raise ValueError(
                    f"SamplingParams.{name}={getattr(self, name)!r} is not supported yet: the sampler "
                    f"implements greedy and seeded temperature sampling; leave {name} at {neutral!r}"
                )

    @property
    def greedy(self) -> bool:
        """True when the request takes the argmax token at every step."""
        return self.temperature == 0.0


def _check_int(params: SamplingParams, name: str, *, minimum: int) -> None:
    value = getattr(params, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"SamplingParams.{name} must be an integer >= {minimum}, got {value!r}")
