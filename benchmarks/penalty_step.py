"""Host time a penalized step spends turning its rows' token ids into PenaltyState offsets.

    python benchmarks/penalty_step.py [--rows 64] [--steps 100] [--rounds 5] [--save DIR]

Rows have prompts of 100-1024 tokens and outputs starting at 1-512, vocab 32000; every step each
output grows by one token (a TokenTape, as postprocess builds it). Times, alternating in rounds
in one process, the conversion from scratch (what `PenaltyState.write` does for any rows) and
`PenaltyHistories.offsets` (what the engine now runs: kept ids, only new tokens converted), after
checking that both give the same offsets. The device's part (one copy, a zero and two scatters)
is the same for both and is not timed: on a GPU it is queued, not waited for.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import numpy as np

from llmfx import bench
from llmfx.penalty_histories import PenaltyHistories, offsets_from_scratch
from llmfx.persistent import TokenTape, append_token

VOCAB = 32000


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--save", default=None)
    args = p.parse_args(argv)
    for name in ("rows", "steps", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    rng = random.Random(0)
    prompts = [tuple(rng.randrange(VOCAB) for _ in range(rng.randint(100, 1024))) for _ in range(args.rows)]
    start = [TokenTape(rng.randrange(VOCAB) for _ in range(rng.randint(1, 512))) for _ in range(args.rows)]
    ids = list(range(args.rows))

    def scratch(outputs):
        return offsets_from_scratch(prompts, outputs, VOCAB)

    def run(kind: str) -> float:
        """Median ms per step over a run of steps that each grow every output by one token."""
        outputs, histories, times = list(start), PenaltyHistories(VOCAB), []
        for step in range(args.steps):
            outputs = [append_token(o, (step * 31 + r) % VOCAB) for r, o in enumerate(outputs)]
            t0 = time.perf_counter()
            got = scratch(outputs) if kind == "from_scratch" else histories.offsets(ids, prompts, outputs)
            times.append(time.perf_counter() - t0)
            if step in (0, args.steps - 1):
                assert all(np.array_equal(g, w) for g, w in zip(got, scratch(outputs))), "the offsets differ"
        return statistics.median(times) * 1e3

    rounds = {"from_scratch": [], "kept_histories": []}
    for _ in range(args.rounds):
        for kind in rounds:
            rounds[kind].append(run(kind))
    row = {kind: round(statistics.median(v), 3) for kind, v in rounds.items()}
    row.update({f"{kind}_rounds": [round(x, 3) for x in v] for kind, v in rounds.items()})
    print(json.dumps({"num_rows": args.rows, "steps": args.steps, **row}))
    if args.save:
        saved = bench.save_rows(Path(args.save), f"penalty_step-{args.rows}rows.json", [row], num_rows=args.rows,
                                steps=args.steps, unit="ms per step (median)")
        print(f"saved {saved}")


if __name__ == "__main__":
    main()
