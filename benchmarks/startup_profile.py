"""Where a warm start's time goes: `llmfx bench startup`'s script under cProfile, every thread profiled.

    python benchmarks/startup_profile.py --workdir DIR --save DIR     # on the H200

Runs the startup script once to fill DIR's compile caches (cold, not profiled), then once more with
cProfile on the main thread and on every thread it starts (the executor warms up on its own), and
prints the calls with the most cumulative time per thread, plus wall-clock marks around the imports,
the engine's construction and the first request. cProfile slows Python-heavy work (tracing) more
than kernel compiles or CUDA calls: compare rows within one profile, not with `bench startup`.
"""

import argparse
import subprocess
import sys
from pathlib import Path

from llmfx.bench import hf_checkpoint, startup_env

SCRIPT = r"""
import cProfile, json, pstats, sys, threading, time
marks = {"start": time.perf_counter()}
out = sys.argv[1]
profiles = []
run = threading.Thread.run
def profiled_run(self):
    profile = cProfile.Profile()
    profiles.append((self.name, profile))
    profile.enable()
    try:
        run(self)
    finally:
        profile.disable()
threading.Thread.run = profiled_run
main = cProfile.Profile()
profiles.append(("main", main))
main.enable()
from llmfx.llm import LLM
from llmfx.sampling_params import SamplingParams as S
marks["imported"] = time.perf_counter()
llm = LLM(sys.argv[2], skip_tokenizer_init=True, dtype="bfloat16", max_batch_size=256)
marks["constructed"] = time.perf_counter()
llm.generate([[1, 2, 3]], S(max_tokens=1, detokenize=False), use_tqdm=False)
marks["first_token"] = time.perf_counter()
main.disable()
llm.shutdown()
for name, profile in profiles:
    print(f"==== thread {name}")
    stats = pstats.Stats(profile)
    stats.dump_stats(f"{out}/startup-{name}.prof")
    stats.sort_stats("cumulative").print_stats(45)
t0 = marks.pop("start")
print(json.dumps({"marks_s": {k: round(v - t0, 3) for k, v in marks.items()}, "phases_s": llm.startup_seconds}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tinyllama-1.1b")
    p.add_argument("--workdir", type=Path, required=True, help="fresh directory: checkpoint and compile caches")
    p.add_argument("--save", type=Path, required=True, help="where the .prof files and the printed profile go")
    args = p.parse_args()
    args.save.mkdir(parents=True, exist_ok=True)
    path = hf_checkpoint(args.model, args.workdir)
    env = startup_env(args.workdir)
    fill = ("from llmfx.llm import LLM; from llmfx.sampling_params import SamplingParams as S; "
            f"llm = LLM({str(path)!r}, skip_tokenizer_init=True, dtype='bfloat16', max_batch_size=256); "
            "llm.generate([[1, 2, 3]], S(max_tokens=1, detokenize=False), use_tqdm=False); llm.shutdown()")
    subprocess.run([sys.executable, "-c", fill], env=env, check=True)
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(args.save), str(path)], env=env, check=True,
                          capture_output=True, text=True)
    (args.save / "startup-profile.txt").write_text(done.stdout)
    print(done.stdout[-6000:])


if __name__ == "__main__":
    main()
