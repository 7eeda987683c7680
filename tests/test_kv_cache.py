"""Specifications of the host-side page allocator and prefix cache."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from llmfx.kv_cache import (
    NULL_PAGE,
    KvCacheConfig,
    PagePool,
    allocate,
    match_prefix,
    new_page_pool,
    num_available,
    pages_for_tokens,
    register_pages,
    release,
)


def check_pool(pool: PagePool) -> None:
    """Every page but the null page is exactly one of free, held or evictable; caches are consistent."""
    free, held, evictable = set(pool.free), set(pool.refcounts), set(pool.evictable)
    assert len(free) == len(pool.free), "a page is free twice"
    assert not (free & held) and not (free & evictable) and not (held & evictable)
    assert free | held | evictable == set(range(1, pool.num_pages))
    assert all(c >= 1 for c in pool.refcounts.values())
    assert NULL_PAGE not in free | held | evictable
    for h, page in pool.cached.items():
        assert pool.page_keys[page][0] == h
        assert page in held or page in evictable
    for page in evictable:
        assert pool.cached[pool.page_keys[page][0]] == page
    for page in pool.page_keys:
        assert page in held or page in evictable
    # canonical names exactly the pages cached points at
    assert set(pool.canonical) == set(pool.cached.values()) and all(v == 1 for v in pool.canonical.values())


def contents(pool: PagePool) -> tuple:
    """A plain-data copy of everything a pool holds."""
    return (list(pool.free), dict(pool.refcounts), list(pool.evictable), dict(pool.page_keys), dict(pool.cached),
            dict(pool.canonical))


def registered(pool: PagePool, tokens: list[int], n_pages: int) -> tuple[PagePool, tuple[int, ...]]:
    pool, pages = allocate(pool, n_pages)
    return register_pages(pool, [(tokens, pages)]), pages


# --- config ---


@pytest.mark.parametrize(
    "field,value",
    [
        ("free_gpu_memory_fraction", 0.0),
        ("free_gpu_memory_fraction", 1.5),
        ("max_tokens", 0),
        ("page_size", 0),
        ("enable_block_reuse", 1),
    ],
)
def test_kv_cache_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        KvCacheConfig(**{field: value})


def test_kv_cache_config_defaults_are_valid():
    cfg = KvCacheConfig()
    assert cfg.page_size == 16 and cfg.enable_block_reuse and cfg.max_tokens is None


# --- allocation ---


def test_fresh_pool_offers_every_page_but_the_null_page():
    pool = new_page_pool(5, 4)
    assert num_available(pool) == 4
    pool, pages = allocate(pool, 4)
    assert sorted(pages) == [1, 2, 3, 4]
    assert num_available(pool) == 0
    check_pool(pool)


def test_allocate_more_than_available_is_an_internal_error():
    pool = new_page_pool(3, 4)
    with pytest.raises(AssertionError):
        allocate(pool, 3)


def test_release_returns_pages_and_double_free_asserts():
    pool = new_page_pool(4, 2)
    pool, pages = allocate(pool, 2)
    pool = release(pool, pages)
    assert num_available(pool) == 3
    check_pool(pool)
    with pytest.raises(AssertionError, match="double free"):
        release(pool, pages[:1])


def test_pages_for_tokens_rounds_up():
    assert [pages_for_tokens(n, 4) for n in (0, 1, 4, 5, 8)] == [0, 1, 1, 2, 2]



def test_pools_compare_by_contents():
    a, pages = registered(new_page_pool(6, 2), [1, 2, 3, 4, 5], 3)
    b, _ = registered(new_page_pool(6, 2), [1, 2, 3, 4, 5], 3)
    assert a == b and a != new_page_pool(6, 2)
    assert release(a, pages[:2]) == release(b, pages[:2])
    assert release(a, pages[:2]) != release(a, pages[1::-1])  # eviction order is part of the state


# --- prefix cache ---


def test_prefix_hit_shares_pages_and_bumps_refcounts():
    pool = new_page_pool(10, 2)
    prompt = [1, 2, 3, 4, 5]
    pool, pages = registered(pool, prompt, 3)  # pages hold [1,2], [3,4], [5]
    pool, hit, n_cached = match_prefix(pool, [1, 2, 3, 4, 9, 9])
    assert hit == pages[:2] and n_cached == 4
    assert [pool.refcounts[p] for p in pages] == [2, 2, 1]
    check_pool(pool)


def test_prefix_match_leaves_at_least_one_token_to_compute():
    pool = new_page_pool(10, 2)
    pool, pages = registered(pool, [1, 2, 3, 4], 2)
    _, hit, n_cached = match_prefix(pool, [1, 2, 3, 4])
    assert hit == pages[:1] and n_cached == 2
    _, hit, n_cached = match_prefix(pool, [1, 2, 3, 4, 5])
    assert hit == pages and n_cached == 4


def test_prefix_hash_is_chained_so_equal_pages_under_other_prefixes_miss():
    pool = new_page_pool(10, 2)
    pool, _ = registered(pool, [1, 2, 3, 4, 0], 3)
    _, hit, _ = match_prefix(pool, [9, 9, 3, 4, 0])
    assert hit == ()


def test_released_cached_pages_stay_matchable_until_evicted():
    pool = new_page_pool(4, 2)
    pool, pages = registered(pool, [1, 2, 3, 4, 5], 3)
    pool = release(pool, pages)
    assert num_available(pool) == 3 and set(pool.evictable) == set(pages[:2])
    pool, hit, _ = match_prefix(pool, [1, 2, 3, 4, 7])
    assert hit == pages[:2] and all(pool.refcounts[p] == 1 for p in hit)
    check_pool(pool)


def test_eviction_is_least_recently_released_first():
    pool = new_page_pool(4, 1)
    pool, a = registered(pool, [10, 0], 1)
    pool, b = registered(pool, [20, 0], 1)
    pool, c = registered(pool, [30, 0], 1)
    pool = release(pool, b)
    pool = release(pool, a)
    pool = release(pool, c)
    pool, got = allocate(pool, 2)
    assert got == b + a
    _, hit, _ = match_prefix(pool, [30, 0])
    assert hit == c
    _, hit, _ = match_prefix(pool, [20, 0])
    assert hit == ()


def test_a_hit_refreshes_recency():
    pool = new_page_pool(3, 1)
    pool, a = registered(pool, [10, 0], 1)
    pool, b = registered(pool, [20, 0], 1)
    pool = release(pool, a + b)  # a is now least recently used
    pool, hit, _ = match_prefix(pool, [10, 0])
    pool = release(pool, hit)  # ... and now b is
    pool, got = allocate(pool, 1)
    assert got == b


def test_duplicate_registration_keeps_one_canonical_page():
    pool = new_page_pool(6, 2)
    pool, first = registered(pool, [1, 2, 3], 2)
    pool, second = registered(pool, [1, 2, 3], 2)
    _, hit, _ = match_prefix(pool, [1, 2, 3])
    assert hit == first[:1]
    pool = release(pool, second)
    assert second[0] in pool.free  # the duplicate is not kept as cache
    check_pool(pool)


def test_disabled_prefix_cache_never_hits():
    pool = new_page_pool(6, 2, enable_prefix_cache=False)
    pool, pages = registered(pool, [1, 2, 3], 2)
    _, hit, n = match_prefix(pool, [1, 2, 3])
    assert hit == () and n == 0
    pool = release(pool, pages)
    assert num_available(pool) == 5 and not pool.evictable


# --- random operation sequences ---


class PoolMachine(RuleBasedStateMachine):
    """Random allocate/release/match/register sequences keep the pool consistent."""

    handles = Bundle("handles")

    def __init__(self):
        super().__init__()
        self.pool = new_page_pool(9, 2)
        self.held: list[int] = []  # every reference the test holds, with multiplicity
        self.versions: list[tuple[PagePool, tuple]] = []  # every pool so far, with its contents then

    @rule(target=handles, n=st.integers(0, 4), tokens=st.lists(st.integers(0, 2), max_size=8))
    def alloc(self, n, tokens):
        assume(n <= num_available(self.pool))
        self.pool, pages = allocate(self.pool, n)
        assert NULL_PAGE not in pages
        assert not set(pages) & set(self.held), "a page was handed out while still referenced"
        self.held += pages
        return (tuple(tokens), pages)

    @rule(target=handles, tokens=st.lists(st.integers(0, 2), max_size=8))
    def match(self, tokens):
        self.pool, pages, n = match_prefix(self.pool, tokens)
        assert n == 2 * len(pages) and n < max(len(tokens), 1)
        self.held += pages
        return (tuple(tokens), pages)

    @rule(h=handles)
    def register(self, h):
        tokens, pages = h
        if all(p in self.held for p in pages):
            self.pool = register_pages(self.pool, [(tokens, pages)])

    @rule(h=consumes(handles))
    def free(self, h):
        _, pages = h
        if all(self.held.count(p) >= pages.count(p) for p in pages):
            self.pool = release(self.pool, pages)
            for p in pages:
                self.held.remove(p)

    @rule(tokens=st.lists(st.integers(0, 2), max_size=8))
    def match_and_drop(self, tokens):
        """What a capacity policy does: try a match on the pool, then keep the old pool."""
        match_prefix(self.pool, tokens)

    @invariant()
    def conserved(self):
        check_pool(self.pool)
        counts = {p: self.held.count(p) for p in set(self.held)}
        assert dict(self.pool.refcounts) == counts

    @invariant()
    def old_pools_are_unchanged(self):
        self.versions.append((self.pool, contents(self.pool)))
        for pool, then in self.versions:
            assert contents(pool) == then, "deriving a pool changed an older one"


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(
    max_examples=150, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.filter_too_much]
)
