"""Programmatic dependent launch (llmfx/ops/triton_pdl.py): which devices launch with it, and that before
waiting for the prior kernel every llmfx kernel stores nothing and reads only the step's inputs (compiled
for sm_90 without a GPU).

The H200 runs the kernels with PDL in the `gpu` tests (test_triton_attention.py checks their launch
metadata; every engine test there runs with it).
"""

from __future__ import annotations


import pytest
import torch

from tests.triton_interpreter import KERNELS_RUN_HERE, sm90_reports  # isort: skip

from llmfx.model_engine import inductor_pdl_options
from llmfx.ops import triton_pdl


@pytest.fixture
def capability(monkeypatch):
    """Set the compute capability torch reports for CUDA devices; pdl_enabled's cache is cleared around it."""
    def set_to(major: int, minor: int = 0) -> None:
        triton_pdl._capable.cache_clear()
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (major, minor))

    yield set_to
    triton_pdl._capable.cache_clear()


def test_pdl_only_on_cuda_devices_of_compute_capability_9_and_up(capability):
    assert not triton_pdl.pdl_enabled(torch.device("cpu"))
    capability(9, 0)
    assert triton_pdl.pdl_enabled(torch.device("cuda", 0))
    assert triton_pdl.pdl_launch(torch.device("cuda", 0)) == {"PDL": True, "launch_pdl": True}
    capability(8, 9)
    assert not triton_pdl.pdl_enabled(torch.device("cuda", 0))
    assert triton_pdl.pdl_launch(torch.device("cuda", 0)) == {"PDL": False, "launch_pdl": False}


def test_inductor_kernels_follow_the_same_rule(capability):
    assert inductor_pdl_options(torch.device("cpu")) == {}
    import torch._inductor.config as inductor_config

    if not hasattr(inductor_config.triton, "enable_pdl"):
        assert inductor_pdl_options(torch.device("cuda", 0)) == {}  # an older torch: no option to set
        return
    capability(9, 0)
    assert inductor_pdl_options(torch.device("cuda", 0)) == {"triton.enable_pdl": True}
    capability(8, 0)
    assert inductor_pdl_options(torch.device("cuda", 0)) == {"triton.enable_pdl": False}


# What each kernel may read before PDL's wait: the step's inputs, which no kernel of the step writes (triton_pdl's
# docstring says why that is safe); the decode kernel also asks L2 for its K/V rows, found through the page table.
STEP_INPUTS_READ_EARLY = {
    "rope_write_kv H32 K4 D64 bf16": (["positions_ptr", "rope_ptr", "slots_ptr"], []),
    "paged_attention varlen": (["lens_ptr", "qsl_ptr"], []),
    "paged_attention decode": (["lens_ptr", "qsl_ptr", "table_ptr"], ["k_ptr", "v_ptr"]),
    "paged_attention decode reduce": (["lens_ptr", "qsl_ptr"], []),
    "gemv": ([], []),
    "gemv reduce": ([], []),
    "silu_mul": ([], []),
}


@pytest.mark.skipif(KERNELS_RUN_HERE, reason="once per session, outside the interpreter; a GPU compiles for itself")
def test_before_the_wait_kernels_store_nothing_and_read_only_step_inputs():
    reports = {r.pop("kernel"): r for r in sm90_reports("--pdl")}
    assert reports.keys() == STEP_INPUTS_READ_EARLY.keys()
    for name, (loads, prefetched) in STEP_INPUTS_READ_EARLY.items():
        r = reports[name]
        assert not r["stores"] and r["loads"] == loads, (name, r)
        # A prefetch address is computed from the step inputs too: those may appear beside the pools.
        assert sorted(set(r["prefetches"]) - set(loads)) == prefetched, (name, r)
