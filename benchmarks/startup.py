"""PERF.md's `startup` benchmark: `python benchmarks/startup.py --help` lists the options (same as `llmfx bench startup`)."""

import sys

from llmfx.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", "startup", *sys.argv[1:]]))
