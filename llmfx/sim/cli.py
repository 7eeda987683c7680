"""`llmfx simulate` and `llmfx profile`: subcommands the main CLI adds with add_*_parser(subparsers).

Both set `run=<function(args) -> exit code>`; user errors are raised as ValueError/FileNotFoundError
for the main CLI to print.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys

from llmfx.scheduler import POLICY_NAMES

ARRIVALS = ("all", "poisson", "bursty", "trace")


def add_simulate_parser(subparsers) -> argparse.ArgumentParser:
    """Add `simulate`: run the real scheduler in simulated time and print a summary."""
    p = subparsers.add_parser("simulate", help="simulate serving a workload with the real scheduler (no GPU)",
                              description="Run requests through llmfx's scheduler with a step-time cost model.")
    p.add_argument("--policy", default="guaranteed_no_evict",
                   help=f"capacity policy: {', '.join(POLICY_NAMES)}, or module:function")
    p.add_argument("--arrivals", default="all", choices=ARRIVALS, help="arrival process (default: all at once)")
    p.add_argument("--rate", type=float, default=None, help="requests/s for poisson and bursty")
    p.add_argument("--cv", type=float, default=3.0, help="bursty: coefficient of variation of the gaps")
    p.add_argument("--trace", default=None, help="trace file (JSONL or CSV: arrival_time, prompt_len, output_len)")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--prompt-len", default="100:1024", help="N or LOW:HIGH (uniform)")
    p.add_argument("--output-len", default="100:1024", help="N or LOW:HIGH (uniform)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cost-model", default=None, help="cost-model JSON (default: the shipped H200 TinyLlama profile)")
    engine = p.add_argument_group("engine")
    engine.add_argument("--max-batch-size", type=int, default=256)
    engine.add_argument("--max-num-tokens", type=int, default=8192)
    engine.add_argument("--max-seq-len", type=int, default=2048)
    engine.add_argument("--kv-tokens", type=int, default=None,
                        help="KV cache capacity in tokens (default: the cost model's kv_tokens, else 65536)")
    engine.add_argument("--page-size", type=int, default=16)
    engine.add_argument("--no-prefix-cache", action="store_true")
    engine.add_argument("--no-chunked-prefill", action="store_true")
    engine.add_argument("--disable-overlap-scheduler", action="store_true",
                        help="simulate the executor without overlap (schedule and postprocess in turn)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.set_defaults(run=run_simulate)
    return p


def add_profile_parser(subparsers) -> argparse.ArgumentParser:
    """Add `profile`: time real engine steps over batch shapes and write a cost-model JSON."""
    p = subparsers.add_parser("profile", help="measure step times on this device and write a cost-model JSON",
                              description="Serve a grid of batch shapes through the LLM, time its loop's steps "
                                          "and fit a cost model.")
    p.add_argument("--model", default="tinyllama-1.1b", help="preset or checkpoint dir")
    p.add_argument("--out", default="cost_model.json", help="where to write the cost model")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--load-format", default="dummy", choices=["auto", "dummy"], help="dummy: random weights")
    p.add_argument("--batch-sizes", default="1,8,64,256", help="decode batch sizes, comma-separated")
    p.add_argument("--context-lens", default="128,1024", help="decode context lengths, comma-separated")
    p.add_argument("--prefill-lens", default="128,512,2048,8192",
                   help="prompt tokens of one prefill step, comma-separated")
    p.add_argument("--decode-steps", type=int, default=8, help="timed decode steps per shape")
    engine = p.add_argument_group("engine (as LLM(...) would serve)")
    engine.add_argument("--page-size", type=int, default=16)
    engine.add_argument("--kv-tokens", type=int, default=None, help="KV cache capacity (default: from free memory)")
    engine.add_argument("--max-batch-size", type=int, default=256)
    engine.add_argument("--max-num-tokens", type=int, default=8192)
    engine.add_argument("--max-seq-len", type=int, default=None, help="default: the model's")
    engine.add_argument("--disable-overlap-scheduler", action="store_true")
    engine.add_argument("--enforce-eager", action="store_true", help="no torch.compile, no CUDA graphs")
    engine.add_argument("--prefix-cache", action="store_true",
                        help="keep KV block reuse on (off by default: the profile's prompts share nothing)")
    p.set_defaults(run=run_profile)
    return p


def resolve_policy_arg(name: str):
    """A built-in policy name, or a function named module:attr."""
    if name in POLICY_NAMES:
        return name
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"--policy {name!r}: cannot load {attr!r} from module {module!r} ({err})") from None
        if not callable(fn):
            raise ValueError(f"--policy {name!r} is not a function policy(state, limits) -> Plan")
        return fn
    raise ValueError(f"unknown policy {name!r}: choose one of {', '.join(POLICY_NAMES)}, or module:function")


def parse_length(text: str, flag: str) -> int | tuple[int, int]:
    """'N' or 'LOW:HIGH'."""
    try:
        parts = [int(x) for x in text.split(":")]
    except ValueError:
        parts = []
    if len(parts) == 1 and parts[0] >= 1:
        return parts[0]
    if len(parts) == 2 and 1 <= parts[0] <= parts[1]:
        return parts[0], parts[1]
    raise ValueError(f"{flag} must be an integer >= 1 or LOW:HIGH with 1 <= LOW <= HIGH, got {text!r}")


def parse_int_list(text: str, flag: str) -> tuple[int, ...]:
    """'A,B,C': integers >= 1."""
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise ValueError(f"{flag} must be comma-separated integers >= 1, got {text!r}")
    return values


def run_simulate(args: argparse.Namespace) -> int:
    from llmfx.sim import SimConfig, all_at_once, bursty, default_cost_model, load_cost_model, load_trace, simulate

    policy = resolve_policy_arg(args.policy)
    if args.rate is not None and not (math.isfinite(args.rate) and args.rate > 0):
        raise ValueError(f"--rate must be a number of requests per second > 0, got {args.rate}")
    if args.arrivals in ("poisson", "bursty") and args.rate is None:
        raise ValueError(f"--arrivals {args.arrivals} needs --rate (requests per second)")
    if args.arrivals == "trace" and args.trace is None:
        raise ValueError("--arrivals trace needs --trace FILE")
    if args.num_requests < 1:
        raise ValueError(f"--num-requests must be >= 1, got {args.num_requests}")
    cost = load_cost_model(args.cost_model) if args.cost_model else default_cost_model()
    lengths = dict(prompt_len=parse_length(args.prompt_len, "--prompt-len"),
                   output_len=parse_length(args.output_len, "--output-len"), seed=args.seed)
    if args.arrivals == "trace":
        requests = load_trace(args.trace)
    elif args.arrivals == "all":
        requests = all_at_once(args.num_requests, **lengths)
    else:
        requests = bursty(args.num_requests, args.rate, cv=1.0 if args.arrivals == "poisson" else args.cv, **lengths)
    kv_tokens = args.kv_tokens or int(cost.meta.get("kv_tokens", 65536))
    cfg = SimConfig.build(policy=policy, max_batch_size=args.max_batch_size, max_num_tokens=args.max_num_tokens,
                          max_seq_len=args.max_seq_len, kv_tokens=kv_tokens, page_size=args.page_size,
                          enable_prefix_cache=not args.no_prefix_cache,
                          enable_chunked_prefill=not args.no_chunked_prefill,
                          disable_overlap_scheduler=args.disable_overlap_scheduler)
    summary = simulate(requests, cfg, cost).summary()
    summary.update(arrivals=args.arrivals, kv_tokens=kv_tokens, cost_model=cost.meta.get("source", "?"))
    if args.json:
        print(json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in summary.items()}))
    else:
        width = max(map(len, summary))
        for k, v in summary.items():
            shown = f"{v:.6g}" if isinstance(v, float) else str(v)
            print(f"{k:<{width}}  {shown}")
    return 0


def run_profile(args: argparse.Namespace) -> int:
    from llmfx.sim.cost_model import save_cost_model
    from llmfx.sim.profile import profile

    model = profile(args.model, batch_sizes=parse_int_list(args.batch_sizes, "--batch-sizes"),
                    context_lens=parse_int_list(args.context_lens, "--context-lens"),
                    prefill_lens=parse_int_list(args.prefill_lens, "--prefill-lens"), decode_steps=args.decode_steps,
                    device=args.device, dtype=args.dtype, load_format=args.load_format, page_size=args.page_size,
                    kv_tokens=args.kv_tokens, max_batch_size=args.max_batch_size, max_num_tokens=args.max_num_tokens,
                    max_seq_len=args.max_seq_len, disable_overlap_scheduler=args.disable_overlap_scheduler,
                    enforce_eager=args.enforce_eager, enable_block_reuse=args.prefix_cache,
                    log=lambda msg: print(msg, file=sys.stderr))
    save_cost_model(model, args.out)
    print(f"{describe(model)} (max relative error {model.meta.get('max_relative_error')}) -> {args.out}")
    return 0


def describe(model) -> str:
    """The coefficients on one line: the device/whole-step terms, then the host terms when there are any."""
    text = f"c0={model.c0:.4g} s  c_tok={model.c_tok:.4g} s  c_seq={model.c_seq:.4g} s  c_ctx={model.c_ctx:.4g} s"
    if model.h0 or model.h_tok or model.h_seq or model.h_ctx:
        text += (f"  | host h0={model.h0:.4g} s  h_tok={model.h_tok:.4g} s  h_seq={model.h_seq:.4g} s  "
                 f"h_ctx={model.h_ctx:.4g} s")
    return text
