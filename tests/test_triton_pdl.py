"""Programmatic dependent launch (llmfx/ops/triton_pdl.py): which devices launch with it, and that every
llmfx kernel waits for the prior kernel before it touches memory (compiled for sm_90 without a GPU).

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


@pytest.mark.skipif(KERNELS_RUN_HERE, reason="once per session, outside the interpreter; a GPU compiles for itself")
def test_every_kernel_waits_for_the_prior_kernel_before_any_memory_access():
    reports = sm90_reports("--pdl")
    assert len(reports) == 7 and all(r["waits_before_memory"] for r in reports), reports
