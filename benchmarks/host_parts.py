"""Host time of per-step pieces, this tree against a git revision, alternated in one process.

    python benchmarks/host_parts.py --against REV [--parts NAME...] [--save DIR]

Times `step_inputs.fill_batch` (batch 256, all decodes, 64 pages each), a steady `StepStager.fill`
(the same batch, every token an overlap placeholder, pages unchanged since the last fill),
`ModelEngine.collect` of that batch with the executor's glue around it (the postprocess inputs and
StepOutput.sampled), `PenaltyState.build` (64 rows, prompts of 100-1024 tokens, outputs of
1-512, vocab 32000) and `LLM._dispatch` (the front end's per-token delivery: 256 non-streaming
requests, one token each per step for 64 steps, the last one finishing them; ms per step) from
this tree and from the same modules at REV, loaded side by side, in alternating rounds so that a
busy box slows both alike. Both sides are checked to produce the same
result first.
"""

import argparse
import functools
import gc
import importlib.util
import inspect
import json
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from types import MappingProxyType

import numpy as np
import torch

from llmfx.batch import BatchColumns, SequenceChunk
from llmfx.executor import StepOutput
from llmfx.model_engine import SampledToken
from llmfx.sampling_params import SamplingParams
from llmfx.scheduler import PLACEHOLDER, Request, ScheduledBatch, ScheduledSeq, TokenEvent
from llmfx.step_inputs import StepLayout

MODULES = {"fill_batch": "llmfx/step_inputs.py", "stager_fill": "llmfx/step_inputs.py",
           "collect": "llmfx/model_engine.py", "penalties": "llmfx/sampler.py", "dispatch": "llmfx/llm.py"}
DISPATCH_STEPS = 64


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


def comparable(result) -> list:
    """A result as plain values: tensors as lists, SampledTokens (a dataclass or a tuple by revision) as tuples."""
    def plain(x):
        if isinstance(x, torch.Tensor):
            return x.tolist()
        if hasattr(x, "token"):
            return (x.token, x.logprob, x.rank, x.top_ids, x.top_logprobs)
        if hasattr(x, "items"):
            return {k: plain(v) for k, v in x.items()}
        return x
    return [plain(x) for x in result]


def whole(run):
    """A case timed whole: `run(module)` makes one call and returns its result."""
    return lambda module: (functools.partial(run, module), 1)


