"""Incremental detokenization with stop strings: a frozen state per request and pure step functions.

Text is produced with the prefix-offset / read-offset technique: each new token is decoded inside
a short window of the tokens before it (the last emitted run) and the window's text alone is
subtracted, so a SentencePiece "▁" word start decodes to a leading space exactly as it does in a
full decode, and each step costs O(new tokens x window), never a re-decode of the whole output.
A window whose text ends in "\\ufffd" is held: the character's bytes may still be arriving.

Stop strings are matched on the text not yet emitted. The longest suffix of that text which is a
proper prefix of some stop string is held back (at most max(len(stop)) - 1 characters), so no
streamed text_diff ever holds text that a later stop trims. When several stops appear, the one
that completes first wins (smallest end in the text; on a tie the longest), as if text arrived one
character at a time, so the result does not depend on how the text was split into tokens. The
last kept token is the one whose text completed the stop; text before a trailing "\\ufffd" counts,
so a byte-level token such as "crÃ" completes a stop ending in "cr" although "è" is unfinished.

The engine keeps the output text as "".join of every text_diff, from detokenize and then flush.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from llmfx.sampling_params import SamplingParams

# Prompt tokens decoded as context for the first generated token (vLLM and TGI use 5 too).
PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class Decoder(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class DetokenizerState:
    """Per-request detokenizer state; invariant: window_ids[:read_offset] are already emitted or held."""

    window_ids: tuple[int, ...]  # tokens from the prefix offset on: the last emitted run, then unread ones
    read_offset: int  # index in window_ids of the first token whose text is not yet produced
    pending: str  # produced text not yet emitted: held back because it may begin a stop string
    num_generated: int  # generated tokens consumed so far
    num_chars_emitted: int  # len("".join(text_diff so far))
    stop: tuple[str, ...]
    include_stop_str_in_output: bool
    skip_special_tokens: bool
    stop_string: str | None = None
    finished: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class DetokenizedDelta:
    """What one step adds: new text, and whether a stop string ended the request."""

    text_diff: str
    stop_string: str | None = None
    finished_by_stop: bool = False
    num_tokens_kept: int | None = None  # generated tokens to keep when finished_by_stop, else None


def new_detokenizer(prompt_token_ids: Sequence[int], params: SamplingParams) -> DetokenizerState:
    """Fresh state for one request; the prompt's last tokens are context only, the text starts empty."""
    prompt = tuple(int(t) for t in prompt_token_ids)
    context = prompt[max(len(prompt) - PROMPT_CONTEXT_TOKENS, 0) :]
    return DetokenizerState(
        window_ids=context,
        read_offset=len(context),
        pending="",
        num_generated=0,
        num_chars_emitted=0,
        stop=tuple(params.stop),
        include_stop_str_in_output=params.include_stop_str_in_output,
        skip_special_tokens=params.skip_special_tokens,
    )


def detokenize(
    state: DetokenizerState, new_token_ids: Sequence[int], tokenizer: Decoder
) -> tuple[DetokenizerState, DetokenizedDelta]:
    """Consume newly generated token ids; returns the new state and the text they release.

    Tokens after the one that completes a stop string are ignored; the state is then finished.
    """
    if state.finished:
        raise ValueError("detokenize called on a finished DetokenizerState (stopped or flushed); start a new one")
    window, read, pending = state.window_ids, state.read_offset, state.pending
    num_generated = state.num_generated
    for token in new_token_ids:
        window, read, chunk, unsettled = _decode_next(window, read, int(token), tokenizer, state.skip_special_tokens)
        num_generated += 1
        # Unsettled text is final ("cr" of a token "crÃ" ending inside a character), so a stop in it ends here.
        seen = pending + chunk + unsettled
        hit = _find_stop(seen, len(pending), state.stop) if len(seen) > len(pending) else None
        if hit is not None:
            return _finish_by_stop(state, seen, hit, num_generated, window=window, read=read)
        pending += chunk
    held = _held_back_length(pending, state.stop)
    emit, pending = pending[: len(pending) - held], pending[len(pending) - held :]
    state = replace(
        state,
        window_ids=window,
        read_offset=read,
        pending=pending,
        num_generated=num_generated,
        num_chars_emitted=state.num_chars_emitted + len(emit),
    )
    return state, DetokenizedDelta(text_diff=emit)


