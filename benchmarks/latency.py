"""PERF.md's `latency` benchmark: `python benchmarks/latency.py --help` lists the options (same as `llmfx bench latency`)."""

import sys

from llmfx.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", "latency", *sys.argv[1:]]))
