"""Where a warm start's time goes: `llmfx bench startup`'s script with every thread's Python stack sampled.

    python benchmarks/startup_profile.py --workdir DIR --save DIR     # on the H200

Runs the startup script once to fill DIR's compile caches (cold, not profiled), then once more while
a thread samples every other thread's Python stack each 5 ms (the executor warms up on its own
thread), and prints per thread the functions found on the most samples (inclusive: x samples is
about x * 5 ms spent in that call or below it), plus wall-clock marks around the imports, the
engine's construction and the first request, dynamo's own timers per compiled graph, and the files
the warm start added to the compile caches (a kernel that missed them is compiled and written
again). Sampling, unlike cProfile, barely slows the run: an earlier cProfile version of this script
did not finish a warm start in 210 s on the H200.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

from llmfx.bench import hf_checkpoint, startup_env, startup_script

SCRIPT = r"""
import collections, json, sys, threading, time
marks = {"start": time.perf_counter()}
inclusive = collections.defaultdict(collections.Counter)  # thread name -> "file:line func" -> samples on its stack
samples = collections.Counter()  # thread name -> samples
stop = threading.Event()
def sample():
    me = threading.get_ident()
    while not stop.wait(0.005):
        names = {t.ident: t.name for t in threading.enumerate()}
        for ident, frame in sys._current_frames().items():
            if ident == me:
                continue
            name = names.get(ident, str(ident))
            samples[name] += 1
            seen = set()
            while frame is not None:
                code = frame.f_code
                seen.add(f"{code.co_filename.split('site-packages/')[-1]}:{code.co_firstlineno} {code.co_name}")
                frame = frame.f_back
            inclusive[name].update(seen)
sampler = threading.Thread(target=sample, name="sampler", daemon=True)
sampler.start()
from llmfx.llm import LLM
from llmfx.sampling_params import SamplingParams as S
marks["imported"] = time.perf_counter()
llm = LLM(sys.argv[1], skip_tokenizer_init=True, dtype="bfloat16", max_batch_size=256)  # as bench.startup_script
marks["constructed"] = time.perf_counter()
llm.generate([[1, 2, 3]], S(max_tokens=1, detokenize=False), use_tqdm=False)
marks["first_token"] = time.perf_counter()
stop.set()
sampler.join()
llm.shutdown()
t0 = marks.pop("start")
import torch._dynamo.utils
names, seconds = torch._dynamo.utils.compile_times(repr="csv")  # dynamo's own timers, one column per graph
report = {"marks_s": {k: round(v - t0, 3) for k, v in marks.items()}, "phases_s": llm.startup_seconds,
          "dynamo_compile_times_s": dict(zip(names, seconds)), "sample_period_s": 0.005, "threads": {}}
for name, counts in inclusive.items():
    report["threads"][name] = {"samples": samples[name], "top": counts.most_common(150)}
print(json.dumps(report))
"""


def cache_files(env: dict[str, str]) -> set[str]:
    """Every file under the run's inductor and Triton caches, as paths relative to the caches' parent."""
    roots = [Path(env[name]) for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")]
    return {str(f.relative_to(root.parent)) for root in roots if root.is_dir() for f in root.rglob("*") if f.is_file()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tinyllama-1.1b")
    p.add_argument("--workdir", type=Path, required=True, help="fresh directory: checkpoint and compile caches")
    p.add_argument("--save", type=Path, required=True, help="where startup-profile.json goes")
    args = p.parse_args()
    args.save.mkdir(parents=True, exist_ok=True)
    path = hf_checkpoint(args.model, args.workdir)
    env = startup_env(args.workdir)
    subprocess.run([sys.executable, "-c", startup_script(path)], env=env, check=True, capture_output=True)  # cold
    before = cache_files(env)
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(path)], env=env, check=True, capture_output=True,
                          text=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    # What the warm start wrote into the compile caches: a kernel compiled again shows up here (a .cubin).
    report["new_cache_files"] = sorted(cache_files(env) - before)
    (args.save / "startup-profile.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("marks_s", "phases_s")}))
    for name, per_graph in report["dynamo_compile_times_s"].items():
        print(f"{name:45s} {per_graph}")
    new = report["new_cache_files"]
    print(f"files the warm start added to the compile caches: {len(new)}, of them cubins: "
          f"{sum(f.endswith('.cubin') for f in new)}")
    for f in new[:60]:
        print("  ", f)
    for name, thread in report["threads"].items():
        print(f"==== {name}: {thread['samples']} samples")
        for where, count in thread["top"][:40]:
            print(f"{count:7d}  {where}")


if __name__ == "__main__":
    main()
