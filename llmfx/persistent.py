"""Persistent collections for the scheduler's state: every update returns a new value that shares most of the old.

An old value stays valid and unchanged after a new one is derived from it (capacity policies try
admissions on the pool and drop the result; `LLM.scheduler_state` is read from another thread),
yet an update costs O(log32 n), not a copy of n entries. Batches of updates go through an edit
(a transient, as in Clojure): it copies each node on the updated paths once, mutates its copies in
place, and is spent by `finish()`, so a node reachable from a finished value is never written.
"""

from __future__ import annotations

import itertools
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


class LinkedSet(Set):
    """A persistent insertion-ordered set (oldest first): a doubly linked list whose links live in a PMap."""

    __slots__ = ("_links", "_head", "_tail")

    def __init__(self) -> None:
        self._links: PMap = PMap()  # key -> (previous key, next key); None at the ends
        self._head = self._tail = None

    def __contains__(self, key) -> bool:
        return key in self._links

    def __len__(self) -> int:
        return len(self._links)

    def __iter__(self) -> Iterator:
        key, links = self._head, self._links
        while key is not None:
            yield key
            key = links[key][1]

    def __repr__(self) -> str:
        return f"LinkedSet({list(self)!r})"

    def __eq__(self, other) -> bool:
        """Order matters between two LinkedSets (as between OrderedDicts); against another set it does not."""
        if isinstance(other, LinkedSet):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return Set.__eq__(self, other)

    def edit(self) -> LinkedSetEdit:
        """A transient copy to update in place; `finish()` returns the new set and spends the edit."""
        return LinkedSetEdit(self)


class LinkedSetEdit:
    """An in-place editor over a LinkedSet; spent by finish()."""

    __slots__ = ("_links", "_head", "_tail")

    def __init__(self, s: LinkedSet) -> None:
        self._links, self._head, self._tail = s._links.edit(), s._head, s._tail

    def __contains__(self, key) -> bool:
        return key in self._links

    def __len__(self) -> int:
        return len(self._links)

    def append(self, key) -> None:
        """Add key as the newest; it must be absent (None is the end marker, so it cannot be a key)."""
        assert key is not None and key not in self._links, f"{key!r} appended twice"
        links, tail = self._links, self._tail
        if tail is None:
            self._head = key
        else:
            links[tail] = (links[tail][0], key)
        links[key] = (tail, None)
        self._tail = key

    def extend(self, keys: Sequence) -> None:
        """append() each key in order, writing each link once (append rewrites the previous newest's)."""
        if not keys:
            return
        links, tail = self._links, self._tail
        assert None not in keys and len(set(keys)) == len(keys) and not any(k in links for k in keys), \
            "extend() keys must be new and distinct"
        if tail is None:
            self._head = keys[0]
        else:
            links[tail] = (links[tail][0], keys[0])
        before = (tail, *keys[:-1])
        after = (*keys[1:], None)
        for key, prev, nxt in zip(keys, before, after):
            links[key] = (prev, nxt)
        self._tail = keys[-1]

    def remove(self, key) -> None:
        """Drop key, wherever it is; KeyError if absent."""
        links = self._links
        prev, after = links.pop(key, (_MISSING, None))
        if prev is _MISSING:
            raise KeyError(key)
        if prev is None:
            self._head = after
        else:
            links[prev] = (links[prev][0], after)
        if after is None:
            self._tail = prev
        else:
            links[after] = (prev, links[after][1])

    def pop_oldest(self):
        """Remove and return the oldest key; KeyError if empty."""
        key = self._head
        if key is None:
            raise KeyError("pop_oldest from an empty LinkedSet")
        self.remove(key)
        return key

    def finish(self) -> LinkedSet:
        """The edited set; the edit is spent."""
        s = object.__new__(LinkedSet)
        s._links, s._head, s._tail = self._links.finish(), self._head, self._tail
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
