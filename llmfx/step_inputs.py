"""Step inputs: everything a step reads from the host, in one float64 buffer moved by one copy.

The host fills a buffer laid out by StepLayout; one asynchronous copy moves it into a device buffer
that lives as long as the engine, so a CUDA graph reads its inputs in place (nothing is copied at
replay) and the host allocates nothing per step. float64 holds every field exactly: token ids,
positions, slots, page ids and 32-bit seeds are integers below 2**53, sampling parameters are
float32 values. `StepViews.unpack` converts the fields on the device, before the compiled step
(inside the CUDA graph when graphs are captured by hand). The layout keeps the fields of each device
dtype in one block (int32, then float32, then int64), so the conversion is three kernels: one a field
was 14 small kernels, 30.6 us at the start of a batch-256 step on the H200 (3 kernels: 9.3 us; benchmarks/README.md,
session 16).
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from llmfx.batch import BatchColumns, Chunk, ForwardBatch
from llmfx.sampler import (NUM_FLOAT_FIELDS, SAMPLING_FIELDS, SamplingTensors, request_seed, sampling_row,
                           write_sampling_rows)
from llmfx.sampling_params import SamplingParams

# Per-token rows and their padding values: padding rows embed token 0 at position 0, write their
# K/V into the null page (slot -1) and read their token from the host (gather -1).
TOKEN_ROWS = (("token_ids", 0.0), ("positions", 0.0), ("slot_mapping", -1.0), ("gather_rows", -1.0))
# Per-sequence rows: the context length (int32), the sampling fields (float32, then int64), the last row of
# each sequence (int64). With the token rows after them, the int64 fields end the buffer in one block.
SEQ_ROWS = (("seq_lens", 0.0),) + SAMPLING_FIELDS + (("logits_indices", 0.0),)
_SAMPLING_AT = 1  # first sampling row in SEQ_ROWS
_SAMPLING_END = _SAMPLING_AT + len(SAMPLING_FIELDS)
_INT64_AT = _SAMPLING_AT + NUM_FLOAT_FIELDS  # first int64 row in SEQ_ROWS
_LOGITS_AT = len(SEQ_ROWS) - 1
_POSITION_AT = _SAMPLING_AT + [name for name, _ in SAMPLING_FIELDS].index("position")


@dataclass(frozen=True, slots=True)
class StepLayout:
    """Where each field of a T-token, B-sequence, P-page-wide step lives in the flat buffer:
    [query_start_loc | page_table | SEQ_ROWS | TOKEN_ROWS], i.e. int32 fields, float32, int64."""

    num_tokens: int
    num_seqs: int
    max_pages: int

    def parts(self) -> tuple[int, ...]:
        """Element counts of the buffer's parts, in order: query_start_loc, page_table, then SEQ_ROWS' int32 row,
        float32 rows and int64 rows, then TOKEN_ROWS. The first three parts are int32 on the device, the fourth
        float32, the last two int64: each dtype one block."""
        t, b, p = self.num_tokens, self.num_seqs, self.max_pages
        return (b + 1, b * p, _SAMPLING_AT * b, NUM_FLOAT_FIELDS * b, (len(SEQ_ROWS) - _INT64_AT) * b,
                len(TOKEN_ROWS) * t)

    @property
    def size(self) -> int:
        return sum(self.parts())

    def views(self, flat: Tensor) -> StepViews:
        """Views of this layout over the first `size` elements of flat (host or device)."""
        n_starts, n_table, n_seq_lens, n_floats, n_ints, n_tokens = self.parts()
        starts, table, seqs, tokens, _ = flat.split(
            [n_starts, n_table, n_seq_lens + n_floats + n_ints, n_tokens, flat.numel() - self.size])
        b = self.num_seqs
        return StepViews(tokens=tokens.view(len(TOKEN_ROWS), self.num_tokens), seqs=seqs.view(len(SEQ_ROWS), b),
                         query_start_loc=starts, page_table=table.view(b, self.max_pages), layout=self,
                         flat=flat[: self.size])


@dataclass(frozen=True, slots=True)
class StepViews:
    """One step's inputs as float64 views of one buffer; `unpack` gives the model and sampler their tensors."""

    tokens: Tensor  # [4, T] TOKEN_ROWS
    seqs: Tensor  # [1 + 9 + 1, B] SEQ_ROWS
    query_start_loc: Tensor  # [B + 1]
    page_table: Tensor  # [B, P]
    layout: StepLayout
    flat: Tensor  # the whole layout, the fields above in order

    def unpack(self) -> tuple[ForwardBatch, SamplingTensors, Tensor]:
        """(batch, sampling, gather_rows [T] int64): the device-side conversions, one per dtype block."""
        n_starts, n_table, n_seq_lens, n_floats, n_ints, n_tokens = parts = self.layout.parts()
        int32, float32, int64 = self.flat.split([n_starts + n_table + n_seq_lens, n_floats, n_ints + n_tokens])
        starts, table, seq_lens = int32.int().split(parts[:3])
        seq_ints, tokens = int64.long().split(parts[4:])
        b = self.layout.num_seqs
        seq_ints, tokens = seq_ints.view(len(SEQ_ROWS) - _INT64_AT, b), tokens.view(len(TOKEN_ROWS), self.layout.num_tokens)
        batch = ForwardBatch(token_ids=tokens[0], positions=tokens[1], slot_mapping=tokens[2], query_start_loc=starts,
                             seq_lens=seq_lens, page_table=table.view(b, self.layout.max_pages),
                             logits_indices=seq_ints[-1])
        sampling = SamplingTensors.of_blocks(float32.float().view(NUM_FLOAT_FIELDS, b), seq_ints[:-1])
        return batch, sampling, tokens[3]


