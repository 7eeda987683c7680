"""The CUDA kernels of served steps, per step: what a step's device time is made of inside the engine.

    python benchmarks/served_trace.py --max-tokens 24 --save DIR     # on the GPU

Runs PERF.md's offline workload through `LLM.generate` as `offline_timeline.py` does (untimed warm-up
first), every output cut to --max-tokens: the first steps, the mixed prefill steps, are the workload's own
(no request finishes before its prompt is done), and the run stops soon after. The timed run is traced with
torch.profiler. Per launched step (CUDA graph launches grouped by the step that queued them): the span
from its first kernel's start to its last kernel's end, the kernels' summed time, the idle time inside the
span, and its prefill tokens; then the kernels of the mixed steps by name. Saves the per-step rows and the
kernel table as JSON. The profiler adds host time per launch: compare spans, not wall times, with
untraced runs.
"""

from __future__ import annotations

import argparse
import gzip
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

from llmfx import bench


def step_spans(events, launch_steps: dict[int, int]) -> dict[int, dict]:
    """Per step: span, busy (summed kernel time, overlaps counted once) and kernels by name, in us.

    launch_steps maps a graph launch's correlation id to its step number."""
    kernels = defaultdict(list)
    for e in events:
        step = launch_steps.get(e.get("args", {}).get("correlation"))
        if e.get("cat") == "kernel" and step is not None:
            kernels[step].append(e)
    out = {}
    for step, ks in sorted(kernels.items()):
        ks.sort(key=lambda e: e["ts"])
        start, end = ks[0]["ts"], max(e["ts"] + e["dur"] for e in ks)
        busy, covered = 0.0, start
        for e in ks:  # union of the kernels' intervals (PDL lets neighbours overlap)
            lo, hi = max(e["ts"], covered), e["ts"] + e["dur"]
            if hi > lo:
                busy += hi - lo
                covered = hi
        names = defaultdict(float)
        for e in ks:
            names[e["name"]] += e["dur"]
        out[step] = {"span_us": end - start, "busy_us": busy, "kernels": len(ks), "by_name": dict(names)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tinyllama-1.1b")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=24, help="every request's output is cut to this many tokens")
    p.add_argument("--workdir", default=None, help="where the dummy checkpoint is saved (reused if present)")
    p.add_argument("--save", default=None)
    args = p.parse_args()
    if args.max_tokens < 1:
        p.error(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if not torch.cuda.is_available():
        p.error("served_trace.py traces CUDA kernels: it needs a GPU")
    from llmfx.llm import LLM
    from llmfx.presets import preset
    from llmfx.sampling_params import SamplingParams

    path = bench.hf_checkpoint(args.model, Path(args.workdir or tempfile.mkdtemp()))
    vocab = preset(args.model).vocab_size
    work = bench.offline_workload(vocab, args.num_requests)
    prompts = [p for p, _ in work]
    params = [SamplingParams(temperature=0.0, max_tokens=min(n, args.max_tokens), ignore_eos=True, detokenize=False)
              for _, n in work]
    with LLM(str(path), skip_tokenizer_init=True, dtype="bfloat16", max_seq_len=2048 + 64) as llm:
        llm.generate(bench.shifted_prompts(prompts, vocab, 1), params, use_tqdm=False)
        with llm.trace_steps() as trace, torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
            llm.generate(prompts, params, use_tqdm=False)
            torch.cuda.synchronize()
    launched = [t.launched for t in trace if t.launched is not None]
    trace_file = Path(tempfile.mkdtemp()) / "trace.json"
    prof.export_chrome_trace(str(trace_file))
    events = json.loads(trace_file.read_text())["traceEvents"]
    launches = sorted((e for e in events if e.get("cat") == "cuda_runtime" and e["name"] == "cudaGraphLaunch"),
                      key=lambda e: e["ts"])
    if args.save:  # the whole trace too, for questions this summary does not answer
        Path(args.save).mkdir(parents=True, exist_ok=True)
        with gzip.open(Path(args.save) / "served_trace.chrome.json.gz", "wt") as f:
            json.dump({"traceEvents": events}, f)
    # Each step replays its forward graph then its sampler graph: two launches a step, in order.
    if len(launches) != 2 * len(launched):
        raise SystemExit(f"{len(launches)} graph launches for {len(launched)} steps: expected two a step")
    launch_steps = {e["args"]["correlation"]: i // 2 for i, e in enumerate(launches)}
    spans = step_spans(events, launch_steps)
    rows = []
    for step, b in enumerate(launched):
        s = spans[step]
        rows.append({"step": step, "seqs": b.num_seqs, "prefill_tokens": b.num_tokens - b.num_decode,
                     "span_us": round(s["span_us"], 1), "busy_us": round(s["busy_us"], 1),
                     "idle_us": round(s["span_us"] - s["busy_us"], 1), "kernels": s["kernels"]})
        print(json.dumps(rows[-1]))
    mixed = [i for i, b in enumerate(launched) if b.num_tokens > b.num_decode]
    by_name = defaultdict(float)
    for i in mixed:
        for name, us in spans[i]["by_name"].items():
            by_name[name] += us / len(mixed)
    table = [{"kernel": name, "us_per_mixed_step": round(us, 1)} for name, us in
             sorted(by_name.items(), key=lambda kv: -kv[1])]
    for row in table[:30]:
        print(json.dumps(row))
    if args.save:
        saved = bench.save_rows(Path(args.save), "served_trace.json", rows, model=args.model,
                                max_tokens=args.max_tokens, mixed_step_kernels=table)
        print(f"saved {saved}")


if __name__ == "__main__":
    main()