def cases():
    """name -> function of a module that prepares one timed call: it returns (call, steps the call runs)."""
    page = 16
    chunks = [SequenceChunk((5,), 1000, tuple(range(1 + i * 70, 1 + i * 70 + 64))) for i in range(256)]
    layout = StepLayout(num_tokens=256, num_seqs=256, max_pages=132)

    table = np.zeros((256, 132))
    for row, chunk in enumerate(chunks):
        table[row, : len(chunk.pages)] = chunk.pages

    views = layout.views(torch.zeros(layout.size, dtype=torch.float64))  # reused: a fresh 300 kB buffer costs ms here

    converted = {}

    def as_input(module, batch_chunks):  # since 6b3cd49+, staging reads a batch's columns (made untimed, once)
        if not hasattr(module, "BatchColumns"):
            return batch_chunks
        if id(batch_chunks) not in converted:
            converted[id(batch_chunks)] = BatchColumns.of(batch_chunks, ids)
        return converted[id(batch_chunks)]

    def fill(module):
        views.page_table.numpy()[:] = table  # table_done: the caller's (the stager's) gather
        module.fill_batch(views, as_input(module, chunks), page, table_done=True)
        return views.tokens, views.seqs, views.query_start_loc

    # A steady overlap decode: every token is the previous step's, every request seen before.
    held = [SequenceChunk((PLACEHOLDER,), c.start_pos, c.pages) for c in chunks]
    ids = list(range(256))
    stagers = {}

    def stager_fill(module):
        if module not in stagers:
            kwargs = {"placeholder": PLACEHOLDER} if "placeholder" in inspect.signature(module.StepStager).parameters else {}
            stagers[module] = module.StepStager(page_size=page, max_pages=132, max_rows=256, engine_seed=0, **kwargs)
            if hasattr(module, "BatchColumns"):
                stagers[module].fill(views, as_input(module, chunks), lambda rid: SamplingParams(temperature=0.0))
            else:
                stagers[module].fill(views, chunks, ids, lambda rid: SamplingParams(temperature=0.0),
                                     *([] if kwargs else [{}]))
        if hasattr(module, "BatchColumns"):
            stagers[module].fill(views, as_input(module, held), None)
        elif "gather" in inspect.signature(module.StepStager.fill).parameters:  # the engine built the gather map
            prev_rows = {rid: row for row, rid in enumerate(ids)}
            gather = {rid: prev_rows[rid] for rid, c in zip(ids, held)
                      if len(c.token_ids) == 1 and c.token_ids[0] == PLACEHOLDER}
            stagers[module].fill(views, held, ids, None, gather)
        else:
            stagers[module].fill(views, held, ids, None)
        return views.tokens, views.seqs, views.query_start_loc, views.page_table

    batch = ScheduledBatch(seqs=tuple(ScheduledSeq(request_id=rid, token_ids=(PLACEHOLDER,), start_pos=c.start_pos,
                                                   pages=c.pages, sample=True) for rid, c in zip(ids, chunks)))
    host = torch.zeros(256, 43, dtype=torch.float64)
    host[:, 0] = torch.arange(256) * 7
    host[:, 1] = -torch.arange(256) / 8
    host[:, 2] = 1

    def collect(module):
        if hasattr(module, "Collected"):
            done = module.ModelEngine.collect(None, module.InFlight(batch=batch, host=host, ready=None, top_rows=(),
                                                                     sampling_ids=ids, sampling_rows=None))
            tokens, candidates, sampled = done.tokens, done.candidates, MappingProxyType(done.sampled)
        else:  # before Collected, executor.step derived the postprocess inputs and copied the mapping
            done = module.ModelEngine.collect(None, module.InFlight(batch=batch, host=host, ready=None,
                                                                     top_rows=frozenset()))
            tokens = {rid: s.token for rid, s in done.items()}
            candidates = {rid: (s.top_ids, s.top_logprobs) for rid, s in done.items() if s.top_ids}
            sampled = MappingProxyType(dict(done))
        return tokens, candidates, sampled

    rng = random.Random(0)
    vocab = 32000
    prompts = [tuple(rng.randrange(vocab) for _ in range(rng.randint(100, 1024))) for _ in range(64)]
    outputs = [tuple(rng.randrange(vocab) for _ in range(rng.randint(1, 512))) for _ in range(64)]

    def penalties(module):
        state = module.PenaltyState.build(prompts, outputs, vocab, "cpu", pad_to=64)
        return state.prompt_mask, state.output_counts

    params = SamplingParams(max_tokens=DISPATCH_STEPS, ignore_eos=True, detokenize=False)
    rids = range(256)
    steps = [StepOutput(
        events=tuple(TokenEvent(request_id=r, new_token_ids=(t + r,),
                                finish_reason="length" if t == DISPATCH_STEPS - 1 else None) for r in rids),
        sampled=MappingProxyType({r: SampledToken(token=t + r, logprob=-0.25 * (r % 7), rank=1, top_ids=(),
                                                  top_logprobs=()) for r in rids}))
        for t in range(DISPATCH_STEPS)]

    def dispatch(module):  # the handles are built untimed: only the per-token delivery counts
        llm = object.__new__(module.LLM)  # the front end alone: no engine, no tokenizer
        llm.tokenizer, llm._handles, llm._lock = None, {}, threading.Lock()
        handles = [module.RequestHandle(llm, [Request(request_id=r, prompt_token_ids=(1, 2, 3), params=params)],
                                        None, 1, False) for r in rids]
        llm._handles.update(zip(rids, handles))

        def call():
            for out in steps:
                llm._dispatch(out)
            return [h.result(timeout=0).outputs for h in handles]
        return call, DISPATCH_STEPS

    return {"fill_batch": whole(fill), "stager_fill": whole(stager_fill), "collect": whole(collect),
            "penalties": whole(penalties), "dispatch": dispatch}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--against", required=True, help="git revision to compare with")
    p.add_argument("--parts", nargs="+", choices=list(MODULES), help="only these (default: all)")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--save", default=None)
    args = p.parse_args()
    rev = subprocess.run(["git", "rev-parse", "--short", args.against], check=True, capture_output=True,
                         text=True).stdout.strip()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        for name, prepare in cases().items():
            if args.parts and name not in args.parts:
                continue
            relpath = MODULES[name]
            sides = {"this tree": load(Path(relpath), f"{name}_this"),
                     rev: at_revision(args.against, relpath, f"{name}_{rev}", Path(tmp))}
            results = [comparable(prepare(m)[0]()) for m in sides.values()]
            assert results[0] == results[1], f"{name}: the two sides disagree"
            times = {side: [] for side in sides}
            for _ in range(args.rounds):
                for side, module in sides.items():
                    call, steps = prepare(module)
                    gc.collect()  # the other side's garbage is not this side's cost
                    start = time.perf_counter()
                    call()
                    times[side].append((time.perf_counter() - start) / steps)
            row = {"part": name, **{f"{side} median ms": round(1e3 * statistics.median(t), 3) for side, t in times.items()}}
            rows.append(row)
            print(row)
    if args.save:
        Path(args.save).mkdir(parents=True, exist_ok=True)
        out = {"date": time.strftime("%Y-%m-%d"), "machine": "cpu", "this_tree": head, "against": rev,
               "rounds": args.rounds, "rows": rows}
        parts = "".join(f"-{name}" for name in args.parts or ())
        Path(args.save, f"{time.strftime('%Y-%m-%d')}-cpu-host-parts{parts}-vs-{rev}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
