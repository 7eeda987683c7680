"""The `llmfx` command line."""

from __future__ import annotations

import argparse
import json
import sys
import time

from llmfx.presets import PRESETS
from llmfx.sim.cli import add_profile_parser, add_simulate_parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmfx", description="llmfx: LLM inference for researchers")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_generate(commands.add_parser("generate", help="generate text for one or more prompts"))
    _add_bench(commands.add_parser("bench", help="run a PERF.md benchmark (latency, offline, startup)"))
    add_simulate_parser(commands)
    add_profile_parser(commands)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"llmfx: error: {err}", file=sys.stderr)
        return 2


def _add_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", nargs="+", help="prompt text(s)")
    model = p.add_argument_group("model")
    model.add_argument("--model", default="tiny",
                       help=f"checkpoint dir, hub id in the local HF cache, or preset ({', '.join(PRESETS)})")
    model.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the model's)")
    model.add_argument("--dtype", default="auto", help="auto, float32, float16, bfloat16")
    model.add_argument("--load-format", default="auto", choices=["auto", "dummy"], help="dummy: random weights")
    sampling = p.add_argument_group("sampling")
    sampling.add_argument("--max-tokens", type=int, default=32, help="new tokens per prompt")
    sampling.add_argument("--min-tokens", type=int, default=0)
    sampling.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    sampling.add_argument("--seed", type=int, default=None, help="per-request sampling seed")
    sampling.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    sampling.add_argument("--ignore-eos", action="store_true")
    engine = p.add_argument_group("engine")
    engine.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    engine.add_argument("--max-batch-size", type=int, default=256)
    engine.add_argument("--max-num-tokens", type=int, default=8192, help="tokens per step")
    engine.add_argument("--max-seq-len", type=int, default=None, help="prompt + output cap")
    engine.add_argument("--kv-max-tokens", type=int, default=None, help="KV cache capacity in tokens")
    engine.add_argument("--free-gpu-memory-fraction", type=float, default=0.9)
    engine.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    engine.add_argument("--policy", default="guaranteed_no_evict",
                        choices=["guaranteed_no_evict", "max_utilization"], help="capacity scheduler policy")
    engine.add_argument("--no-prefix-cache", action="store_true", help="disable KV block reuse")
    engine.add_argument("--disable-overlap-scheduler", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.set_defaults(run=_generate)


def _add_bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("benchmark", choices=["latency", "offline", "startup"])
    p.add_argument("--model", default="tinyllama-1.1b", help="preset shape, dummy weights (default tinyllama-1.1b)")
    p.add_argument("--batches", default="1,8,64,256", help="latency: comma-separated batch sizes")
    p.add_argument("--num-requests", type=int, default=256, help="offline: requests in the workload")
    p.add_argument("--no-peers", action="store_true", help="skip the transformers runs")
    p.add_argument("--peer-requests", type=int, default=32, help="offline: requests given to transformers")
    p.add_argument("--repeats", type=int, default=1, help="offline: timed runs (median reported, each run too)")
    p.add_argument("--disable-overlap-scheduler", action="store_true")
    p.add_argument("--enforce-eager", action="store_true", help="no torch.compile, no CUDA graphs")
    p.add_argument("--gc-freeze", action="store_true", help="offline: gc.freeze() before the timed run")
    p.add_argument("--gc-gen0-threshold", default=None, metavar="N|python",
                   help="offline: the executor loop's GC gen-0 threshold (default: LLM's); 'python' leaves Python's")
    p.add_argument("--workdir", default=None, help="where the dummy checkpoint is saved (reused if present)")
    p.add_argument("--save", default=None, help="write results JSON into this folder (e.g. benchmarks/results)")
    p.add_argument("--tag", default="", help="suffix of the results file name")
    p.set_defaults(run=_bench)


def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from llmfx import bench

    workdir = Path(args.workdir) if args.workdir else None
    knobs = dict(disable_overlap_scheduler=args.disable_overlap_scheduler, enforce_eager=args.enforce_eager)
    if args.benchmark == "latency":
        batches = tuple(int(b) for b in args.batches.split(","))
        rows = bench.latency(args.model, batches, peers=not args.no_peers, workdir=workdir, **knobs)
    elif args.benchmark == "offline":
        if args.gc_gen0_threshold is not None:  # else the LLM's default
            knobs["garbage_collection_gen0_threshold"] = bench.gc_threshold_arg(args.gc_gen0_threshold)
        rows = bench.offline(args.model, args.num_requests, peers=not args.no_peers, peer_requests=args.peer_requests,
                             workdir=workdir, gc_freeze=args.gc_freeze, repeats=args.repeats, **knobs)
    else:
        rows = bench.startup(args.model, workdir=workdir)
    bench.print_table(rows)
    if args.save:
        print(f"saved {bench.save(rows, Path(args.save), args.tag)}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from llmfx.kv_cache import KvCacheConfig
    from llmfx.llm import LLM
    from llmfx.sampling_params import SamplingParams
    from llmfx.scheduler import SchedulerConfig

    params = SamplingParams(max_tokens=args.max_tokens, min_tokens=args.min_tokens, temperature=args.temperature,
                            seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos)
    if args.model in PRESETS and args.load_format != "dummy" and not args.json:
        print(f"note: preset {args.model!r} has random weights, so its text is noise; "
              f"pass --model <checkpoint> for real text", file=sys.stderr)
    start = time.perf_counter()
    with LLM(args.model, args.tokenizer, dtype=args.dtype, device=args.device, load_format=args.load_format,
             max_batch_size=args.max_batch_size, max_num_tokens=args.max_num_tokens, max_seq_len=args.max_seq_len,
             kv_cache_config=KvCacheConfig(max_tokens=args.kv_max_tokens, page_size=args.page_size,
                                           free_gpu_memory_fraction=args.free_gpu_memory_fraction,
                                           enable_block_reuse=not args.no_prefix_cache),
             scheduler_config=SchedulerConfig(capacity_scheduler_policy=args.policy),
             disable_overlap_scheduler=args.disable_overlap_scheduler) as llm:
        loaded = time.perf_counter()
        outputs = llm.generate(args.prompts, params, use_tqdm=not args.json)
        elapsed = time.perf_counter() - loaded
    tokens = sum(len(o.token_ids) for o in outputs)
    for out in outputs:
        completion = out.outputs[0]
        if args.json:
            print(json.dumps({"prompt": out.prompt, "text": completion.text, "token_ids": list(completion.token_ids),
                              "finish_reason": completion.finish_reason, "stop_reason": completion.stop_reason}))
        else:
            print(f"{out.prompt!r} -> {completion.text!r} ({completion.finish_reason})")
    rate = f"{tokens} tokens in {elapsed:.2f} s: {tokens / elapsed:.1f} tokens/s (load {loaded - start:.2f} s)"
    print(rate, file=sys.stderr if args.json else sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
