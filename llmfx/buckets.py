"""Padded batch buckets: the fixed shapes a compiled step is specialized and graph-captured for."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from llmfx.scheduler import ScheduledBatch


@dataclass(frozen=True, slots=True, kw_only=True)
class BucketKey:
    """The shape of one compiled step: T token rows, B sequence rows, page-table width."""

    num_tokens: int
    num_seqs: int
    decode: bool  # every sequence feeds exactly one token


@dataclass(frozen=True, slots=True, kw_only=True)
class Buckets:
    """The decode batch sizes and the prefill/mixed token counts that get a graph each."""

    decode_sizes: tuple[int, ...]  # ascending; a decode batch of b sequences pads to the first >= b
    token_counts: tuple[int, ...]  # ascending; a mixed batch of t tokens pads to the first >= t
    max_seqs: int  # sequence rows of every mixed bucket (max_batch_size)

    def key(self, batch: ScheduledBatch) -> BucketKey:
        """The bucket a scheduled batch runs in."""
        b, t = batch.num_seqs, batch.num_tokens
        if t == b:
            return BucketKey(num_tokens=_first_at_least(self.decode_sizes, b),
                             num_seqs=_first_at_least(self.decode_sizes, b), decode=True)
        return BucketKey(num_tokens=_first_at_least(self.token_counts, t), num_seqs=self.max_seqs, decode=False)

    def all_keys(self) -> tuple[BucketKey, ...]:
        """Every bucket, for warm-up: decode sizes, then token counts."""
        return tuple(BucketKey(num_tokens=b, num_seqs=b, decode=True) for b in self.decode_sizes) + tuple(
            BucketKey(num_tokens=t, num_seqs=self.max_seqs, decode=False) for t in self.token_counts)

    def warmup_order(self) -> tuple[BucketKey, ...]:
        """Every bucket in warm-up order: one row, then decode sizes descending, then token counts descending.

        Inductor picks each kernel's launch once, at the first size a shape-generic graph runs, and keeps it
        at every size (session 16: the same copy ran 39 or 78 us at batch 256 by that choice alone). One row
        goes first because it compiles apart anyway (0/1 specialization); the generic graph then compiles at
        the largest decode batch, where the launch matters. Token counts stay last: warming them up earlier
        compiled more graphs (CPU box: 9 instead of 5).
        """
        return tuple(sorted(self.all_keys(), key=lambda k: (k.num_seqs != 1, not k.decode, -k.num_tokens)))


def default_decode_sizes(max_batch_size: int) -> tuple[int, ...]:
    """1, 2, 4, 8, then every 8 up to 256 (and every 32 beyond), capped at max_batch_size."""
    sizes = [1, 2, 4] + list(range(8, 257, 8)) + list(range(288, max_batch_size + 1, 32))
    return tuple(sorted({s for s in sizes if s < max_batch_size} | {max_batch_size}))


def default_token_counts(max_num_tokens: int) -> tuple[int, ...]:
    """Powers of two from 16 up to, and always including, max_num_tokens."""
    counts, t = [], 16
    while t < max_num_tokens:
        counts.append(t)
        t *= 2
    return tuple(counts) + (max_num_tokens,)


def make_buckets(max_batch_size: int, max_num_tokens: int,
                 cuda_graph_batch_sizes: Sequence[int] | None = None) -> Buckets:
    """Buckets for the engine's limits; user decode sizes are validated and always include max_batch_size."""
    if cuda_graph_batch_sizes is None:
        decode = default_decode_sizes(max_batch_size)
    else:
        sizes = tuple(cuda_graph_batch_sizes)
        bad = [s for s in sizes if not isinstance(s, int) or isinstance(s, bool) or not 1 <= s <= max_batch_size]
        if not sizes or bad:
            raise ValueError(f"cuda_graph_batch_sizes must be integers in [1, max_batch_size={max_batch_size}], "
                             f"got {list(sizes)}")
        decode = tuple(sorted(set(sizes) | {max_batch_size}))
    return Buckets(decode_sizes=decode, token_counts=default_token_counts(max_num_tokens),
                   max_seqs=max_batch_size)


def _first_at_least(sizes: tuple[int, ...], n: int) -> int:
    for s in sizes:
        if s >= n:
            return s
    raise AssertionError(f"no bucket holds {n}: the scheduler's limits must match the buckets {sizes}")
