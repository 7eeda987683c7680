"""Persistent collections for the scheduler's state: every update returns a new value that shares most of the old.

An old value stays valid and unchanged after a new one is derived from it (capacity policies try
admissions on the pool and drop the result; `LLM.scheduler_state` is read from another thread),
yet an update costs O(log32 n) for a map, or one chunk copy for a page-indexed array, not a copy of
n entries. Batches of updates go through an edit (a transient, as in Clojure): it copies each node or
chunk it writes once, mutates its copies in place, and is spent by `finish()`, so nothing reachable
from a finished value is ever written.
"""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence, Set
from typing import Any

_BITS = 5
_WIDTH = 1 << _BITS  # children of a branch
_MASK = _WIDTH - 1
_LEAF_MAX = 32  # a leaf dict with more keys splits into a branch
_MAX_DEPTH = -(-64 // _BITS)  # hashes are 64-bit: at this depth keys agree on every bit, so leaves just grow

# A node is a leaf, a dict of at most _LEAF_MAX keys, or a branch, a list of _WIDTH nodes indexed by
# successive 5-bit slices of hash(key), lowest first. Finished nodes are shared and never written.
_Node = Any
_MISSING = object()


def _leaf(node: _Node, key) -> dict:
    """The leaf under node that holds key's slot (whether or not key is there)."""
    if type(node) is list:
        h = hash(key)
        while type(node) is list:
            node = node[h & _MASK]
            h >>= _BITS
    return node


def _iter_nodes(node: _Node) -> Iterator[dict]:
    if type(node) is dict:
        yield node
    else:
        for child in node:
            yield from _iter_nodes(child)


class PMap(Mapping):
    """A persistent hash map (a hash trie with dict leaves): `set`/`delete` return new maps; `edit()` batches."""

    __slots__ = ("_root", "_len")

    def __init__(self, items: Mapping | Iterable[tuple[Any, Any]] = ()) -> None:
        if not items:
            self._root, self._len = {}, 0
            return
        edit = MapEdit(PMap())
        for key, value in (items.items() if isinstance(items, Mapping) else items):
            edit[key] = value
        done = edit.finish()
        self._root, self._len = done._root, done._len

    @classmethod
    def _of(cls, root: _Node, length: int) -> PMap:
        m = object.__new__(cls)
        m._root, m._len = root, length
        return m

    def get(self, key, default=None):
        return _leaf(self._root, key).get(key, default)

    def __getitem__(self, key):
        return _leaf(self._root, key)[key]

    def __contains__(self, key) -> bool:
        return key in _leaf(self._root, key)

    def __iter__(self) -> Iterator:
        return itertools.chain.from_iterable(_iter_nodes(self._root))

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"PMap({dict(self.items())!r})"

    def edit(self) -> MapEdit:
        """A transient copy to update in place; `finish()` returns the new map and spends the edit."""
        return MapEdit(self)

    def set(self, key, value) -> PMap:
        """A map with key bound to value."""
        edit = MapEdit(self)
        edit[key] = value
        return edit.finish()

    def delete(self, key) -> PMap:
        """A map without key; KeyError if it is absent."""
        edit = MapEdit(self)
        del edit[key]
        return edit.finish()


class MapEdit:
    """An in-place editor over a PMap that copies each node it writes once; spent by finish()."""

    __slots__ = ("_root", "_len", "_owned")

    def __init__(self, m: PMap) -> None:
        self._root, self._len = m._root, m._len
        # id -> node for the copies this edit made (kept alive here, so an id is never reused meanwhile).
        self._owned: dict[int, _Node] | None = {}

    def _leaf_for_write(self, key) -> tuple[dict, list | None, int, int]:
        """(the owned leaf holding key's slot, its parent branch or None, its index there, its depth)."""
        owned = self._owned
        if owned is None:
            raise RuntimeError("MapEdit used after finish(): its nodes now belong to the finished map")
        node = self._root
        if id(node) not in owned:
            node = self._root = node.copy()
            owned[id(node)] = node
        parent, index, depth, h = None, 0, 0, hash(key)
        while type(node) is list:
            parent, index = node, h & _MASK
            child = node[index]
            if id(child) not in owned:
                child = node[index] = child.copy()
                owned[id(child)] = child
            node, depth, h = child, depth + 1, h >> _BITS
        return node, parent, index, depth

    def get(self, key, default=None):
        return _leaf(self._root, key).get(key, default)

    def __getitem__(self, key):
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def __contains__(self, key) -> bool:
        return self.get(key, _MISSING) is not _MISSING

    def __len__(self) -> int:
        return self._len

    def __setitem__(self, key, value) -> None:
        leaf, parent, index, depth = self._leaf_for_write(key)
        if key not in leaf:
            self._len += 1
        leaf[key] = value
        if len(leaf) > _LEAF_MAX and depth < _MAX_DEPTH:
            self._split(leaf, parent, index, depth)

    def _split(self, leaf: dict, parent: list | None, index: int, depth: int) -> None:
        """Replace an owned leaf that outgrew _LEAF_MAX by a branch of leaves on the next 5 bits of the hash."""
        branch: list[dict] = [{} for _ in range(_WIDTH)]
        shift = depth * _BITS
        for k, v in leaf.items():
            branch[(hash(k) >> shift) & _MASK][k] = v
        owned = self._owned
        owned.update((id(node), node) for node in branch)
        owned[id(branch)] = branch
        if parent is None:
            self._root = branch
        else:
            parent[index] = branch

    def __delitem__(self, key) -> None:
        del self._leaf_for_write(key)[0][key]  # a KeyError leaves only unshared copies behind
        self._len -= 1

    def pop(self, key, default=None):
        """Remove key and return its value, or default when absent (nothing is copied then)."""
        value = self.get(key, _MISSING)
        if value is _MISSING:
            return default
        del self[key]
        return value

    def setdefault(self, key, default):
        """key's value, binding it to default first when absent (one walk down the trie: keys are mostly new)."""
        leaf, parent, index, depth = self._leaf_for_write(key)
        value = leaf.get(key, _MISSING)
        if value is not _MISSING:
            return value
        self._len += 1
        leaf[key] = default
        if len(leaf) > _LEAF_MAX and depth < _MAX_DEPTH:
            self._split(leaf, parent, index, depth)
        return default

    def finish(self) -> PMap:
        """The edited map; the edit is spent (further use raises) so the map's nodes are never written again."""
        if self._owned is None:
            raise RuntimeError("MapEdit.finish() called twice")
        self._owned = None
        return PMap._of(self._root, self._len)


_CHUNK_BITS = 9
_CHUNK = 1 << _CHUNK_BITS  # pages a chunk holds
_ZEROS = array("i", bytes(4 * _CHUNK))  # the chunk no page has written; shared, never written


# Page-indexed int32 arrays for the page pool's per-page state. A PMap write copies a leaf dict and touches
# every key and value in it: a cache miss each once the map is cold, as between two serving steps
# (benchmarks/README.md, session 11). Here a page's value sits in a chunk of _CHUNK int32s: an edit copies
# the chunk list once and each chunk it writes with one memcpy, whatever the chunk holds.

def _zero_chunks(size: int) -> tuple[array, ...]:
    return (_ZEROS,) * -(-size // _CHUNK)


def _read(chunks: Sequence[array], page: int) -> int:
    return chunks[page >> _CHUNK_BITS][page & (_CHUNK - 1)]


class _ChunksEdit:
    """A page-indexed int32 array being edited: copies each chunk it writes once; spent by finish()."""

    __slots__ = ("chunks", "_owned", "_size")

    def __init__(self, chunks: tuple[array, ...], size: int) -> None:
        self.chunks, self._size = list(chunks), size
        self._owned: set[int] | None = set()  # indexes of the chunks this edit copied

    def write(self, page: int, value: int) -> None:
        owned = self._owned
        if owned is None:
            raise RuntimeError("edit used after finish(): its chunks now belong to the finished value")
        if not 0 <= page < self._size:
            raise IndexError(f"page {page} outside [0, {self._size})")
        index = page >> _CHUNK_BITS
        chunk = self.chunks[index]
        if index not in owned:
            owned.add(index)
            chunk = self.chunks[index] = chunk[:]  # one memcpy
        chunk[page & (_CHUNK - 1)] = value

    def finish(self) -> tuple[array, ...]:
        if self._owned is None:
            raise RuntimeError("finish() called twice")
        self._owned = None
        return tuple(self.chunks)


class PageCounts(Mapping):
    """A persistent map from held pages (ints in [0, size)) to their counts (>= 1): a page-indexed int32 array
    in which 0 means absent."""

    __slots__ = ("_chunks", "_len", "_size")

    def __init__(self, size: int) -> None:
        self._chunks, self._len, self._size = _zero_chunks(size), 0, size

    def get(self, page: int, default=None):
        """page's count, or default when absent; page must lie in [0, size)."""
        return _read(self._chunks, page) or default

    def __getitem__(self, page: int) -> int:
        if page not in self:
            raise KeyError(page)
        return _read(self._chunks, page)

    def __contains__(self, page) -> bool:
        return isinstance(page, int) and 0 <= page < self._size and _read(self._chunks, page) > 0

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[int]:
        """Pages in ascending order."""
        for i, chunk in enumerate(self._chunks):
            if chunk is not _ZEROS:
                yield from (i * _CHUNK + j for j, count in enumerate(chunk) if count)

    def __repr__(self) -> str:
        return f"PageCounts({dict(self)!r})"

    def edit(self) -> PageCountsEdit:
        """A transient copy to update in place; `finish()` returns the new map and spends the edit."""
        return PageCountsEdit(self)


class PageCountsEdit:
    """An in-place editor over a PageCounts; spent by finish()."""

    __slots__ = ("_counts", "_len", "_size")

    def __init__(self, m: PageCounts) -> None:
        self._counts, self._len, self._size = _ChunksEdit(m._chunks, m._size), m._len, m._size

    def get(self, page: int, default=None):
        return _read(self._counts.chunks, page) or default

    def __setitem__(self, page: int, count: int) -> None:
        assert count >= 1, f"a held page's count is >= 1, got {count} (del releases it)"
        old = _read(self._counts.chunks, page) if 0 <= page < self._size else 0
        self._counts.write(page, count)
        self._len += not old

    def __delitem__(self, page: int) -> None:
        if not (0 <= page < self._size and _read(self._counts.chunks, page)):
            raise KeyError(page)
        self._counts.write(page, 0)
        self._len -= 1

    def finish(self) -> PageCounts:
        """The edited map; the edit is spent (further use raises) so the map's chunks are never written again."""
        m = object.__new__(PageCounts)
        m._chunks, m._len, m._size = self._counts.finish(), self._len, self._size
        return m


class PageLinkedSet(Set):
    """A persistent insertion-ordered set of pages (ints in [1, size)), oldest first: a doubly linked list whose
    links are page-indexed int32 arrays (0, the null page, ends the list and is never a member)."""

    __slots__ = ("_prev", "_next", "_head", "_tail", "_len", "_size")

    def __init__(self, size: int) -> None:
        self._prev = self._next = _zero_chunks(size)
        self._head = self._tail = self._len = 0
        self._size = size

    def __contains__(self, page) -> bool:
        return (isinstance(page, int) and 0 < page < self._size
                and (page == self._head or _read(self._prev, page) != 0))

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[int]:
        page, links = self._head, self._next
        while page:
            yield page
            page = _read(links, page)

    def __repr__(self) -> str:
        return f"PageLinkedSet({list(self)!r})"

    def __eq__(self, other) -> bool:
        """Order matters between two PageLinkedSets (as between OrderedDicts); against another set it does not."""
        if isinstance(other, PageLinkedSet):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return Set.__eq__(self, other)

    def edit(self) -> PageLinkedSetEdit:
        """A transient copy to update in place; `finish()` returns the new set and spends the edit."""
        return PageLinkedSetEdit(self)


class PageLinkedSetEdit:
    """An in-place editor over a PageLinkedSet; spent by finish()."""

    __slots__ = ("_prev", "_next", "_head", "_tail", "_len", "_size")

    def __init__(self, s: PageLinkedSet) -> None:
        self._prev, self._next = _ChunksEdit(s._prev, s._size), _ChunksEdit(s._next, s._size)
        self._head, self._tail, self._len, self._size = s._head, s._tail, s._len, s._size

    def __contains__(self, page) -> bool:
        return 0 < page < self._size and (page == self._head or _read(self._prev.chunks, page) != 0)

    def __len__(self) -> int:
        return self._len

    def append(self, page: int) -> None:
        """Add page as the newest; it must be absent."""
        assert page not in self, f"page {page} appended twice (or outside [1, {self._size}))"
        tail = self._tail
        if tail:
            self._next.write(tail, page)
        else:
            self._head = page
        self._prev.write(page, tail)
        self._tail = page
        self._len += 1

    def extend(self, pages: Iterable[int]) -> None:
        """append() each page in order."""
        for page in pages:
            self.append(page)

    def remove(self, page: int) -> None:
        """Drop page, wherever it is; KeyError if absent."""
        if page not in self:
            raise KeyError(page)
        before, after = _read(self._prev.chunks, page), _read(self._next.chunks, page)
        if before:
            self._next.write(before, after)
        else:
            self._head = after
        if after:
            self._prev.write(after, before)
        else:
            self._tail = before
        self._prev.write(page, 0)
        self._next.write(page, 0)
        self._len -= 1

    def pop_oldest(self) -> int:
        """Remove and return the oldest page; KeyError if empty."""
        page = self._head
        if not page:
            raise KeyError("pop_oldest from an empty PageLinkedSet")
        self.remove(page)
        return page

    def finish(self) -> PageLinkedSet:
        """The edited set; the edit is spent."""
        s = object.__new__(PageLinkedSet)
        s._prev, s._next = self._prev.finish(), self._next.finish()
        s._head, s._tail, s._len, s._size = self._head, self._tail, self._len, self._size
        return s


class PageStack:
    """A persistent LIFO stack of ints over a never-used ascending range [fresh, stop) below it.

    Pushes and pops cost O(1) each, so a pool of a million free pages is not copied per step; the
    range lets a fresh pool of n pages start without building n cells.
    """

    __slots__ = ("_top", "_depth", "_fresh", "_stop")

    def __init__(self, start: int, stop: int) -> None:
        self._top: tuple | None = None  # (item, the cell below) cons cells
        self._depth = 0  # cells in _top
        self._fresh, self._stop = start, max(start, stop)

    def __len__(self) -> int:
        return self._depth + self._stop - self._fresh

    def __iter__(self) -> Iterator[int]:
        """Items in the order pops return them."""
        cell = self._top
        while cell is not None:
            yield cell[0]
            cell = cell[1]
        yield from range(self._fresh, self._stop)

    def __contains__(self, item: int) -> bool:
        """O(pushed items): for tests and debugging, not the step path."""
        return self._fresh <= item < self._stop or any(i == item for i in itertools.islice(self, self._depth))

    def __repr__(self) -> str:
        return f"PageStack({list(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, PageStack) and len(self) == len(other) and all(a == b for a, b in zip(self, other))

    def _with(self, top: tuple | None, depth: int, fresh: int) -> PageStack:
        s = object.__new__(PageStack)
        s._top, s._depth, s._fresh, s._stop = top, depth, fresh, self._stop
        return s

    def push(self, items: Iterable[int]) -> PageStack:
        """A stack with items pushed in order (the last one on top)."""
        top, depth = self._top, self._depth
        for item in items:
            top, depth = (item, top), depth + 1
        return self if depth == self._depth else self._with(top, depth, self._fresh)

    def pop(self, n: int) -> tuple[PageStack, tuple[int, ...]]:
        """(the stack without its top n items, those items top first); n must not exceed len()."""
        assert 0 <= n <= len(self), f"pop({n}) from a stack of {len(self)}"
        out: list[int] = []
        top, depth = self._top, self._depth
        while top is not None and len(out) < n:
            out.append(top[0])
            top, depth = top[1], depth - 1
        fresh = self._fresh + n - len(out)
        out.extend(range(self._fresh, fresh))
        return self._with(top, depth, fresh), tuple(out)


class TokenTape(Sequence):
    """An immutable sequence of ints, equal to the tuple of its items, whose `appended` costs O(1).

    Versions share one list and each owns a prefix of it. appended() writes in place when no other
    version has grown the list past this one, and copies this version's prefix otherwise, so every
    version reads exactly its own items (also from another thread: items below a length never change).
    A sequence's output tokens grow by one a step; a tuple would copy them all every step.
    """

    __slots__ = ("_items", "_len")

    def __init__(self, items: Iterable[int] = ()) -> None:
        self._items = list(items)
        self._len = len(self._items)

    @classmethod
    def prefix_of(cls, items: list[int], length: int) -> TokenTape:
        """The version owning items[:length] of a list other versions may have grown (no copy)."""
        assert length <= len(items), f"a tape of {length} items over a list of {len(items)}"
        tape = object.__new__(cls)
        tape._items, tape._len = items, length
        return tape

    def appended(self, item: int) -> TokenTape:
        """This tape with item added at the end."""
        items = self._items
        if len(items) != self._len:  # another version grew the list: fork off this one's prefix
            items = items[: self._len]
        items.append(item)
        tape = object.__new__(TokenTape)
        tape._items, tape._len = items, self._len + 1
        return tape

    @property
    def lineage(self) -> object:
        """What versions grown from one another share: two tapes of one lineage agree below the shorter's length."""
        return self._items

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index):
        if isinstance(index, slice):
            return tuple(self._items[slice(*index.indices(self._len))])
        if not -self._len <= index < self._len:
            raise IndexError(f"TokenTape index {index} out of range for length {self._len}")
        return self._items[index % self._len]

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(self._items, self._len)

    def __eq__(self, other) -> bool:
        if isinstance(other, (TokenTape, tuple)):
            return len(other) == self._len and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))  # equal to its tuple, so it hashes like it

    def __add__(self, other):
        return tuple(self) + tuple(other) if isinstance(other, (TokenTape, tuple)) else NotImplemented

    def __radd__(self, other):
        return other + tuple(self) if isinstance(other, tuple) else NotImplemented

    def __repr__(self) -> str:
        return f"TokenTape({tuple(self)!r})"


def append_token(tokens: Sequence[int], token: int) -> TokenTape:
    """tokens + (token,) as a TokenTape: O(1) when tokens already is one."""
    return (tokens if type(tokens) is TokenTape else TokenTape(tokens)).appended(token)
