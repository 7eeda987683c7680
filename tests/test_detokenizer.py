"""Incremental detokenization: streamed text equals a full decode, stop strings trim without leaks."""

import functools

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from llmfx.detokenizer import PROMPT_CONTEXT_TOKENS, detokenize, flush, new_detokenizer
from llmfx.sampling_params import SamplingParams
from llmfx.tokenizer import ByteTokenizer

CORPUS = [
    "Hello world, café crème brûlée!",
    "naïve façade 日本語のテキスト 中文字符",
    "emoji 😀 🎉 party 🚀 ok 👍",
    "the quick brown fox jumps over the lazy dog",
    "señor über straße Ελληνικά русский",
] * 3
WORDS = sorted({w for line in CORPUS for w in line.split()})
SPECIALS = ["<s>", "</s>", "<pad>"]


@functools.cache
def byte_level_bpe() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", clean_up_tokenization_spaces=False
    )


@functools.cache
def metaspace_bpe() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", *SPECIALS], show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


def tokenizer_named(name):
    builders = {"byte": lambda: ByteTokenizer(vocab_size=300), "byte_level_bpe": byte_level_bpe, "metaspace": metaspace_bpe}
    return builders[name]()


TOKENIZER_NAMES = ["byte", "byte_level_bpe", "metaspace"]
MULTIBYTE_TEXT = st.text(alphabet="ab é中😀ü", max_size=12)


def stream(tokenizer, prompt_ids, gen_ids, params, chunk_sizes=(1,)):
    """Feed gen_ids in chunks (cycling chunk_sizes), flush unless stopped; returns (deltas, final state)."""
    state = new_detokenizer(prompt_ids, params)
    deltas, i, k = [], 0, 0
    while i < len(gen_ids):
        n = max(chunk_sizes[k % len(chunk_sizes)], 1)
        state, delta = detokenize(state, gen_ids[i : i + n], tokenizer)
        deltas.append(delta)
        if delta.finished_by_stop:
            return deltas, state
        i, k = i + n, k + 1
    state, delta = flush(state, tokenizer)
    return deltas + [delta], state


def text_of(deltas):
    return "".join(d.text_diff for d in deltas)


@st.composite
def generated_ids(draw, tokenizer):
    """Random ids mixed with encoded multi-byte text, so characters get split across tokens."""
    pieces = draw(
        st.lists(
            st.one_of(
                st.lists(st.integers(0, len(tokenizer) - 1), max_size=4),
                MULTIBYTE_TEXT.map(lambda t: tokenizer.encode(t, add_special_tokens=False)),
            ),
            max_size=6,
        )
    )
    return [i for p in pieces for i in p]


@settings(max_examples=150, deadline=None)
@given(st.data(), st.sampled_from(TOKENIZER_NAMES), st.booleans(), st.lists(st.integers(1, 4), min_size=1, max_size=4))
def test_streamed_text_equals_full_decode_of_generated_ids(data, name, skip, chunks):
    tok = tokenizer_named(name)
    ids = data.draw(generated_ids(tok))
    deltas, _ = stream(tok, [], ids, SamplingParams(skip_special_tokens=skip), chunks)
    final = tok.decode(ids, skip_special_tokens=skip)
    assert text_of(deltas) == final
    if "\ufffd" not in final:
        assert not any("\ufffd" in d.text_diff for d in deltas)


@settings(max_examples=100, deadline=None)
@given(st.data(), st.sampled_from(TOKENIZER_NAMES), st.lists(st.sampled_from(WORDS), min_size=1, max_size=8))
def test_streamed_text_continues_the_prompt_text(data, name, words):
    tok = tokenizer_named(name)
    prompt = tok.encode(" ".join(words), add_special_tokens=False)
    gen = data.draw(generated_ids(tok))
    prompt_text = tok.decode(prompt, skip_special_tokens=True)
    full = tok.decode(prompt + gen, skip_special_tokens=True)
    assume(full.startswith(prompt_text))
    deltas, _ = stream(tok, prompt, gen, SamplingParams())
    assert text_of(deltas) == full[len(prompt_text) :]


