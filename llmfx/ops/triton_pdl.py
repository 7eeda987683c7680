"""Programmatic dependent launch (PDL, compute capability 9.0 and up) for llmfx's Triton kernels.

A kernel launched with PDL may be scheduled while the kernel before it on the stream is still
running, so its launch overlaps that kernel's tail instead of waiting for its completion. At batch 1
a decode step is 253 kernels in a row, most of a few microseconds (the batch-1 kernel table in
benchmarks/results/2026-11-30-nvidia-h200-graph-parts-kernels-b1-6a7f236.txt), so those gaps add up.
Each of our kernels starts with `wait_for_prior_kernel`, before it touches any memory: it blocks until
the prior kernel has finished and its writes are visible (a no-op when not launched with PDL), then
lets the next kernel launch early in turn. Inductor's kernels take part through its
`triton.enable_pdl` option (ModelEngine sets it where `pdl_enabled`).
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
