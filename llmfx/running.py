"""The running sequences as columns: a steady decode step updates them with a few numpy operations.

One frozen record per sequence, rebuilt twice a step, cost the scheduler ~7 us per sequence per
step (~1.9 ms at batch 256; PERF.md's target for the whole step is 0.5 ms). A `Running` holds the
per-step counters as int64 arrays and the rest as tuples shared between steps: a step replaces a
few arrays and touches per-row Python objects only where they change (a token appended to an
output, a page added). It is still a value: arrays are read-only, every update returns a new
table, and `running[i]` builds row i's `SequenceState` for code that wants records (capacity
policies, tests, the engine's rare per-request lookups).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np

from llmfx.persistent import TokenTape
from llmfx.sequence import Beam, Request, SequenceState, build_sequence

_EMPTY = np.zeros(0, dtype=np.int64)
_EMPTY.flags.writeable = False


def frozen(values: np.ndarray) -> np.ndarray:
    """values as a read-only int64 array (a table's columns are never written after it is built)."""
    out = np.ascontiguousarray(values, dtype=np.int64)
    out.flags.writeable = False
    return out


def _column(values: Iterable[int], count: int) -> np.ndarray:
    return frozen(np.fromiter(values, dtype=np.int64, count=count))


class Running(Sequence[SequenceState]):
    """Running sequences, oldest admission first, as columns (see the module docstring)."""

    __slots__ = ("requests", "beams", "outputs", "pages", "ids", "prompt_lens", "max_tokens", "num_out",
                 "computed", "inflight", "num_pages", "last", "stop_ids", "_row_of")

    # Per row, as Python objects (tuples shared until a row changes):
    requests: tuple[Request, ...]
    beams: tuple[Beam | None, ...]
    # Each row's output tokens: a list that versions of the table share and append to, each owning the
    # first num_out[i] items (TokenTape's scheme, with the lengths kept as a column: a step appends with
    # one C-level map over list.append and makes no object per row).
    outputs: tuple[list[int], ...]
    pages: tuple[tuple[int, ...], ...]  # cover `computed` tokens
    # Per row, read-only int64 arrays:
    ids: np.ndarray  # the sequence id (SequenceState.request_id)
    prompt_lens: np.ndarray
    max_tokens: np.ndarray  # its SamplingParams.max_tokens
    num_out: np.ndarray  # row i's output tokens are outputs[i][:num_out[i]]
    computed: np.ndarray  # SequenceState.num_computed_tokens
    inflight: np.ndarray  # SequenceState.num_inflight
    num_pages: np.ndarray  # len(pages[i])
    last: np.ndarray  # the last known token (output, else prompt): a decode's input when none is in flight
    # Every EOS and stop token id of every row (a superset after rows leave): tokens outside it stop no one.
    stop_ids: np.ndarray

    @classmethod
    def of(cls, seqs: Iterable[SequenceState]) -> Running:
        """A table of these sequences, in order."""
        seqs = tuple(seqs)
        n = len(seqs)
        requests = tuple(s.request for s in seqs)
        outputs = tuple(list(s.output_token_ids) for s in seqs)  # each row's own list: rows never share one
        prompts = [r.prompt_token_ids for r in requests]
        return cls._make(
            requests, tuple(s.beam for s in seqs), outputs, tuple(s.pages for s in seqs),
            _column((s.request_id for s in seqs), n), _column(map(len, prompts), n),
            _column((r.params.max_tokens for r in requests), n), _column(map(len, outputs), n),
            _column((s.num_computed_tokens for s in seqs), n), _column((s.num_inflight for s in seqs), n),
            _column((len(s.pages) for s in seqs), n),
            _column(((o[-1] if len(o) else p[-1]) for o, p in zip(outputs, prompts)), n),
            _stop_ids(requests))

    @classmethod
    def _make(cls, requests, beams, outputs, pages, ids, prompt_lens, max_tokens, num_out, computed, inflight,
              num_pages, last, stop_ids) -> Running:
        t = object.__new__(cls)
        t.requests, t.beams, t.outputs, t.pages = requests, beams, outputs, pages
        t.ids, t.prompt_lens, t.max_tokens, t.num_out = ids, prompt_lens, max_tokens, num_out
        t.computed, t.inflight, t.num_pages, t.last, t.stop_ids = computed, inflight, num_pages, last, stop_ids
        t._row_of = None
        return t

    def replace(self, **columns) -> Running:
        """This table with some columns replaced (same rows, same order); arrays are frozen on the way in."""
        t = object.__new__(Running)
        for name, slot in _SLOTS:
            slot.__set__(t, slot.__get__(self))
        for name, value in columns.items():
            if isinstance(value, np.ndarray):
                value.flags.writeable = False  # the caller's fresh array, now the table's
            getattr(Running, name).__set__(t, value)
        t._row_of = None if "ids" in columns else self._row_of
        return t

    def take(self, rows: Sequence[int] | np.ndarray) -> Running:
        """The table of these rows, in this order."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == len(self) and (rows == np.arange(len(self))).all():
            return self
        if not len(rows):
            return EMPTY_RUNNING
        pick = rows.tolist()

        def get(column: tuple) -> tuple:
            return tuple(map(column.__getitem__, pick))

        return Running._make(get(self.requests), get(self.beams), get(self.outputs), get(self.pages),
                             *(frozen(getattr(self, name)[rows]) for name in _ARRAYS), self.stop_ids)

    def without(self, rows: Iterable[int]) -> Running:
        """The table less these rows, order kept."""
        keep = np.ones(len(self), dtype=bool)
        keep[list(rows)] = False
        return self.take(np.flatnonzero(keep))

    def __add__(self, other: Running | tuple) -> Running | tuple:
        """Another table's rows after these; with a tuple of records, the tuple of both (like a tuple would)."""
        if isinstance(other, tuple):
            return tuple(self) + other
        if not isinstance(other, Running):
            return NotImplemented
        if not len(other):
            return self
        if not len(self):
            return other
        return Running._make(self.requests + other.requests, self.beams + other.beams, self.outputs + other.outputs,
                             self.pages + other.pages,
                             *(frozen(np.concatenate([getattr(self, n), getattr(other, n)])) for n in _ARRAYS),
                             frozen(np.union1d(self.stop_ids, other.stop_ids)))

    def __radd__(self, other: tuple) -> tuple:
        return other + tuple(self) if isinstance(other, tuple) else NotImplemented

    def row_of(self) -> Mapping[int, int]:
        """Sequence id -> row (built once per table)."""
        if self._row_of is None:
            self._row_of = dict(zip(self.ids.tolist(), range(len(self.ids))))
        return self._row_of

    def by_id(self) -> SequenceLookup:
        """Sequence id -> its SequenceState, each built when looked up."""
        return SequenceLookup(self)

    def __len__(self) -> int:
        return len(self.requests)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return tuple(self[i] for i in range(*index.indices(len(self))))
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"row {index} of a table of {n} running sequences")
        i = index % n
        return build_sequence(self.requests[i], self.output_of(i), int(self.computed[i]), self.pages[i],
                              int(self.inflight[i]), self.beams[i])

    def output_of(self, row: int) -> TokenTape:
        """Row `row`'s output tokens, as a tape that owns its prefix of the row's list."""
        return TokenTape.prefix_of(self.outputs[row], int(self.num_out[row]))

    def __iter__(self) -> Iterator[SequenceState]:
        return map(self.__getitem__, range(len(self)))

    def __eq__(self, other) -> bool:
        if isinstance(other, Running):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"Running({list(self)!r})"


# The int64 columns in _make's order after the four tuples (stop_ids, a set-like column, excluded).
_ARRAYS = ("ids", "prompt_lens", "max_tokens", "num_out", "computed", "inflight", "num_pages", "last")


def _stop_ids(requests: Iterable[Request]) -> np.ndarray:
    ids = set(itertools.chain.from_iterable(
        itertools.chain(r.eos_token_ids, r.params.stop_token_ids) for r in requests))
    return frozen(np.array(sorted(ids), dtype=np.int64)) if ids else _EMPTY


_SLOTS = tuple((name, getattr(Running, name)) for name in Running.__slots__ if name != "_row_of")
EMPTY_RUNNING = Running._make((), (), (), (), *(_EMPTY,) * len(_ARRAYS), _EMPTY)


class SequenceLookup(Mapping):
    """A table's sequences by id; each lookup builds its record (the engine reads a few rows a step)."""

    __slots__ = ("_table",)

    def __init__(self, table: Running) -> None:
        self._table = table

    def __getitem__(self, seq_id: int) -> SequenceState:
        return self._table[self._table.row_of()[seq_id]]

    def __iter__(self) -> Iterator[int]:
        return iter(self._table.row_of())

    def __len__(self) -> int:
        return len(self._table)
