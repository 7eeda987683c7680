"""A step's chunks: as arrays (BatchColumns, what the scheduler hands the engine) and packed as the model sees
them (ForwardBatch, built by llmfx.step_inputs)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import NamedTuple, Protocol, Sequence

import numpy as np

from torch import Tensor


class Chunk(Protocol):
    """One sequence's share of a step: new tokens at start_pos, over the sequence's pages."""

    token_ids: Sequence[int]
    start_pos: int
    pages: Sequence[int]


class BatchColumns(NamedTuple):
    """A step's chunks as arrays, in batch order: what staging reads and postprocess matches rows by."""

    ids: np.ndarray  # int64 [B] sequence ids
    starts: np.ndarray  # int64 [B] each chunk's start_pos
    counts: np.ndarray  # int64 [B] tokens each chunk feeds
    samples: np.ndarray  # bool [B] the chunk reaches its sequence's end: a token is sampled
    tokens: np.ndarray  # int64 [sum(counts)] every chunk's tokens, concatenated
    pages: tuple[Sequence[int], ...]  # [B] each chunk's page list, covering start + count

    @classmethod
    def of(cls, chunks: Sequence[Chunk], ids: Sequence[int] | None = None,
           samples: Sequence[bool] | None = None) -> BatchColumns:
        """Columns of plain chunks (ids 0 and every row sampling unless given)."""
        b = len(chunks)
        counts = np.fromiter((len(c.token_ids) for c in chunks), np.int64, b)
        return cls(ids=np.zeros(b, np.int64) if ids is None else np.asarray(ids, np.int64).reshape(b),
                   starts=np.fromiter((c.start_pos for c in chunks), np.int64, b), counts=counts,
                   samples=np.ones(b, bool) if samples is None else np.asarray(samples, bool).reshape(b),
                   tokens=np.fromiter(itertools.chain.from_iterable(c.token_ids for c in chunks), np.int64,
                                      int(counts.sum())),
                   pages=tuple(c.pages for c in chunks))

    def token_counts(self) -> tuple[int, int, int]:
        """(tokens fed, decode rows (fed one token), context tokens: the sum of start + count over rows)."""
        return int(self.counts.sum()), int((self.counts == 1).sum()), int((self.starts + self.counts).sum())


@dataclass(frozen=True, slots=True, kw_only=True)
class ForwardBatch:
    """Tokens of several sequences concatenated; each sequence is a prefill chunk or a decode token."""

    token_ids: Tensor  # [T] int64
    positions: Tensor  # [T] int64
    slot_mapping: Tensor  # [T] int64, page * S + offset; padding rows -1 (the null page)
    query_start_loc: Tensor  # [B+1] int32, sequence b owns rows query_start_loc[b]:query_start_loc[b+1]
    seq_lens: Tensor  # [B] int32, context length after this step (cached + new)
    page_table: Tensor  # [B, max_pages] int32, unused entries 0 (the null page)
    logits_indices: Tensor  # [B] int64, the row of each sequence's last token

    @property
    def num_tokens(self) -> int:
        return self.token_ids.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]


@dataclass(frozen=True, slots=True)
class SequenceChunk:
    """A plain Chunk, for callers that have no scheduler."""

    token_ids: tuple[int, ...]
    start_pos: int
    pages: tuple[int, ...]