def fill_batch(views: StepViews, chunks: BatchColumns, page_size: int, *, table_done: bool = False) -> None:
    """Write the model inputs of `chunks` (and padding after them) into host views.

    table_done: the caller has written the page table already (StepStager keeps its rows cached).
    Sampling rows are left to the caller; gather rows are set to -1 (every token from the host).
    Slots are read from the page table with numpy, so a step costs a few numpy operations over its
    chunks and one C-level pass over their page lists, not a Python loop per token or page.
    """
    table = views.page_table.numpy()
    if not table_done:
        table[:] = 0  # unused entries point at the null page
        for row, pages in enumerate(chunks.pages):
            table[row, : len(pages)] = pages
    b = len(chunks.counts)
    counts = chunks.counts
    ends = chunks.starts + counts
    num_pages = np.fromiter(map(len, chunks.pages), dtype=np.int64, count=b)
    assert (num_pages * page_size >= ends).all(), "a chunk's pages must cover its tokens"
    starts = np.zeros(b + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    t = int(starts[-1])
    layout_t, layout_b = views.tokens.shape[1], views.seqs.shape[1]
    assert t <= layout_t and b <= layout_b, f"{t} tokens / {b} sequences do not fit the layout {layout_t} / {layout_b}"
    seq_of = np.repeat(np.arange(b), counts)  # [t] the sequence of each token row
    positions = np.arange(t) + np.repeat(ends - starts[1:], counts)  # a chunk's rows hold its last `count` positions
    rows = views.tokens.numpy()
    rows[0, :t] = chunks.tokens
    rows[1, :t] = positions
    rows[2, :t] = table[seq_of, positions // page_size] * page_size + positions % page_size
    rows[:3, t:] = np.array([[0.0], [0.0], [-1.0]])
    rows[3, :] = -1
    seqs = views.seqs.numpy()
    seqs[_LOGITS_AT, :b] = starts[1:] - 1
    seqs[0, :b] = ends  # seq_lens
    seqs[[0, _LOGITS_AT], b:] = 0
    qsl = views.query_start_loc.numpy()
    qsl[: b + 1] = starts
    qsl[b + 1:] = t  # padding sequences own no rows


def fill_sampling(views: StepViews, rows: Sequence[Sequence[float]]) -> None:
    """Write per-sequence sampling rows (SAMPLING_FIELDS order) and neutral padding after them."""
    write_sampling_rows(views.seqs.numpy()[_SAMPLING_AT:_SAMPLING_END], rows)


@dataclass(frozen=True, slots=True)
class StagedFacts:
    """What the engine needs to know about a staged step beyond its buffer, from facts cached per request."""

    top_rows: tuple[int, ...]  # rows whose top-20 is read back: for their logprobs, or as their beam's candidates
    penalized: bool  # some row applies a repetition, presence or frequency penalty
    filtering: bool  # some row samples through a top-k, top-p or min-p filter (the sampler's sort)
    sampled: bool  # some row samples (temperature > 0); else every row is greedy


class StepStager:
    """The host side of step inputs, with caches that make a steady decode step O(sequences) numpy work.

    Each running request owns a slot: a row of a host page table, updated by appending the pages a
    sequence gained, a sampling row (the position is written per step) and the facts StagedFacts
    reports, all read from its params once. A step's page table and sampling rows are then one
    gather of slot rows each. A token equal to `placeholder` is gathered on the device from the
    token-pool row its sequence had in the previous fill. Owned by one ModelEngine, used by its thread.
    """

    def __init__(self, *, page_size: int, max_pages: int, max_rows: int, engine_seed: int, placeholder: int) -> None:
        self.page_size = page_size
        self.engine_seed = engine_seed
        self.placeholder = placeholder
        slots = max_rows + 1  # the last slot is padding: all-null pages, neutral sampling
        self._padding_slot = max_rows
        self._table = np.zeros((slots, max_pages), dtype=np.float64)
        self._sampling = np.empty((slots, len(SAMPLING_FIELDS)), dtype=np.float64)
        self._sampling[:] = [neutral for _, neutral in SAMPLING_FIELDS]
        self._wants_top = np.zeros(slots, dtype=bool)
        self._penalized = np.zeros(slots, dtype=bool)
        self._filters = np.zeros(slots, dtype=bool)
        self._sampled = np.zeros(slots, dtype=bool)
        self._last_row = np.full(slots, -1, dtype=np.int64)  # the slot's row in the previous fill
        self._slots: dict[int, int] = {}  # request id -> slot
        self._sent: dict[int, tuple[int, ...]] = {}  # request id -> the pages its table row holds

    def fill(self, views: StepViews, chunks: BatchColumns, params_of: Callable[[int], SamplingParams]) -> StagedFacts:
        """Fill every field for chunks (of the sequences chunks.ids).

        params_of(sequence id) is called only for a sequence not seen before (its facts are cached).
        """
        b = len(chunks.ids)
        slots = np.full(views.page_table.shape[0], self._padding_slot, dtype=np.int64)
        slots[:b] = self._update_slots(chunks.pages, chunks.ids.tolist(), params_of)
        np.take(self._table, slots, axis=0, out=views.page_table.numpy())
        fill_batch(views, chunks, self.page_size, table_done=True)
        seqs = views.seqs.numpy()
        seqs[_SAMPLING_AT:_SAMPLING_END] = self._sampling[slots].T
        seqs[_POSITION_AT, :b] = seqs[0, :b]  # the sampled token's position: the context length
        tokens = views.tokens.numpy()
        held = np.flatnonzero(tokens[0] == self.placeholder)
        if held.size:  # a placeholder is a decode's only token: its row is its sequence's last
            pool_rows = self._last_row[slots[np.searchsorted(seqs[_LOGITS_AT, :b], held)]]
            assert (pool_rows >= 0).all(), "a placeholder of a sequence the previous step did not run"
            tokens[3, held] = pool_rows
        self._last_row[slots[:b]] = np.arange(b)
        mine = slots[:b]
        return StagedFacts(top_rows=tuple(np.flatnonzero(self._wants_top[mine]).tolist()),
                           penalized=bool(self._penalized[mine].any()), filtering=bool(self._filters[mine].any()),
                           sampled=bool(self._sampled[mine].any()))

    def _update_slots(self, page_lists: Sequence[Sequence[int]], request_ids: Sequence[int],
                      params_of: Callable[[int], SamplingParams]) -> list[int]:
        """Each request's slot, with its table row brought up to date; a new request's facts are read once."""
        present = set(request_ids)
        for rid in self._slots.keys() - present:  # gone (finished, preempted, waiting)
            self._last_row[self._slots.pop(rid)] = -1
            del self._sent[rid]
        free = iter(sorted(set(range(self._padding_slot)) - set(self._slots.values()))) if len(present) > len(
            self._slots) else iter(())
        # Most rows hold the very page tuple they held last step: find the others with C-level maps.
        same = list(map(operator.is_, page_lists, map(self._sent.get, request_ids)))
        for k in itertools.compress(range(len(same)), map(operator.not_, same)):
            rid, pages = request_ids[k], tuple(page_lists[k])
            sent = self._sent.get(rid)
            if sent is not None and pages == sent:
                self._sent[rid] = pages
                continue
            if sent is None:
                self._slots[rid] = slot = next(free)
                self._admit(slot, rid, params_of(rid))
            row = self._table[self._slots[rid]]
            if sent is not None and len(pages) > len(sent) and pages[: len(sent)] == sent:
                row[len(sent): len(pages)] = pages[len(sent):]  # appended pages only
            else:
                row[:] = 0
                row[: len(pages)] = pages
            self._sent[rid] = pages
        return list(map(self._slots.__getitem__, request_ids))

    def _admit(self, slot: int, rid: int, p: SamplingParams) -> None:
        self._sampling[slot] = sampling_row(p, request_seed(p.seed, self.engine_seed, rid), 0)
        self._wants_top[slot] = p.logprobs is not None or p.use_beam_search
        self._penalized[slot] = p.penalized
        self._filters[slot] = p.filters
        self._sampled[slot] = not p.greedy


def host_buffer(size: int, *, pinned: bool) -> Tensor:
    """A float64 host buffer for step inputs; pinned so its copy to the device is asynchronous."""
    return torch.zeros(size, dtype=torch.float64, pin_memory=pinned)


def pack(chunks: Sequence[Chunk], page_size: int, device: torch.device | str = "cpu", *,
         num_tokens: int | None = None, num_seqs: int | None = None, max_pages: int | None = None) -> ForwardBatch:
    """A ForwardBatch of chunks, padded to num_tokens rows, num_seqs sequences and max_pages columns.

    For callers without an engine (scoring, references, tests): one buffer, one copy, like a step.
    """
    real_tokens = sum(len(c.token_ids) for c in chunks)
    widest = max((len(c.pages) for c in chunks), default=0)
    layout = StepLayout(num_tokens=real_tokens if num_tokens is None else num_tokens,
                        num_seqs=len(chunks) if num_seqs is None else num_seqs,
                        max_pages=max(widest, 1) if max_pages is None else max_pages)
    assert layout.num_tokens >= real_tokens and layout.num_seqs >= len(chunks) and layout.max_pages >= widest
    device = torch.device(device)
    host = host_buffer(layout.size, pinned=device.type == "cuda")
    views = layout.views(host)
    fill_batch(views, BatchColumns.of(chunks), page_size)
    fill_sampling(views, [])
    return layout.views(host.to(device, non_blocking=True)).unpack()[0]
