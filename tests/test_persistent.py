"""Specifications of the persistent collections of the scheduler state, against plain dict / list / tuple models."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from llmfx.persistent import _CHUNK, _LEAF_MAX, PageCounts, PageLinkedSet, PageStack, PMap, TokenTape, append_token


class Collider:
    """A key whose hash is chosen, so that tests reach hash collisions and the deepest leaves."""

    def __init__(self, name: int, h: int) -> None:
        self.name, self.h = name, h

    def __hash__(self) -> int:
        return self.h

    def __eq__(self, other) -> bool:
        return isinstance(other, Collider) and (self.name, self.h) == (other.name, other.h)

    def __repr__(self) -> str:
        return f"Collider({self.name}, {self.h})"


# Small ints (dense, like page ids), wide and negative ints (like page hashes), and colliding keys.
keys = st.one_of(st.integers(0, 300), st.integers(-2**63, 2**63 - 1),
                 st.builds(Collider, st.integers(0, 40), st.sampled_from([0, 7, -1, 2**62])))
ops = st.lists(st.tuples(st.sampled_from(["set", "del", "pop", "setdefault"]), keys, st.integers()), max_size=80)


def nodes(m: PMap) -> set[int]:
    """The ids of every node of m's trie."""
    out, stack = set(), [m._root]
    while stack:
        node = stack.pop()
        out.add(id(node))
        if type(node) is list:
            stack.extend(node)
    return out


class PMapMachine(RuleBasedStateMachine):
    """Batches of edits applied to any earlier version leave every version equal to its dict model."""

    def __init__(self) -> None:
        super().__init__()
        self.versions: list[tuple[PMap, dict]] = [(PMap(), {})]

    @rule(data=st.data(), batch=ops)
    def edit(self, data, batch) -> None:
        m, model = self.versions[data.draw(st.integers(0, len(self.versions) - 1))]
        model = dict(model)
        e = m.edit()
        for op, key, value in batch:
            if op == "set":
                e[key] = model[key] = value
            elif op == "del":
                if key in model:
                    del e[key], model[key]
                else:
                    with pytest.raises(KeyError):
                        del e[key]
            elif op == "pop":
                assert e.pop(key, "absent") == model.pop(key, "absent")
            else:
                assert e.setdefault(key, value) == model.setdefault(key, value)
            assert len(e) == len(model) and (key in e) == (key in model)
        self.versions.append((e.finish(), model))

    @rule(data=st.data(), first=st.integers(-40, 300), count=st.integers(0, 150),
          h=st.sampled_from([None, 0, -1, 2**62]), drop=st.integers(1, 3))
    def bulk(self, data, first, count, h, drop) -> None:
        """Enough keys to split leaves (or overfill the deepest one), then every drop-th key deleted."""
        m, model = self.versions[data.draw(st.integers(0, len(self.versions) - 1))]
        model = dict(model)
        if h is None:
            new = [first + i for i in range(count)]
        else:  # equal hashes make dict operations linear in the leaf: just past the deepest leaf's limit
            new = [Collider(first + i, h) for i in range(min(count, _LEAF_MAX + 8))]
        e = m.edit()
        for key in new:
            e[key] = model[key] = 1
        self.versions.append((e.finish(), dict(model)))
        e = self.versions[-1][0].edit()
        for key in new[::drop]:
            del e[key], model[key]
        self.versions.append((e.finish(), model))

    @rule(data=st.data(), key=keys, value=st.integers())
    def set_one(self, data, key, value) -> None:
        m, model = self.versions[data.draw(st.integers(0, len(self.versions) - 1))]
        self.versions.append((m.set(key, value), {**model, key: value}))

    @rule(data=st.data())
    def delete_one(self, data) -> None:
        m, model = self.versions[data.draw(st.integers(0, len(self.versions) - 1))]
        if model:
            key = data.draw(st.sampled_from(sorted(model, key=repr)))
            self.versions.append((m.delete(key), {k: v for k, v in model.items() if k != key}))

    @invariant()
    def every_version_equals_its_model(self) -> None:
        for m, model in self.versions:  # older versions included: deriving a map must not change its source
            assert len(m) == len(model) and dict(m.items()) == model
        m, model = self.versions[-1]
        assert len(list(m)) == len(model) and m == model
        for key, value in model.items():
            assert m[key] == value and m.get(key) == value and key in m
        assert m.get(Collider(-1, 7)) is None and Collider(-1, 7) not in m


TestPMapMachine = PMapMachine.TestCase
TestPMapMachine.settings = settings(max_examples=40, stateful_step_count=15, deadline=None)


SET_PAGES = 2 * _CHUNK  # pages 1 .. SET_PAGES - 1; 0 is the null page, never a member