def test_first_generated_word_keeps_its_leading_space_given_the_prompt():
    tok = metaspace_bpe()
    ids = tok.encode("Hello world café", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids[1:2])[0].startswith("▁")
    deltas, _ = stream(tok, ids[:1], ids[1:], SamplingParams())
    assert text_of(deltas) == " world café"
    assert tok.decode(ids[1:]) == "world café"  # what a context-free decode would wrongly give


def test_multibyte_character_is_emitted_once_its_last_byte_arrives():
    tok = ByteTokenizer()
    state = new_detokenizer([], SamplingParams())
    diffs = []
    for b in "中".encode():
        state, delta = detokenize(state, [b], tok)
        diffs.append(delta.text_diff)
    assert diffs == ["", "", "中"]


def test_invalid_byte_followed_by_text_is_emitted_as_replacement_char():
    deltas, _ = stream(ByteTokenizer(), [], [0xFF, 0x41], SamplingParams())
    assert [d.text_diff for d in deltas] == ["", "\ufffdA", ""]


def test_flush_releases_an_incomplete_character_as_replacement_char():
    tok = ByteTokenizer()
    state = new_detokenizer([], SamplingParams())
    state, delta = detokenize(state, [0x41, *"中".encode()[:2]], tok)
    assert delta.text_diff == "A"
    state, delta = flush(state, tok)
    assert delta.text_diff == "\ufffd" and not delta.finished_by_stop and state.finished


def test_flush_releases_text_held_back_for_a_stop_string():
    tok = ByteTokenizer()
    state = new_detokenizer([], SamplingParams(stop=("abc",)))
    state, delta = detokenize(state, tok.encode("xab", add_special_tokens=False), tok)
    assert delta.text_diff == "x"
    state, delta = flush(state, tok)
    assert delta.text_diff == "ab" and delta.stop_string is None


def test_flush_can_complete_a_stop_string():
    tok = ByteTokenizer()
    state = new_detokenizer([], SamplingParams(stop=("a\ufffd",)))
    state, delta = detokenize(state, [0x61, 0xE4], tok)
    assert delta.text_diff == ""
    state, delta = flush(state, tok)
    assert (delta.text_diff, delta.stop_string, delta.num_tokens_kept) == ("", "a\ufffd", 2)


def test_finished_state_rejects_more_tokens_and_flushes_to_nothing():
    tok = ByteTokenizer()
    state = new_detokenizer([], SamplingParams(stop=("b",)))
    state, delta = detokenize(state, [0x61, 0x62, 0x63], tok)
    assert delta.finished_by_stop and state.finished
    with pytest.raises(ValueError, match="finished"):
        detokenize(state, [0x61], tok)
    assert flush(state, tok)[1].text_diff == ""


@pytest.mark.parametrize("skip, expected", [(True, "Hi"), (False, "H</s>i<s>")])
def test_skip_special_tokens_is_honoured_by_byte_tokenizer(skip, expected):
    deltas, _ = stream(ByteTokenizer(), [256], [72, 257, 105, 256], SamplingParams(skip_special_tokens=skip))
    assert text_of(deltas) == expected


@pytest.mark.parametrize("skip, expected", [(True, "Hello world"), (False, "Hello</s> world")])
def test_skip_special_tokens_is_honoured_by_hf_tokenizer(skip, expected):
    tok = metaspace_bpe()
    hello, world = (tok.encode(w, add_special_tokens=False) for w in ("Hello", "world"))
    deltas, _ = stream(tok, [], [*hello, tok.eos_token_id, *world], SamplingParams(skip_special_tokens=skip))
    assert text_of(deltas) == expected


def test_decode_window_stays_short_over_a_long_generation():
    seen = []

    class Counting(ByteTokenizer):
        def decode(self, token_ids, skip_special_tokens=False):
            seen.append(len(token_ids))
            return ByteTokenizer.decode(self, token_ids, skip_special_tokens)

    prompt = list(range(65, 85))
    stream(Counting(), prompt, [97 + i % 26 for i in range(500)], SamplingParams(stop=("zzz",)))
    assert max(seen) <= PROMPT_CONTEXT_TOKENS + 1


# --- stop strings -------------------------------------------------------------------------------


