"""Host costs of the page pool's persistent maps: one map write, and one finished sequence's release.

    python benchmarks/page_pool_costs.py [--pages 70] [--trials 300] [--save DIR] [--tag TAG]

`write_us`: 16 writes in one edit of a 20,000-key PMap (a batch-256 decode step allocates, and
registers into two maps, about 16 pages), per write. `cold_write_us`: the same after ~200 MB of
other objects were read, as the serving loop's other work does between two steps: a write copies
the nodes on its path, and copying increments the reference count of every key, value and child
they hold, each a cache miss once the map has gone cold. `release_us`: a 1k-token sequence's ~70 full,
registered pages released into the evictable LRU (`kv_cache.release`) beside 20,000 pages that
others hold, each trial on fresh tokens. `register_us`: a batch-256 decode step's registrations (16 sequences
each register the page they just filled) in a 363,000-page pool holding 20,000 registered pages, cold as
above, per page. All are medians.
"""

import argparse
import random
import statistics
import time
from pathlib import Path

from llmfx.kv_cache import allocate, new_page_pool, register_pages, release
from llmfx.persistent import PMap


def write_us(trials: int) -> float:
    m = PMap((i, (i, None, ())) for i in range(20000))
    keys = random.Random(0).sample(range(20000, 40000), 16)
    times = []
    for _ in range(trials):
        start = time.perf_counter()
        edit = m.edit()
        for k in keys:
            edit[k] = 1
        edit.finish()
        times.append((time.perf_counter() - start) / len(keys))
    return statistics.median(times) * 1e6


def cold_write_us(trials: int) -> float:
    rng = random.Random(1)
    m = PMap((i, (rng.getrandbits(63), rng.getrandbits(63), (i,) * 16)) for i in range(20000))
    other = [[i] * 4 for i in range(3_000_000)]  # ~200 MB of objects
    times = []
    for _ in range(trials):
        swept = 0
        for obj in other[::3]:  # every third object: its line and its list's
            swept += obj[0]
        keys = rng.sample(range(20000, 400000), 16)
        start = time.perf_counter()
        edit = m.edit()
        for k in keys:
            edit[k] = (k, None, ())
        edit.finish()
        times.append((time.perf_counter() - start) / len(keys))
    return statistics.median(times) * 1e6


def release_us(pages: int, trials: int) -> float:
    pool = new_page_pool(20000 + 2 * pages + 1, 16, True)
    pool, held = allocate(pool, 20000)
    pool = register_pages(pool, [(tuple(range(20000 * 16)), held)])
    times = []
    for trial in range(trials):
        with_seq, own = allocate(pool, pages)
        tokens = tuple((trial * 1000003 + i) % 32000 for i in range(pages * 16))
        with_seq = register_pages(with_seq, [(tokens, own)])
        start = time.perf_counter()
        release(with_seq, reversed(own))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def register_us(trials: int, num_pages: int = 363_000) -> float:
    """One batch-256 decode step's registrations in an H200-sized pool, cold: 16 sequences each register the
    page they just filled, after the ~200 MB read of cold_write_us; per page."""
    rng = random.Random(2)
    pool = new_page_pool(num_pages, 16, True)
    chains = []  # (tokens, pages) of 1,250 running sequences, 16 registered pages each: 20,000 in all
    for s in range(1250):
        pool, pages = allocate(pool, 16)
        tokens = [rng.randrange(32000) for _ in range(256)]
        pool = register_pages(pool, [(tokens, pages)])
        chains.append((tokens, pages))
    other = [[i] * 4 for i in range(3_000_000)]
    times = []
    for _ in range(trials):
        swept = 0
        for obj in other[::3]:
            swept += obj[0]
        step = []
        for k in rng.sample(range(len(chains)), 16):
            tokens, pages = chains[k]
            pool, (page,) = allocate(pool, 1)
            chains[k] = tokens + [rng.randrange(32000) for _ in range(16)], pages + (page,)
            step.append(chains[k])
        start = time.perf_counter()
        pool = register_pages(pool, step)
        times.append((time.perf_counter() - start) / len(step))
    return statistics.median(times) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pages", type=int, default=70)
    p.add_argument("--trials", type=int, default=300)
    p.add_argument("--save", type=Path, default=None)
    p.add_argument("--tag", default="")
    args = p.parse_args()
    row = {"pages": args.pages, "trials": args.trials, "write_us": round(write_us(args.trials), 2),
           "cold_write_us": round(cold_write_us(min(args.trials, 60)), 2),
           "release_us": round(release_us(args.pages, args.trials), 1),
           "register_us": round(register_us(min(args.trials, 60)), 2)}
    print(row)
    if args.save:
        from llmfx.bench import save_rows

        print("saved", save_rows(args.save, f"{time.strftime('%Y-%m-%d')}-cpu-page-pool-costs{args.tag}.json", [row]))


if __name__ == "__main__":
    main()
