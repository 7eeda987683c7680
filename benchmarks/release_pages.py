"""Host time of releasing one finished sequence's pages into the prefix cache's LRU.

    python benchmarks/release_pages.py [--pages 70] [--trials 300] [--save DIR]

A 1k-token sequence holds ~70 full, registered pages; when it finishes, `kv_cache.release` drops
each page's reference and appends it to the evictable LRU. Measured beside 20,000 pages that
others hold (a busy cache), each trial on fresh tokens; prints the median.
"""

import argparse
import statistics
import time
from pathlib import Path

from llmfx.kv_cache import allocate, new_page_pool, register_pages, release


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pages", type=int, default=70)
    p.add_argument("--trials", type=int, default=300)
    p.add_argument("--save", type=Path, default=None)
    args = p.parse_args()
    pool = new_page_pool(20000 + 2 * args.pages + 1, 16, True)
    pool, held = allocate(pool, 20000)
    pool = register_pages(pool, [(tuple(range(20000 * 16)), held)])
    times = []
    for trial in range(args.trials):
        with_seq, pages = allocate(pool, args.pages)
        tokens = tuple((trial * 1000003 + i) % 32000 for i in range(args.pages * 16))
        with_seq = register_pages(with_seq, [(tokens, pages)])
        start = time.perf_counter()
        release(with_seq, reversed(pages))
        times.append(time.perf_counter() - start)
    median_us = statistics.median(times) * 1e6
    print(f"release of {args.pages} registered pages: median {median_us:.0f} us over {args.trials} trials")
    if args.save:
        from llmfx.bench import save_rows

        row = {"pages": args.pages, "trials": args.trials, "median_us": round(median_us, 1)}
        print("saved", save_rows(args.save, f"{time.strftime('%Y-%m-%d')}-cpu-release-pages.json", [row]))


if __name__ == "__main__":
    main()
