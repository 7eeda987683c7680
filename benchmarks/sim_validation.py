"""The simulator against the engine (issue 6): profile, serve the offline and a Poisson workload, simulate both.

    python benchmarks/sim_validation.py --model tinyllama-1.1b --out DIR   # on the GPU
    python benchmarks/sim_validation.py --model tiny --out DIR             # the mechanics, on a CPU

One process, one engine build (llmfx/sim/validate.py has the pipeline). Writes DIR/sim_validation.json
(the report), DIR/profile.json (the fitted cost model with kv_tokens, a drop-in for
llmfx/sim/profile_default.json) and DIR/served_steps.json (every served step, timed). Exit code 1
when a figure misses the tolerance.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from llmfx.kv_cache import KvCacheConfig
from llmfx.llm import LLM
from llmfx.sim.cli import parse_int_list, parse_length
from llmfx.sim.cost_model import save_cost_model
from llmfx.sim.validate import summary_lines, validate

# PERF.md's workload, and a grid that spans its batch shapes, on a GPU; a smaller, quick check on a CPU.
GPU_DEFAULTS = {"num_requests": 256, "lengths": "100:1024", "batch_sizes": "1,8,32,64,128,256",
                "context_lens": "128,1024,1900", "prefill_lens": "128,512,1024,2048,4096,8192"}
CPU_DEFAULTS = {"num_requests": 48, "lengths": "16:160", "batch_sizes": "1,4,16,48", "context_lens": "32,256",
                "prefill_lens": "32,256,1024"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tinyllama-1.1b", help="preset (dummy weights) or checkpoint dir")
    p.add_argument("--out", required=True, help="folder for sim_validation.json, profile.json, served_steps.json")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--num-requests", type=int, default=None, help="offline requests (default 256 on GPU, 48 on CPU)")
    p.add_argument("--lengths", default=None, help="LOW:HIGH prompt and output lengths (default 100:1024 on GPU)")
    p.add_argument("--poisson-requests", type=int, default=None, help="default: --num-requests")
    p.add_argument("--load", type=float, default=0.7, help="Poisson rate as a fraction of the offline request rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerance", type=float, default=0.10, help="largest relative error that passes")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed offline warm-up run")
    p.add_argument("--batch-sizes", default=None, help="profile: decode batch sizes")
    p.add_argument("--context-lens", default=None, help="profile: decode context lengths")
    p.add_argument("--prefill-lens", default=None, help="profile: prompt tokens of one prefill step")
    p.add_argument("--decode-steps", type=int, default=8, help="profile: timed decode steps per shape")
    p.add_argument("--disable-overlap-scheduler", action="store_true", help="validate the engine without overlap")
    p.add_argument("--enforce-eager", action="store_true", help="no torch.compile, no CUDA graphs")
    p.add_argument("--prefix-cache", action="store_true",
                   help="keep KV block reuse on; off by default: the workloads share no prefixes")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    pick = (lambda name: getattr(args, name) if getattr(args, name) is not None else defaults[name])
    lengths = parse_length(pick("lengths"), "--lengths")
    lengths = (lengths, lengths) if isinstance(lengths, int) else lengths
    num_requests = pick("num_requests")
    grid = {"batch_sizes": parse_int_list(pick("batch_sizes"), "--batch-sizes"),
            "context_lens": parse_int_list(pick("context_lens"), "--context-lens"),
            "prefill_lens": parse_int_list(pick("prefill_lens"), "--prefill-lens"), "decode_steps": args.decode_steps}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True))
    started = time.perf_counter()
    # bench.offline's engine: room for the longest prompt plus the longest output.
    with LLM(args.model, dtype=args.dtype, device=device, load_format="dummy", skip_tokenizer_init=True,
             max_seq_len=2 * lengths[1] + 64, disable_overlap_scheduler=args.disable_overlap_scheduler,
             enforce_eager=args.enforce_eager,
             kv_cache_config=KvCacheConfig(enable_block_reuse=args.prefix_cache)) as llm:
        build_s = time.perf_counter() - started
        log(f"engine built in {build_s:.1f} s ({', '.join(f'{k} {v:.1f} s' for k, v in llm.startup_seconds.items())})")
        report, cost, steps = validate(
            llm, model=args.model, num_requests=num_requests, lengths=lengths,
            poisson_requests=args.poisson_requests or num_requests, load=args.load, seed=args.seed,
            warmup=not args.no_warmup, tolerance=args.tolerance, grid=grid, log=log)
    report["timings_s"] = {"build_s": build_s, **report["timings_s"], "total_s": time.perf_counter() - started}
    report["startup_s"] = dict(llm.startup_seconds)
    save_cost_model(cost, out / "profile.json")
    (out / "served_steps.json").write_text(json.dumps(steps) + "\n")
    (out / "sim_validation.json").write_text(json.dumps(report, indent=1) + "\n")
    for line in summary_lines(report):
        print(line)
    print(f"wrote {out / 'sim_validation.json'}, {out / 'profile.json'}, {out / 'served_steps.json'}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except (ValueError, FileNotFoundError) as err:  # a bad argument: say which, without a traceback
        print(f"sim_validation: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
