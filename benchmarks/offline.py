"""PERF.md's `offline` benchmark: `python benchmarks/offline.py --help` lists the options (same as `llmfx bench offline`)."""

import sys

from llmfx.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", "offline", *sys.argv[1:]]))
