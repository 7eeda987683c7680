"""ByteTokenizer: one token per UTF-8 byte, three specials, ids past the specials carry no text."""

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmfx.tokenizer import ByteTokenizer

TOK = ByteTokenizer(vocab_size=512)


@given(st.text())
def test_decode_inverts_encode_without_specials(text):
    assert TOK.decode(TOK.encode(text, add_special_tokens=False)) == text


@given(st.text())
def test_encode_prepends_bos_which_skip_special_tokens_drops(text):
    ids = TOK.encode(text)
    assert ids[0] == TOK.bos_token_id == 256
    assert ids[1:] == list(text.encode("utf-8"))
    assert TOK.decode(ids, skip_special_tokens=True) == text
    assert TOK.decode(ids, skip_special_tokens=False) == "<s>" + text


def test_special_ids_are_256_257_258():
    assert (TOK.bos_token_id, TOK.eos_token_id, TOK.pad_token_id) == (256, 257, 258)
    assert sorted(TOK.all_special_ids) == [256, 257, 258]
    assert (TOK.bos_token, TOK.eos_token, TOK.pad_token) == ("<s>", "</s>", "<pad>")


def test_len_and_vocab_size_are_the_constructor_value():
    assert len(TOK) == TOK.vocab_size == 512
    assert len(ByteTokenizer()) == 259


def test_special_tokens_decode_to_their_text_unless_skipped():
    ids = [72, 256, 105, 257, 258]
    assert TOK.decode(ids, skip_special_tokens=False) == "H<s>i</s><pad>"
    assert TOK.decode(ids, skip_special_tokens=True) == "Hi"


def test_ids_past_the_specials_decode_to_nothing():
    assert TOK.decode([259, 300, 511]) == ""
    assert TOK.decode([72, 259, 105], skip_special_tokens=False) == "Hi"


def test_ids_without_text_do_not_split_a_character():
    e_acute = list("é".encode())
    assert TOK.decode([e_acute[0], 400, e_acute[1]]) == "é"


def test_incomplete_multibyte_character_decodes_to_replacement_char():
    assert TOK.decode(list("中".encode())[:2]) == "\ufffd"
    assert TOK.decode([0xFF, 0x41]) == "\ufffdA"


def test_decode_accepts_a_single_id():
    assert TOK.decode(65) == "A"


def test_text_is_not_parsed_for_special_tokens():
    assert TOK.encode("<s>", add_special_tokens=False) == [60, 115, 62]


def test_out_of_range_id_is_rejected():
    with pytest.raises(ValueError, match=r"\[0, 512\)"):
        TOK.decode([512])
    with pytest.raises(ValueError):
        TOK.decode([-1])


@pytest.mark.parametrize("bad", [258, 0, -5, 300.0, True, "300"])
def test_vocab_size_below_259_or_not_int_is_rejected(bad):
    with pytest.raises(ValueError, match="vocab_size"):
        ByteTokenizer(vocab_size=bad)


def test_tokenizer_is_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TOK.vocab_size = 1000
