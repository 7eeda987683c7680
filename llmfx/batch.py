"""ForwardBatch: a packed batch as the model sees it, and `pack`, which builds one on the host."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
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


def pack(
    chunks: Sequence[Chunk],
    page_size: int,
    device: torch.device | str = "cpu",
    *,
    num_tokens: int | None = None,
    num_seqs: int | None = None,
    max_pages: int | None = None,
) -> ForwardBatch:
    """Build a ForwardBatch, padded to num_tokens rows, num_seqs sequences and max_pages columns."""
    tokens: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    starts = [0]
    lens: list[int] = []
    for chunk in chunks:
        end = chunk.start_pos + len(chunk.token_ids)
        assert len(chunk.pages) * page_size >= end, "a chunk's pages must cover its tokens"
        tokens.extend(chunk.token_ids)
        positions.extend(range(chunk.start_pos, end))
        # One run of consecutive slots per page touched: O(pages) Python steps, not O(tokens).
        for index in range(chunk.start_pos // page_size, -(-end // page_size)):
            base = chunk.pages[index] * page_size - index * page_size  # slot of position p is base + p
            slots.extend(range(base + max(chunk.start_pos, index * page_size), base + min(end, (index + 1) * page_size)))
        starts.append(len(tokens))
        lens.append(end)
    real_tokens, real_seqs = len(tokens), len(chunks)
    num_tokens = real_tokens if num_tokens is None else num_tokens
    num_seqs = real_seqs if num_seqs is None else num_seqs
    widest = max((len(c.pages) for c in chunks), default=0)
    max_pages = max(widest, 1) if max_pages is None else max_pages
    assert num_tokens >= real_tokens and num_seqs >= real_seqs and max_pages >= widest
    pad_tokens = num_tokens - real_tokens
    pad_seqs = num_seqs - real_seqs
    table = [0] * (num_seqs * max_pages)
    for b, chunk in enumerate(chunks):
        table[b * max_pages: b * max_pages + len(chunk.pages)] = chunk.pages
    last_rows = [s - 1 for s in starts[1:]] + [0] * pad_seqs
    # One host buffer and one copy: pinned and asynchronous on CUDA, so packing never waits for the
    # step that is still running (a pageable copy would synchronize the stream).
    host = torch.tensor(tokens + [0] * pad_tokens + positions + [0] * pad_tokens + slots + [-1] * pad_tokens
                        + last_rows + starts + [real_tokens] * pad_seqs + lens + [0] * pad_seqs + table,
                        dtype=torch.int64)
    device = torch.device(device)
    if device.type == "cuda":
        host = host.pin_memory()
    flat = host.to(device, non_blocking=True)
    t, b = num_tokens, num_seqs
    token_ids, positions_d, slot_mapping, logits_indices, rest = flat.split([t, t, t, b, flat.numel() - 3 * t - b])
    rest = rest.to(torch.int32)
    query_start_loc, seq_lens, page_table = rest.split([b + 1, b, b * max_pages])
    return ForwardBatch(token_ids=token_ids, positions=positions_d, slot_mapping=slot_mapping,
                        query_start_loc=query_start_loc, seq_lens=seq_lens,
                        page_table=page_table.view(b, max_pages), logits_indices=logits_indices)
