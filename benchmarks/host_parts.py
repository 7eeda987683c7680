"""Host time of per-step pieces, this tree against a git revision, alternated in one process.

    python benchmarks/host_parts.py --against REV [--save DIR]

Times `step_inputs.fill_batch` (batch 256, all decodes, 64 pages each) and `PenaltyState.build`
(64 rows, prompts of 100-1024 tokens, outputs of 1-512, vocab 32000) from this tree and from the
same modules at REV, loaded side by side, in alternating rounds so that a busy box slows both
alike. Both sides are checked to produce the same result first.
"""

import argparse
import importlib.util
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from llmfx.batch import SequenceChunk
from llmfx.step_inputs import StepLayout

MODULES = {"fill_batch": "llmfx/step_inputs.py", "penalties": "llmfx/sampler.py"}


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def at_revision(rev: str, relpath: str, name: str, workdir: Path):
    path = workdir / f"{name}.py"
    path.write_text(subprocess.run(["git", "show", f"{rev}:{relpath}"], check=True, capture_output=True,
                                   text=True).stdout)
    return load(path, name)


def cases():
    """name -> (module path, function of a module that runs one call and returns its result)."""
    page = 16
    chunks = [SequenceChunk((5,), 1000, tuple(range(1 + i * 70, 1 + i * 70 + 64))) for i in range(256)]
    layout = StepLayout(num_tokens=256, num_seqs=256, max_pages=132)

    def fill(module):
        views = layout.views(torch.zeros(layout.size, dtype=torch.float64))
        module.fill_batch(views, chunks, page, table_done=True)
        return views.tokens.clone(), views.seqs.clone(), views.query_start_loc.clone()

    rng = random.Random(0)
    vocab = 32000
    prompts = [tuple(rng.randrange(vocab) for _ in range(rng.randint(100, 1024))) for _ in range(64)]
    outputs = [tuple(rng.randrange(vocab) for _ in range(rng.randint(1, 512))) for _ in range(64)]

    def penalties(module):
        state = module.PenaltyState.build(prompts, outputs, vocab, "cpu", pad_to=64)
        return state.prompt_mask, state.output_counts

    return {"fill_batch": fill, "penalties": penalties}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--against", required=True, help="git revision to compare with")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--save", default=None)
    args = p.parse_args()
    rev = subprocess.run(["git", "rev-parse", "--short", args.against], check=True, capture_output=True,
                         text=True).stdout.strip()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, run in cases().items():
            relpath = MODULES[name]
            sides = {"this tree": load(Path(relpath), f"{name}_this"),
                     rev: at_revision(args.against, relpath, f"{name}_{rev}", Path(tmp))}
            results = [run(m) for m in sides.values()]
            assert all(torch.equal(a, b) for a, b in zip(*results)), f"{name}: the two sides disagree"
            times = {side: [] for side in sides}
            for _ in range(args.rounds):
                for side, module in sides.items():
                    start = time.perf_counter()
                    run(module)
                    times[side].append(time.perf_counter() - start)
            row = {"part": name, **{f"{side} median ms": round(1e3 * statistics.median(t), 3) for side, t in times.items()}}
            rows.append(row)
            print(row)
    if args.save:
        Path(args.save).mkdir(parents=True, exist_ok=True)
        out = {"date": time.strftime("%Y-%m-%d"), "machine": "cpu", "this_tree": head, "against": rev,
               "rounds": args.rounds, "rows": rows}
        Path(args.save, f"{time.strftime('%Y-%m-%d')}-cpu-host-parts-vs-{rev}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