class PageLinkedSetMachine(RuleBasedStateMachine):
    """Appends, removals and pops of the oldest, on any earlier version, keep each version equal to its list."""

    def __init__(self) -> None:
        super().__init__()
        self.versions: list[tuple[PageLinkedSet, list[int]]] = [(PageLinkedSet(SET_PAGES), [])]

    @rule(data=st.data(), batch=st.lists(st.tuples(st.sampled_from(["append", "extend", "remove", "pop"]),
                                                   st.one_of(st.integers(1, 60), st.integers(_CHUNK - 3, _CHUNK + 3))),
                                         max_size=40))
    def edit(self, data, batch) -> None:
        s, model = self.versions[data.draw(st.integers(0, len(self.versions) - 1))]
        model = list(model)
        e = s.edit()
        for op, key in batch:
            if op == "append" and key not in model:
                e.append(key)
                model.append(key)
            elif op == "extend":  # key..key+k, those not present yet, in order
                keys = [k for k in range(key, key + data.draw(st.integers(0, 4))) if k not in model]
                e.extend(keys)
                model.extend(keys)
            elif op == "remove" and key in model:
                e.remove(key)
                model.remove(key)
            elif op == "pop" and model:
                assert e.pop_oldest() == model.pop(0)
            assert len(e) == len(model) and (key in e) == (key in model)
        self.versions.append((e.finish(), model))

    @invariant()
    def every_version_equals_its_model(self) -> None:
        for s, model in self.versions:
            assert list(s) == model and len(s) == len(model) and s == set(model)
        rebuilt = PageLinkedSet(SET_PAGES).edit()
        for key in model:
            rebuilt.append(key)
        assert rebuilt.finish() == s
        assert 0 not in s and SET_PAGES not in s and -1 not in s
        if len(model) > 1:  # the same keys in another order are another PageLinkedSet
            other = PageLinkedSet(SET_PAGES).edit()
            for key in reversed(model):
                other.append(key)
            assert other.finish() != s


TestPageLinkedSetMachine = PageLinkedSetMachine.TestCase
TestPageLinkedSetMachine.settings = settings(max_examples=60, stateful_step_count=20, deadline=None)


@settings(deadline=None)
@given(start=st.integers(1, 5), size=st.integers(0, 30),
       batch=st.lists(st.tuples(st.booleans(), st.integers(0, 6), st.integers(0, 1)), max_size=30))
def test_page_stack_is_a_persistent_lifo_over_its_fresh_range(start, size, batch):
    versions = [(PageStack(start, start + size), list(range(start + size - 1, start - 1, -1)))]  # top last
    pushed = 100
    for push, n, base in batch:
        stack, model = versions[base * (len(versions) - 1)]  # from the first or the latest version
        if push:
            items = list(range(pushed, pushed + n))
            pushed += n
            versions.append((stack.push(items), model + items))
        elif n <= len(model):
            stack, got = stack.pop(n)
            assert got == tuple(reversed(model[len(model) - n:]))
            versions.append((stack, model[:len(model) - n]))
        for stack, model in versions:
            assert list(stack) == model[::-1] and len(stack) == len(model)
            assert stack == PageStack(1, 1).push(model) and (not model or stack != PageStack(1, 1).push(model[1:]))
            assert all(i in stack for i in model) and pushed not in stack and 0 not in stack



# --- PageCounts: edits of any version, each checked against its dict model ---

PAGES = 3 * _CHUNK + 5  # a partial last chunk
page_ops = st.lists(st.tuples(st.sampled_from(["set", "del"]), st.one_of(st.integers(0, 40), st.integers(0, PAGES - 1)),
                              st.integers(1, 2**31 - 1)), max_size=60)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10**6), page_ops), max_size=12))
def test_every_page_counts_version_stays_equal_to_its_dict(edits):
    versions = [(PageCounts(PAGES), {})]
    for pick, batch in edits:  # edit any earlier version: old versions must not change
        counts, model = versions[pick % len(versions)]
        model, e = dict(model), counts.edit()
        for op, page, count in batch:
            if op == "set":
                e[page] = model[page] = count
            elif page in model:
                del e[page], model[page]
            else:
                with pytest.raises(KeyError):
                    del e[page]
            assert e.get(page, 0) == model.get(page, 0)
        versions.append((e.finish(), model))
        for version, expected in versions:
            assert dict(version) == expected and len(version) == len(expected)
            assert list(version) == sorted(expected)  # pages iterate in ascending order
            assert all(version[p] == c and p in version for p, c in expected.items())
            assert -1 not in version and PAGES not in version and "x" not in version


def test_page_counts_refuse_a_zero_count_pages_out_of_range_and_a_spent_edit():
    e = PageCounts(10).edit()
    with pytest.raises(AssertionError):
        e[3] = 0
    with pytest.raises(IndexError):
        e[10] = 1
    e[3] = 2
    m = e.finish()
    with pytest.raises(RuntimeError, match="after finish"):
        e[4] = 1
    with pytest.raises(RuntimeError, match="twice"):
        e.finish()
    with pytest.raises(KeyError):
        m[4]
    assert dict(m) == {3: 2} and m.get(4) is None and m.get(4, 0) == 0


