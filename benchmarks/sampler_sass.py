"""Static SASS of the sampler's noise-hash kernels as inductor writes them for the H200, counted on the CPU.

    python benchmarks/sampler_sass.py [--rows 256] [--vocab 32000] [--save DIR]

Compiles `sample_step` (the greedy-or-sampled variant the offline workload runs: no filtering, noise,
no top-20) through tests/test_compile_for_h200.py's codegen (inductor's Triton kernels as for 132 SMs,
compiled for sm_90) and disassembles each kernel that computes the hash (its name holds `lshift`) with
the cuobjdump Triton ships. Per kernel: instructions in all and by opcode. A static count, not a time:
it ranks variants of the same kernel before a device call is spent on them.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tests.test_compile_for_h200 as h200  # noqa: E402

from llmfx.model_engine import sample_step  # noqa: E402
from llmfx.testing.sampler_inputs import padding_sampler_inputs  # noqa: E402

_CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
_OPCODE = re.compile(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")


def opcodes(cubin: bytes) -> list[str]:
    """The SASS opcodes of a cubin, in order (modifiers dropped)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(_CUOBJDUMP), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    return _OPCODE.findall(sass)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--save", default=None)
    args = p.parse_args()
    rows, vocab = args.rows, args.vocab
    found: dict[str, Counter] = {}
    compile_real = triton.compile

    def compile_and_count(source, *a, **k):
        compiled = compile_real(source, *a, **k)
        if "lshift" in source.fn.__name__:
            found[f"{source.fn.__name__} {k.get('options')}"] = Counter(opcodes(compiled.asm["cubin"]))
        return compiled

    call = (*padding_sampler_inputs(rows, vocab), False, True, False)
    h200.triton.compile = compile_and_count  # the name the test module's sm_90 compile calls
    try:
        h200.compile_for_h200(sample_step, [call], dynamic=False)
    finally:
        h200.triton.compile = compile_real
    rows_out = [{"kernel": name, "instructions": sum(c.values()), "by_opcode": dict(c.most_common())}
                for name, c in found.items()]
    for row in rows_out:
        print(json.dumps({k: row[k] for k in ("kernel", "instructions")}),
              {op: row["by_opcode"][op] for op in list(row["by_opcode"])[:8]})
    if args.save:
        out = Path(args.save) / "sampler_sass.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"rows": rows, "vocab": vocab, "torch": torch.__version__,
                                   "triton": triton.__version__, "kernels": rows_out}, indent=1))
        print(f"saved {out}")


if __name__ == "__main__":
    main()
