"""Programmatic dependent launch (PDL, compute capability 9.0 and up) for llmfx's Triton kernels.

A kernel launched with PDL may be scheduled while the kernel before it on the stream is still
running, so its launch overlaps that kernel's tail instead of waiting for its completion. At batch 1
a decode step is 253 kernels in a row, most of a few microseconds (the batch-1 kernel table in
benchmarks/results/2026-11-30-nvidia-h200-graph-parts-kernels-b1-6a7f236.txt), so those gaps add up.
Each of our kernels calls `wait_for_prior_kernel` before it stores anything: it blocks until the prior
kernel has finished and its writes are visible (a no-op when not launched with PDL), then lets the next
kernel launch early in turn. Inductor's kernels take part through its `triton.enable_pdl` option
(ModelEngine sets it where `pdl_enabled`).

Before the wait a kernel reads only the step's inputs: positions, slots, query starts, lengths, the page
table (and the rope table, a constant). Their dependent loads then overlap the prior kernel instead of
following it (served batch-1 step -2.9% on the H200; benchmarks/README.md, session 19). That is safe
because a kernel launches only when every program of the kernel before it has passed its own wait, so
every kernel two or more launches back has finished; and the step's inputs are converted by torch's own
kernels before the compiled step (launched without PDL, they let the next kernel start only when they
finish) and written by no kernel inside it. A caller that computes these inputs in a PDL kernel right
before calling llmfx::rope_write_kv or llmfx::paged_attention would break that. What each kernel reads
early is pinned by tests/test_triton_pdl.py, from the compiled PTX.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on device launch with PDL: CUDA devices of compute capability 9.0 and up."""
    if device.type != "cuda":
        return False
    return _capable(torch.cuda.current_device() if device.index is None else device.index)


def pdl_launch(device: torch.device) -> dict[str, bool]:
    """A kernel's PDL flag and launch option on device: `kernel[grid](..., **pdl_launch(device))`."""
    pdl = pdl_enabled(device)
    return {"PDL": pdl, "launch_pdl": pdl}


@triton.jit
def wait_for_prior_kernel(PDL: tl.constexpr):
    """With PDL: wait until the prior kernel's writes are visible, then let the next kernel launch."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