def test_a_page_counts_edit_copies_only_the_chunks_it_writes():
    m = PageCounts(4 * _CHUNK)
    e = m.edit()
    e[1] = e[2] = e[3 * _CHUNK] = 1
    new = e.finish()
    changed = [i for i, (a, b) in enumerate(zip(m._chunks, new._chunks)) if a is not b]
    assert changed == [0, 3] and new._chunks[1] is m._chunks[1]

def test_an_update_copies_one_path_not_the_map():
    m = PMap((i, i) for i in range(100_000))
    old = nodes(m)
    depth = 0
    node = m._root
    while type(node) is list:
        node, depth = node[0], depth + 1
    for updated in (m.set(5, -5), m.set(100_000, 0), m.delete(7)):
        assert len(nodes(updated) - old) <= depth + 1  # one branch per level and a leaf; a split adds one level
    assert m[5] == 5 and len(m) == 100_000 and 7 in m


def test_one_edit_copies_a_node_once_however_many_keys_it_writes_there():
    m = PMap((i, i) for i in range(_LEAF_MAX))  # a single leaf
    e = m.edit()
    for i in range(_LEAF_MAX):
        e[i] = -i
    assert len(nodes(e.finish()) - nodes(m)) == 1


def test_a_finished_edit_refuses_writes():
    e = PMap({1: 1}).edit()
    m = e.finish()
    with pytest.raises(RuntimeError, match="after finish"):
        e[2] = 2
    with pytest.raises(RuntimeError, match="twice"):
        e.finish()
    assert dict(m) == {1: 1}
    s = PageLinkedSet(10).edit()
    s.finish()
    with pytest.raises(RuntimeError, match="after finish"):
        s.append(1)


def test_colliding_keys_past_the_deepest_level_share_a_leaf():
    same = [Collider(i, 12345) for i in range(3 * _LEAF_MAX)]
    m = PMap((k, k.name) for k in same)
    assert len(m) == len(same) and all(m[k] == k.name for k in same)
    m = m.delete(same[0])
    assert same[0] not in m and len(m) == len(same) - 1


# --- TokenTape: appends to any version, each checked against the tuple it stands for ---


@given(st.lists(st.integers(0, 2**16)), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 2**16)),
                                                  max_size=60))
def test_every_token_tape_version_stays_equal_to_its_tuple(start, appends):
    versions = [(TokenTape(start), tuple(start))]
    for pick, token in appends:  # append to any earlier version: the latest (in place) or an older one (fork)
        tape, model = versions[pick % len(versions)]
        versions.append((append_token(tape, token), model + (token,)))
    for tape, model in versions:
        assert tape == model and model == tape and list(tape) == list(model) and len(tape) == len(model)
        assert hash(tape) == hash(model) and tape[1:-1] == model[1:-1] and tape[::2] == model[::2]
        assert (tape + (7,), (7,) + tape, tape + tape) == (model + (7,), (7,) + model, model + model)
        if model:
            assert (tape[0], tape[-1]) == (model[0], model[-1])
        with pytest.raises(IndexError):
            tape[len(model)]


def test_append_token_takes_a_tuple_and_leaves_it_alone():
    base = (1, 2)
    tape = append_token(base, 3)
    assert type(tape) is TokenTape and tape == (1, 2, 3) and base == (1, 2)
    assert append_token(tape, 4) == (1, 2, 3, 4) and tape == (1, 2, 3)
    assert tape != [1, 2, 3] and tape != (1, 2) and repr(tape) == "TokenTape((1, 2, 3))"


def test_token_tape_appends_in_place_while_it_is_the_longest_version():
    tape = TokenTape((1,))
    grown = tape.appended(2).appended(3)
    assert grown._items is tape._items  # no copy on the serving path
    fork = tape.appended(9)  # an older version grows: it copies its own prefix
    assert fork._items is not tape._items and (tape, grown, fork) == ((1,), (1, 2, 3), (1, 9))


def test_tapes_grown_from_one_another_share_a_lineage_and_a_branch_does_not():
    from llmfx.persistent import TokenTape

    base = TokenTape([1, 2])
    grown = base.appended(3).appended(4)
    assert grown.lineage is base.lineage and tuple(grown)[: len(base)] == tuple(base)
    branch = base.appended(9)  # the list was grown past base by another version: this one copies
    assert branch.lineage is not base.lineage and tuple(branch) == (1, 2, 9) and tuple(grown) == (1, 2, 3, 4)


def test_a_tape_over_a_prefix_of_a_grown_list_owns_that_prefix():
    items = [1, 2, 3]
    tape = TokenTape.prefix_of(items, 2)
    assert tape == (1, 2) and len(tape) == 2 and tape[-1] == 2
    grown = tape.appended(9)  # another version holds items[2]: this one forks its prefix
    assert grown == (1, 2, 9) and items == [1, 2, 3] and tape == (1, 2)
