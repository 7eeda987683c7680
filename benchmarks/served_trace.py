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

    launch_steps maps a graph launch's correlation id to its step number. `critical_by_name` splits busy
    among the kernels: each kernel is charged the time by which it moves the step's covered end (under PDL a
    kernel that starts early and waits is charged only for what it adds), so it sums to busy. A charge is not
    what removing the kernel would save: session 18 fused away kernels charged ~150 us of a batch-1 step and
    the step got no faster (benchmarks/README.md)."""
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
        names, critical = defaultdict(float), defaultdict(float)
        for e in ks:  # union of the kernels' intervals (PDL lets neighbours overlap)
            names[e["name"]] += e["dur"]
            lo, hi = max(e["ts"], covered), e["ts"] + e["dur"]
            if hi > lo:
                busy += hi - lo
                critical[e["name"]] += hi - lo
                covered = hi
        out[step] = {"span_us": end - start, "busy_us": busy, "kernels": len(ks), "by_name": dict(names),
                     "critical_by_name": dict(critical)}
    return out


def summarize(events, steps: list[tuple[int, int]]) -> tuple[list[dict], dict]:
    """Rows per step and kernel tables from a trace's events and each step's (seqs, prefill tokens).

    The tables: the kernels of the mixed steps by name (us a step), and, for the decode steps of the fewest
    and the most sequences, each kernel's share of the critical path (`step_spans`' critical_by_name)."""
    launches = sorted((e for e in events if e.get("cat") == "cuda_runtime" and e["name"] == "cudaGraphLaunch"),
                      key=lambda e: e["ts"])
    # Each step replays its forward graph then its sampler graph: two launches a step, in order.
    if len(launches) != 2 * len(steps):
        raise SystemExit(f"{len(launches)} graph launches for {len(steps)} steps: expected two a step")
    spans = step_spans(events, {e["args"]["correlation"]: i // 2 for i, e in enumerate(launches)})
    rows = []
    for step, (seqs, prefill) in enumerate(steps):
        s = spans[step]
        rows.append({"step": step, "seqs": seqs, "prefill_tokens": prefill, "span_us": round(s["span_us"], 1),
                     "busy_us": round(s["busy_us"], 1), "idle_us": round(s["span_us"] - s["busy_us"], 1),
                     "kernels": s["kernels"]})
    mixed = [i for i, (_, prefill) in enumerate(steps) if prefill]
    by_name = defaultdict(float)
    for i in mixed:
        for name, us in spans[i]["by_name"].items():
            by_name[name] += us / len(mixed)
    tables = {"mixed_step_kernels": _table(by_name, "us_per_mixed_step")}
    decode = [i for i, (_, prefill) in enumerate(steps) if not prefill]
    if decode:  # the last step of the smallest batch, the first of the largest
        for label, step in (("smallest", max(decode, key=lambda i: (-steps[i][0], i))),
                            ("largest", min(decode, key=lambda i: (-steps[i][0], i)))):
            tables[f"critical_path_{label}_decode"] = {
                "step": step, "seqs": steps[step][0], "busy_us": round(spans[step]["busy_us"], 1),
                "kernels": _table(spans[step]["critical_by_name"], "critical_us")}
    return rows, tables


def _table(us_by_name: dict[str, float], column: str) -> list[dict]:
    return [{"kernel": name, column: round(us, 1)} for name, us in sorted(us_by_name.items(), key=lambda kv: -kv[1])]


def trace_offline(args) -> tuple[list, list[tuple[int, int]]]:
    """Serve the workload under torch.profiler: the trace's events and each step's (seqs, prefill tokens)."""
    from llmfx.llm import LLM
    from llmfx.presets import preset

    path = bench.hf_checkpoint(args.model, Path(args.workdir or tempfile.mkdtemp()))
    vocab = preset(args.model).vocab_size
    work = bench.offline_workload(vocab, args.num_requests)
    prompts = [p for p, _ in work]
    params = bench.offline_params(work, args.max_tokens)
    with LLM(str(path), skip_tokenizer_init=True, dtype="bfloat16", max_seq_len=2048 + 64) as llm:
        llm.generate(bench.shifted_prompts(prompts, vocab, 1), params, use_tqdm=False)
        with llm.trace_steps() as trace, torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
            llm.generate(prompts, params, use_tqdm=False)
            torch.cuda.synchronize()
    steps = [(t.launched.num_seqs, t.launched.num_tokens - t.launched.num_decode) for t in trace
             if t.launched is not None]
    trace_file = Path(tempfile.mkdtemp()) / "trace.json"
    prof.export_chrome_trace(str(trace_file))
    events = json.loads(trace_file.read_text())["traceEvents"]
    if args.save:  # the whole trace too, for questions this summary does not answer
        Path(args.save).mkdir(parents=True, exist_ok=True)
        with gzip.open(Path(args.save) / "served_trace.chrome.json.gz", "wt") as f:
            json.dump({"traceEvents": events}, f)
    return events, steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tinyllama-1.1b")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=24, help="every request's output is cut to this many tokens")
    p.add_argument("--workdir", default=None, help="where the dummy checkpoint is saved (reused if present)")
    p.add_argument("--from-saved", nargs=2, metavar=("TRACE_GZ", "ROWS_JSON"), default=None,
                   help="summarize a saved run (its chrome trace and its served_trace.json) instead of tracing one")
    p.add_argument("--save", default=None)
    args = p.parse_args()
    if args.max_tokens < 1:
        p.error(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.from_saved:
        trace_gz, rows_json = args.from_saved
        with gzip.open(trace_gz, "rt") as f:
            events = json.load(f)["traceEvents"]
        saved = json.loads(Path(rows_json).read_text())
        steps = [(r["seqs"], r["prefill_tokens"]) for r in saved["rows"]]
        fields = {"model": saved["model"], "max_tokens": saved["max_tokens"], "summarized_from": trace_gz}
    elif not torch.cuda.is_available():
        p.error("served_trace.py traces CUDA kernels: it needs a GPU (or --from-saved)")
    else:
        events, steps = trace_offline(args)
        fields = {"model": args.model, "max_tokens": args.max_tokens}
    rows, tables = summarize(events, steps)
    for row in rows:
        print(json.dumps(row))
    for row in tables["mixed_step_kernels"][:30]:
        print(json.dumps(row))
    for label in ("smallest", "largest"):
        table = tables.get(f"critical_path_{label}_decode")
        if table:
            print(f"critical path, step {table['step']} ({table['seqs']} seqs, busy {table['busy_us']} us):")
            for row in table["kernels"][:12]:
                print(json.dumps(row))
    if args.save:
        saved = bench.save_rows(Path(args.save), "served_trace.json", rows, **fields, **tables)
        print(f"saved {saved}")


if __name__ == "__main__":
    main()
