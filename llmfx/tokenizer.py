"""ByteTokenizer: the embedded tokenizer that needs no files (one token per UTF-8 byte, then three specials)."""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass

BYTE_VOCAB = 256
BOS_TOKEN_ID = 256
EOS_TOKEN_ID = 257
PAD_TOKEN_ID = 258
_SPECIAL_TEXT = {BOS_TOKEN_ID: "<s>", EOS_TOKEN_ID: "</s>", PAD_TOKEN_ID: "<pad>"}
MIN_VOCAB_SIZE = 259


@dataclass(frozen=True, slots=True, kw_only=True)
class ByteTokenizer:
    """Token id = byte value 0..255; <s>=256, </s>=257, <pad>=258; ids 259..vocab_size-1 carry no text.

    Offers the part of the Hugging Face tokenizer interface the engine uses (encode, decode, the
    special-token attributes, len). Text is never parsed for special tokens: encode("<s>") gives
    the three bytes, so a prompt cannot inject a special id.
    """

    vocab_size: int = MIN_VOCAB_SIZE

    def __post_init__(self) -> None:
        v = self.vocab_size
        if not isinstance(v, int) or isinstance(v, bool) or v < MIN_VOCAB_SIZE:
            raise ValueError(f"ByteTokenizer.vocab_size must be an integer >= {MIN_VOCAB_SIZE}, got {v!r}")

    bos_token_id = BOS_TOKEN_ID
    eos_token_id = EOS_TOKEN_ID
    pad_token_id = PAD_TOKEN_ID
    bos_token = _SPECIAL_TEXT[BOS_TOKEN_ID]
    eos_token = _SPECIAL_TEXT[EOS_TOKEN_ID]
    pad_token = _SPECIAL_TEXT[PAD_TOKEN_ID]

    @property
    def all_special_ids(self) -> list[int]:
        return list(_SPECIAL_TEXT)

    @property
    def all_special_tokens(self) -> list[str]:
        return list(_SPECIAL_TEXT.values())

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """UTF-8 bytes of text as ids, with <s> prepended when add_special_tokens."""
        ids = list(text.encode("utf-8"))
        return [BOS_TOKEN_ID, *ids] if add_special_tokens else ids

    def decode(self, token_ids: int | Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ids: bytes decoded as UTF-8 with errors="replace"; ids >= 259 give ""."""
        if not isinstance(token_ids, Iterable):
            token_ids = (token_ids,)
        parts: list[str] = []
        buf = bytearray()
        for raw in token_ids:
            i = operator.index(raw)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id must be in [0, {self.vocab_size}) for this ByteTokenizer, got {i}")
            if i < BYTE_VOCAB:
                buf.append(i)
            elif i in _SPECIAL_TEXT and not skip_special_tokens:
                # A special token ends any byte run, as an added token does in HF tokenizers.
                parts.append(buf.decode("utf-8", errors="replace"))
                buf.clear()
                parts.append(_SPECIAL_TEXT[i])
        parts.append(buf.decode("utf-8", errors="replace"))
        return "".join(parts)
