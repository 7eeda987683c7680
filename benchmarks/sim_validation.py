"""The simulator against the engine (issue 6): profile, serve the offline and a Poisson workload, simulate both.

    python benchmarks/sim_validation.py --model tinyllama-1.1b --out DIR   # on the GPU
    python benchmarks/sim_validation.py --model tiny --out DIR             # a quick check on a CPU

`--help` lists the options; llmfx/sim/validate.py is the code. Exit code 1 when a figure misses the tolerance.
"""

from llmfx.sim.validate import main

if __name__ == "__main__":
    raise SystemExit(main())
