"""Host-side KV page bookkeeping: a pure page allocator with a prefix cache of full pages (no tensors)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from llmfx.persistent import MapEdit, PageCounts, PageCountsEdit, PageLinkedSet, PageStack, PMap

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
    """Immutable allocator state. Every page except NULL_PAGE is in exactly one of free, refcounts, evictable.

    The collections are persistent (llmfx.persistent): an update shares all but O(log n) of the old
    value, so a step costs the same whatever the number of cached pages, and old pools stay valid
    (capacity policies try admissions on the pool and drop the result). Per-page counts and LRU links
    are page-indexed int32 arrays: a finished request's release writes one per page.
    """

    num_pages: int  # including NULL_PAGE
    page_size: int
    enable_prefix_cache: bool
    free: PageStack  # unreferenced and uncached; the most recently freed is allocated first
    refcounts: PageCounts  # page -> number of holders, always >= 1
    evictable: PageLinkedSet  # cached pages nobody holds, least recently used first
    page_keys: PMap  # page -> PageKey, for full pages whose tokens are known (held or evictable)
    cached: PMap  # page hash -> the canonical page a prefix match returns
    # The pages that cached names (value 1): a release keeps them for reuse without reading either map.
    canonical: PageCounts


def new_page_pool(num_pages: int, page_size: int, enable_prefix_cache: bool = True) -> PagePool:
    """An empty pool of num_pages pages (page 0 included, never handed out)."""
    if not _is_int_at_least(num_pages, 2):
        raise ValueError(f"num_pages must be an integer >= 2 (page 0 is the null page), got {num_pages!r}")
    if not _is_int_at_least(page_size, 1):
        raise ValueError(f"page_size must be an integer >= 1, got {page_size!r}")
    return PagePool(
        num_pages=num_pages,
        page_size=page_size,
        enable_prefix_cache=bool(enable_prefix_cache),
        free=PageStack(NULL_PAGE + 1, num_pages),  # a fresh pool hands out 1, 2, 3, ...
        refcounts=PageCounts(num_pages),
        evictable=PageLinkedSet(num_pages),
        page_keys=PMap(),
        cached=PMap(),
        canonical=PageCounts(num_pages),
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
    free, pages = pool.free.pop(min(n, len(pool.free)))
    changes: dict = {"free": free}
    if len(pages) < n:
        evictable, page_keys, cached = pool.evictable.edit(), pool.page_keys.edit(), pool.cached.edit()
        canonical = pool.canonical.edit()
        victims = []
        for _ in range(n - len(pages)):
            page = evictable.pop_oldest()
            page_hash = page_keys.pop(page)[0]
            assert cached[page_hash] == page, "evictable pages are always canonical"
            del cached[page_hash], canonical[page]
            victims.append(page)
        pages += tuple(victims)
        changes.update(evictable=evictable.finish(), page_keys=page_keys.finish(), cached=cached.finish(),
                       canonical=canonical.finish())
    refcounts = pool.refcounts.edit()
    for page in pages:
        refcounts[page] = 1
    changes["refcounts"] = refcounts.finish()
    return dataclasses.replace(pool, **changes), pages


def release(pool: PagePool, pages: Iterable[int]) -> PagePool:
    """Drop one reference to each page; pages released earlier in the iterable are evicted earlier."""
    refcounts, evictable = pool.refcounts.edit(), pool.evictable.edit()
    page_keys, cached, canonical = pool.page_keys.edit(), pool.cached.edit(), pool.canonical.edit()
    freed: list[int] = []
    kept: list[int] = []  # cached pages nobody holds any more, oldest first: appended to the LRU at once
    for page in pages:
        count = refcounts.get(page, 0)
        assert count > 0, f"page {page} released while not held (double free)"
        if count > 1:
            refcounts[page] = count - 1
            continue
        del refcounts[page]
        if canonical.get(page):  # nearly every registered page: kept, no map read
            kept.append(page)
            continue
        key = page_keys.get(page)
        # A duplicate of a cached page is dropped, unless the canonical copy has been evicted meanwhile.
        if key is not None and cached.get(key[0]) is None:
            cached[key[0]] = page
            canonical[page] = 1
            kept.append(page)
        else:
            page_keys.pop(page, None)
            freed.append(page)
    evictable.extend(kept)
    return dataclasses.replace(
        pool,
        free=pool.free.push(freed),
        refcounts=refcounts.finish(),
        evictable=evictable.finish(),
        page_keys=page_keys.finish(),
        cached=cached.finish(),
        canonical=canonical.finish(),
    )


def share(pool: PagePool, pages: Iterable[int]) -> PagePool:
    """Take one more reference to each held page (a forked sequence shares its parent's pages)."""
    refcounts = pool.refcounts.edit()
    for page in pages:
        count = refcounts.get(page, 0)
        assert count > 0, f"page {page} shared while not held"
        refcounts[page] = count + 1
    return dataclasses.replace(pool, refcounts=refcounts.finish())


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
    refcounts, evictable = pool.refcounts.edit(), None
    for page in pages:
        count = refcounts.get(page, 0)
        if count == 0:  # an evictable page comes back into use
            if evictable is None:
                evictable = pool.evictable.edit()
            evictable.remove(page)
        refcounts[page] = count + 1
    pool = dataclasses.replace(pool, refcounts=refcounts.finish(),
                               evictable=pool.evictable if evictable is None else evictable.finish())
    return pool, tuple(pages), len(pages) * ps


def register_pages(pool: PagePool, seqs: Iterable[tuple[Sequence[int], Sequence[int]]]) -> PagePool:
    """Record the full pages of each (computed token_ids, held pages) pair so that later prompts can hit them."""
    if not pool.enable_prefix_cache:
        return pool
    ps = pool.page_size
    page_keys: MapEdit | None = None
    cached: MapEdit | None = None
    canonical: PageCountsEdit | None = None
    for token_ids, pages in seqs:
        num_full = min(len(token_ids) // ps, len(pages))
        keys = pool.page_keys if page_keys is None else page_keys
        # A sequence's registered pages form a prefix of its page list: walk back to its end, keeping the
        # last registered page's key (its hash is the next page's parent).
        first, last_key = num_full, None
        while first > 0:
            last_key = keys.get(pages[first - 1])
            if last_key is not None:
                break
            first -= 1
        if first == num_full:
            continue
        if page_keys is None:
            page_keys, cached, canonical = pool.page_keys.edit(), pool.cached.edit(), pool.canonical.edit()
        assert cached is not None and canonical is not None
        parent = last_key[0] if first > 0 else None
        for i in range(first, num_full):
            page = pages[i]
            assert pool.refcounts.get(page, 0) > 0, f"page {page} registered while not held"
            tokens = tuple(token_ids[i * ps : (i + 1) * ps])
            page_hash = _page_hash(parent, tokens)
            page_keys[page] = (page_hash, parent, tokens)
            if cached.setdefault(page_hash, page) == page:
                canonical[page] = 1
            parent = page_hash
    if page_keys is None:
        return pool
    return dataclasses.replace(pool, page_keys=page_keys.finish(), cached=cached.finish(),
                               canonical=canonical.finish())
