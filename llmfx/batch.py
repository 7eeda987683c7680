"""ForwardBatch: a packed batch as the model sees it (built by llmfx.step_inputs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from torch import Tensor


class Chunk(Protocol):
    """One sequence's share of a step: new tokens at start_pos, over the sequence's pages."""

    token_ids: Sequence[int]
    start_pos: int
    pages: Sequence[int]


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
