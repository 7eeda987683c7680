"""Triton kernels in tests: compiled on CUDA, else in Triton's interpreter on CPU tensors.

Import this before anything that imports triton. Triton reads TRITON_INTERPRET when it decorates its
own kernels (tl.zeros, tl.sum, ...), and importing torch._dynamo imports triton, so in a pytest
session that has already imported it the interpreter is off: kernel tests are then marked `kernels`
(skipped here) and a module reruns itself in a fresh process that starts with the interpreter on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

INTERPRET = not torch.cuda.is_available()
if INTERPRET:
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from triton.runtime import interpreter  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
KERNELS_RUN_HERE = not INTERPRET or isinstance(triton.language.zeros, interpreter.InterpretedFunction)
kernels = pytest.mark.skipif(not KERNELS_RUN_HERE, reason="run by a test in a fresh interpreter process")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

if INTERPRET and KERNELS_RUN_HERE and not getattr(interpreter, "_llmfx_patched", False):
    interpreter._llmfx_patched = True
    if hasattr(interpreter, "_patch_lang_tensor"):
        # Triton 3.6's interpreter turns loaded scalars into 1-element arrays, and int() of those fails
        # under NumPy 2, so range() over a loaded bound breaks; compiled kernels are unaffected.
        _patch_lang_tensor = interpreter._patch_lang_tensor

        def _patch_with_scalar_index(tensor, scope):
            _patch_lang_tensor(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

        interpreter._patch_lang_tensor = _patch_with_scalar_index

    # The interpreter truncates float32 -> bfloat16 where compiled kernels (and torch) round to nearest
    # even; round as the GPU does, so bf16 kernel results compare exactly.
    _create_fp_trunc = interpreter.InterpreterBuilder.create_fp_trunc

    def _fp_trunc_to_nearest_even(self, src, dst_type):
        if src.dtype.scalar == triton.language.float32 and dst_type.scalar == triton.language.bfloat16:
            x = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
            return interpreter.TensorHandle(x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16),
                                            dst_type.scalar)
        return _create_fp_trunc(self, src, dst_type)

    interpreter.InterpreterBuilder.create_fp_trunc = _fp_trunc_to_nearest_even


def run_kernel_tests_in_fresh_interpreter(test_file: str) -> None:
    """Run test_file's CPU tests in a new process with TRITON_INTERPRET=1; fail with its output if any fails."""
    assert "LLMFX_INTERPRETER_CHILD" not in os.environ, "TRITON_INTERPRET=1 did not take effect in a fresh process"
    env = {**os.environ, "TRITON_INTERPRET": "1", "LLMFX_INTERPRETER_CHILD": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu", test_file],
                         cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]


def sm90_reports(*flags: str) -> list[dict]:
    """The JSON reports of `python -m tests.sm90_compile *flags`, run without the interpreter (it compiles for
    sm_90 whatever the machine); fails with its stderr if the run fails."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "tests.sm90_compile", *flags], cwd=Path(__file__).parents[1], env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    return [json.loads(line) for line in run.stdout.splitlines()]


def assert_compiled_without_spills(reports: list[dict]) -> None:
    """Every sm90 report compiled, spilled nothing (neither local memory nor a stack frame) and fits an H200 SM."""
    for r in reports:
        assert "error" not in r and r["spilled_bytes"] == 0 and r["shared_bytes"] <= 227 * 1024, r
