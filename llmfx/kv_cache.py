"""Host-side KV page bookkeeping: a pure page allocator with a prefix cache of full pages (no tensors)."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

NULL_PAGE = 0  # padding rows write here; never allocated

# (hash of this page, hash of the parent page or None for the first page, the page's tokens)
PageKey = tuple[int, "int | None", tuple[int, ...]]


@dataclass(frozen=True, slots=True, kw_only=True)
class KvCacheConfig:
    """User-facing KV cache settings (TensorRT-LLM names)."""

    free_gpu_memory_fraction: float = 0.9
    max_tokens: int | None = None
    page_size: int = 16
    enable_block_reuse: bool = True

    def __post_init__(self) -> None:
        f = self.free_gpu_memory_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f <= 1.0:
            raise ValueError(f"KvCacheConfig.free_gpu_memory_fraction must be a number in (0, 1], got {f!r}")
        if self.max_tokens is not None and not _is_int_at_least(self.max_tokens, 1):
            raise ValueError(f"KvCacheConfig.max_tokens must be None or an integer >= 1, got {self.max_tokens!r}")
        if not _is_int_at_least(self.page_size, 1):
            raise ValueError(f"KvCacheConfig.page_size must be an integer >= 1, got {self.page_size!r}")
        if not isinstance(self.enable_block_reuse, bool):
            raise ValueError(f"KvCacheConfig.enable_block_reuse must be a bool, got {self.enable_block_reuse!r}")


def _is_int_at_least(value: object, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


@dataclass(frozen=True, slots=True, kw_only=True)
class PagePool:
    """Immutable allocator state. Every page except NULL_PAGE is in exactly one of free, refcounts, evictable."""

    num_pages: int  # including NULL_PAGE
    page_size: int
    enable_prefix_cache: bool
    free: tuple[int, ...]  # unreferenced and uncached; allocated from the end
    refcounts: Mapping[int, int]  # page -> number of holders, always >= 1
    evictable: Mapping[int, None]  # cached pages nobody holds, least recently used first
    page_keys: Mapping[int, PageKey]  # full pages whose tokens are known (held or evictable)
    cached: Mapping[int, int]  # page hash -> the canonical page a prefix match returns


def new_page_pool(num_pages: int, page_size: int, enable_prefix_cache: bool = True) -> PagePool:
    """An empty pool of num_pages pages (page 0 included, never handed out)."""
    if not _is_int_at_least(num_pages, 2):
        raise ValueError(f"num_pages must be an integer >= 2 (page 0 is the null page), got {num_pages!r}")
    if not _is_int_at_least(page_size, 1):
        raise ValueError(f"page_size must be an integer >= 1, got {page_size!r}")
    empty: Mapping = MappingProxyType({})
    return PagePool(
        num_pages=num_pages,
        page_size=page_size,
        enable_prefix_cache=bool(enable_prefix_cache),
        # Descending so that a fresh pool hands out 1, 2, 3, ...
        free=tuple(range(num_pages - 1, NULL_PAGE, -1)),
        refcounts=empty,
        evictable=empty,
        page_keys=empty,
        cached=empty,
    )


def pages_for_tokens(num_tokens: int, page_size: int) -> int:
    """Number of pages that hold num_tokens tokens."""
    return -(-num_tokens // page_size)


def num_available(pool: PagePool) -> int:
    """Pages allocate() can hand out now: free plus evictable."""
    return len(pool.free) + len(pool.evictable)


def allocate(pool: PagePool, n: int) -> tuple[PagePool, tuple[int, ...]]:
    """Take n pages at refcount 1, evicting least-recently-used cached pages when free ones run out."""
    assert 0 <= n <= num_available(pool), f"allocate({n}) with only {num_available(pool)} pages available"
    if n == 0:
        return pool, ()
    take = min(n, len(pool.free))
    from_free = pool.free[len(pool.free) - take :][::-1]
    victims = tuple(itertools.islice(pool.evictable, n - take))
    refcounts = pool.refcounts.copy()
    for page in itertools.chain(from_free, victims):
        refcounts[page] = 1
    changes: dict = {"free": pool.free[: len(pool.free) - take], "refcounts": MappingProxyType(refcounts)}
    if victims:
        evictable, page_keys, cached = pool.evictable.copy(), pool.page_keys.copy(), pool.cached.copy()
        for page in victims:
            del evictable[page]
            page_hash = page_keys.pop(page)[0]
            assert cached[page_hash] == page, "evictable pages are always canonical"
            del cached[page_hash]
        changes.update(
            evictable=MappingProxyType(evictable),
            page_keys=MappingProxyType(page_keys),
            cached=MappingProxyType(cached),
        )
    return dataclasses.replace(pool, **changes), from_free + victims


def release(pool: PagePool, pages: Iterable[int]) -> PagePool:
    """Drop one reference to each page; pages released earlier in the iterable are evicted earlier."""
    refcounts = pool.refcounts.copy()
    evictable, page_keys, cached = pool.evictable.copy(), pool.page_keys.copy(), pool.cached.copy()
    freed: list[int] = []
    for page in pages:
        count = refcounts.get(page, 0)
        assert count > 0, f"page {page} released while not held (double free)"
        if count > 1:
            refcounts[page] = count - 1
            continue
        del refcounts[page]
        key = page_keys.get(page)
        # A duplicate of a cached page is dropped, unless the canonical copy has been evicted meanwhile.
        if key is not None and cached.setdefault(key[0], page) == page:
            evictable[page] = None
        else:
            page_keys.pop(page, None)
            freed.append(page)
    return dataclasses.replace(
        pool,
        free=pool.free + tuple(freed),
        refcounts=MappingProxyType(refcounts),
        evictable=MappingProxyType(evictable),
        page_keys=MappingProxyType(page_keys),
        cached=MappingProxyType(cached),
    )


def share(pool: PagePool, pages: Iterable[int]) -> PagePool:
    """Take one more reference to each held page (a forked sequence shares its parent's pages)."""
    refcounts = pool.refcounts.copy()
    for page in pages:
        assert refcounts.get(page, 0) > 0, f"page {page} shared while not held"
        refcounts[page] += 1
    return dataclasses.replace(pool, refcounts=MappingProxyType(refcounts))


def _page_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    # Chained, so equal pages at different prefixes get different keys. Tokens are verified on a hit.
    return hash((parent, tokens))


def match_prefix(pool: PagePool, token_ids: Sequence[int]) -> tuple[PagePool, tuple[int, ...], int]:
    """Take a reference to the longest chain of cached full pages prefixing token_ids, leaving >= 1 token to compute."""
    if not pool.enable_prefix_cache:
        return pool, (), 0
    ps = pool.page_size
    pages: list[int] = []
    parent: int | None = None
    # At least one token must remain so that the model computes logits for it.
    for i in range((len(token_ids) - 1) // ps):
        tokens = tuple(token_ids[i * ps : (i + 1) * ps])
        page_hash = _page_hash(parent, tokens)
        page = pool.cached.get(page_hash)
        if page is None or pool.page_keys[page] != (page_hash, parent, tokens):
            break
        pages.append(page)
        parent = page_hash
    if not pages:
        return pool, (), 0
    refcounts = pool.refcounts.copy()
    evictable = pool.evictable
    for page in pages:
        if page in refcounts:
            refcounts[page] += 1
        else:
            if evictable is pool.evictable:
                evictable = pool.evictable.copy()
            del evictable[page]
            refcounts[page] = 1
    pool = dataclasses.replace(
        pool,
        refcounts=MappingProxyType(refcounts),
        evictable=evictable if isinstance(evictable, MappingProxyType) else MappingProxyType(evictable),
    )
    return pool, tuple(pages), len(pages) * ps


def register_pages(pool: PagePool, seqs: Iterable[tuple[Sequence[int], Sequence[int]]]) -> PagePool:
    """Record the full pages of each (computed token_ids, held pages) pair so that later prompts can hit them."""
    if not pool.enable_prefix_cache:
        return pool
    ps = pool.page_size
    page_keys: dict[int, PageKey] | None = None
    cached: dict[int, int] | None = None
    for token_ids, pages in seqs:
        num_full = min(len(token_ids) // ps, len(pages))
        keys = pool.page_keys if page_keys is None else page_keys
        # A sequence's registered pages form a prefix of its page list: walk back to its end.
        first = num_full
        while first > 0 and pages[first - 1] not in keys:
            first -= 1
        if first == num_full:
            continue
        if page_keys is None:
            page_keys, cached = pool.page_keys.copy(), pool.cached.copy()
        assert cached is not None
        parent = page_keys[pages[first - 1]][0] if first > 0 else None
        for i in range(first, num_full):
            page = pages[i]
            assert pool.refcounts.get(page, 0) > 0, f"page {page} registered while not held"
            tokens = tuple(token_ids[i * ps : (i + 1) * ps])
            page_hash = _page_hash(parent, tokens)
            page_keys[page] = (page_hash, parent, tokens)
            cached.setdefault(page_hash, page)
            parent = page_hash
    if page_keys is None:
        return pool
    return dataclasses.replace(pool, page_keys=MappingProxyType(page_keys), cached=MappingProxyType(cached))