def reference_stop(text, stops, include):
    """(final text, stop, end char) when text arrives one character at a time; stop None if none."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if text[:end].endswith(s)]
        if hits:
            s = max(hits, key=len)
            return (text[:end] if include else text[: end - len(s)]), s, end
    return text, None, None


STOP_ALPHABET = "abé中😀"


@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet=STOP_ALPHABET, max_size=20),
    st.lists(st.text(alphabet=STOP_ALPHABET, min_size=1, max_size=4), min_size=1, max_size=3),
    st.booleans(),
    st.lists(st.integers(1, 5), min_size=1, max_size=5),
)
def test_stop_strings_trim_exactly_and_streamed_text_never_leaks(text, stops, include, chunks):
    tok = ByteTokenizer()
    ids = tok.encode(text, add_special_tokens=False)
    params = SamplingParams(stop=tuple(stops), include_stop_str_in_output=include)
    expected, stop, end = reference_stop(text, stops, include)

    state = new_detokenizer([tok.bos_token_id], params)
    emitted, i, k, delta = "", 0, 0, None
    while i < len(ids) and not state.finished:
        n = chunks[k % len(chunks)]
        state, delta = detokenize(state, ids[i : i + n], tok)
        emitted += delta.text_diff
        i, k = i + n, k + 1
        assert expected.startswith(emitted)  # nothing streamed is ever trimmed later
        if not state.finished:  # held back: at most max stop length - 1 complete characters
            complete = bytes(ids[:i]).decode("utf-8", errors="ignore")
            assert len(complete) - len(emitted) <= max(map(len, stops)) - 1
    if not state.finished:
        state, delta = flush(state, tok)
        emitted += delta.text_diff

    assert emitted == expected
    assert delta.stop_string == stop and delta.finished_by_stop == (stop is not None)
    assert delta.num_tokens_kept == (None if stop is None else len(text[:end].encode()))
    assert state.num_chars_emitted == len(expected)


def test_text_that_cannot_begin_a_stop_string_is_emitted_at_once():
    tok = ByteTokenizer()
    state = new_detokenizer([], SamplingParams(stop=("abc",)))
    state, delta = detokenize(state, list(b"xab"), tok)
    assert delta.text_diff == "x"
    state, delta = detokenize(state, list(b"d"), tok)
    assert delta.text_diff == "abd"


@pytest.mark.parametrize(
    "stops, text, expected_stop, expected_text",
    [
        (("abcd", "bc"), "abcd", "bc", "a"),  # the stop that completes first wins
        (("c", "bc"), "abcd", "bc", "a"),  # same end: the longest wins
    ],
)
def test_earliest_completing_stop_wins_within_one_chunk(stops, text, expected_stop, expected_text):
    tok = ByteTokenizer()
    state = new_detokenizer([], SamplingParams(stop=stops))
    _, delta = detokenize(state, list(text.encode()), tok)
    assert (delta.stop_string, delta.text_diff) == (expected_stop, expected_text)


def test_tokens_after_the_one_completing_a_stop_are_not_kept():
    tok = ByteTokenizer()
    state = new_detokenizer([], SamplingParams(stop=("STOP",)))
    _, delta = detokenize(state, list(b"ab STOP cd"), tok)
    assert (delta.text_diff, delta.num_tokens_kept) == ("ab ", 7)


@pytest.mark.parametrize("name", ["byte_level_bpe", "metaspace"])
@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_hf_tokens_is_trimmed(name, include):
    tok = tokenizer_named(name)
    ids = tok.encode("Hello world, café crème brûlée!", add_special_tokens=False)
    stop = "d, café cr"
    full = tok.decode(ids)
    first_k = next(k for k in range(1, len(ids) + 1) if stop in tok.decode(ids[:k]))
    assert tok.decode(ids[first_k - 1 : first_k]) not in (stop, "")  # the stop spans tokens
    deltas, state = stream(tok, [], ids, SamplingParams(stop=(stop,), include_stop_str_in_output=include))
    cut = full.index(stop) + (len(stop) if include else 0)
    assert text_of(deltas) == full[:cut]
    assert deltas[-1].num_tokens_kept == first_k and deltas[-1].stop_string == stop
    assert state.finished