def flush(state: DetokenizerState, tokenizer: Decoder) -> tuple[DetokenizerState, DetokenizedDelta]:
    """Release everything held at the end of generation (held-back text, an incomplete character as "\\ufffd").

    Call once when the request ends for any reason other than a stop string; a stop string can
    still be found in the released text, then finished_by_stop is set as in detokenize.
    Flushing a finished state returns an empty delta.
    """
    if state.finished:
        return state, DetokenizedDelta(text_diff="")
    window, read = state.window_ids, state.read_offset
    prefix_text = tokenizer.decode(list(window[:read]), skip_special_tokens=state.skip_special_tokens)
    full_text = tokenizer.decode(list(window), skip_special_tokens=state.skip_special_tokens)
    tail = full_text[len(prefix_text) :] if len(full_text) > len(prefix_text) else ""
    pending = state.pending + tail
    hit = _find_stop(pending, len(state.pending), state.stop)
    if hit is not None:
        return _finish_by_stop(state, pending, hit, state.num_generated, window=window, read=len(window))
    final = replace(
        state,
        window_ids=window[read:],
        read_offset=len(window) - read,
        pending="",
        num_chars_emitted=state.num_chars_emitted + len(pending),
        finished=True,
    )
    return final, DetokenizedDelta(text_diff=pending)


def _decode_next(
    window: tuple[int, ...], read: int, token: int, tokenizer: Decoder, skip: bool
) -> tuple[tuple[int, ...], int, str, str]:
    """Append one token to the window; returns (window, read_offset, new text, unsettled text).

    New text is "" while the window's text ends in "\ufffd"; unsettled text is then the part
    before the trailing "\ufffd" run, final but not yet emitted (it is re-decoded next token).
    """
    window = (*window, token)
    prefix_text = tokenizer.decode(list(window[:read]), skip_special_tokens=skip)
    full_text = tokenizer.decode(list(window), skip_special_tokens=skip)
    if len(full_text) <= len(prefix_text):
        return window, read, "", ""
    if full_text.endswith(_REPLACEMENT_CHAR):
        return window, read, "", full_text[len(prefix_text) :].rstrip(_REPLACEMENT_CHAR)
    # The unread tokens become the next step's context window.
    return window[read:], len(window) - read, full_text[len(prefix_text) :], ""


def _find_stop(text: str, searched_from: int, stops: tuple[str, ...]) -> tuple[int, str] | None:
    """(start, stop) of the stop occurrence that ends first in text, among those ending after searched_from."""
    best: tuple[int, int, str] | None = None  # (end, -len, stop)
    for s in stops:
        start = text.find(s, max(searched_from - len(s) + 1, 0))
        if start >= 0:
            key = (start + len(s), -len(s), s)
            if best is None or key < best:
                best = key
    if best is None:
        return None
    end, _, s = best
    return end - len(s), s


def _held_back_length(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    longest = max((len(s) for s in stops), default=1)
    for k in range(min(len(text), longest - 1), 0, -1):
        suffix = text[-k:]
        if any(s.startswith(suffix) for s in stops):
            return k
    return 0


def _finish_by_stop(
    state: DetokenizerState,
    pending: str,
    hit: tuple[int, str],
    num_generated: int,
    *,
    window: tuple[int, ...],
    read: int,
) -> tuple[DetokenizerState, DetokenizedDelta]:
    start, stop = hit
    emit = pending[: start + len(stop)] if state.include_stop_str_in_output else pending[:start]
    final = replace(
        state,
        window_ids=window,
        read_offset=read,
        pending="",
        num_generated=num_generated,
        num_chars_emitted=state.num_chars_emitted + len(emit),
        stop_string=stop,
        finished=True,
    )
    return final, DetokenizedDelta(
        text_diff=emit, stop_string=stop, finished_by_stop=True, num_tokens_kept=num_generated
    )
