"""The engine step compiles for the TinyLlama shape (vocab 32000, hidden 2048) through inductor's Triton codegen.

On the H200 (torch 2.11) compiling the batch-1 step failed in inductor's fusion pass
(simd.py can_fuse: `assert rnumel1 == 1 and rnumel2 != 1`): with one row, the `ranks` reduction
read the sampled token's argmax, inductor split it along the argmax's ranges and left a reduction
over one element. Tiny configs never hit it. On CPU, inductor's Triton (SIMD) codegen runs the same
scheduling and fusion with `cpu_backend="triton"`; the kernels it writes cannot run without a Triton
CPU driver, so the compile is stopped right after fusion, where the bug was.
"""

from __future__ import annotations

import dataclasses
from unittest import mock

import pytest
import torch

pytest.importorskip("triton")

from torch._inductor.scheduler import Scheduler  # noqa: E402

from llmfx.buckets import BucketKey  # noqa: E402
from llmfx.kv_pool import KVPool  # noqa: E402
from llmfx.model_engine import EngineConfig, ModelEngine, forward_step, sample_step  # noqa: E402
from llmfx.ops import rope_table  # noqa: E402
from llmfx.presets import preset  # noqa: E402
from llmfx.weights import dummy_params  # noqa: E402


class _FusionDone(Exception):
    """Raised in place of Scheduler.codegen: scheduling and fusion finished."""


def _stop(*args, **kwargs):
    raise _FusionDone


def _reached(err: BaseException, kind: type) -> bool:
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, kind):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


@pytest.fixture(scope="module")
def engine():
    cfg = dataclasses.replace(preset("tinyllama-1.1b"), num_layers=1, max_position_embeddings=64)
    params = dummy_params(cfg, dtype=torch.bfloat16, device="cpu", seed=0)
    params["rope"] = rope_table(cfg, 64, "cpu")
    eng = ModelEngine(params, cfg, EngineConfig(page_size=16, seed=0, max_pages_per_seq=4, max_batch_size=8))
    kv = KVPool.allocate(cfg, 2, 16, torch.bfloat16, "cpu").layers
    return eng, kv


@pytest.mark.parametrize("filtering", [True, False])
@pytest.mark.parametrize("dynamic", [False, None])
@pytest.mark.parametrize("num_seqs", [1, 8])
def test_step_fuses_with_triton_codegen(engine, num_seqs, dynamic, filtering):
    eng, kv = engine
    inputs, sampling, gather_rows, penalties, token_pool = eng._padding_args(
        BucketKey(num_tokens=num_seqs, num_seqs=num_seqs, decode=True))
    logits = torch.randn(num_seqs, eng.cfg.vocab_size, dtype=torch.bfloat16)
    unseen = torch.full((num_seqs,), -1, dtype=torch.int64)
    # Each half as the engine compiles it, with inductor's Triton codegen; each is stopped after fusion.
    halves = ((forward_step, (eng.params, eng.cfg, kv, inputs, gather_rows, token_pool)),
              (sample_step, (logits, unseen, sampling, penalties, token_pool, filtering)))
    torch._dynamo.reset()
    try:
        for fn, args in halves:
            compiled = torch.compile(fn, options={"cpu_backend": "triton"}, fullgraph=True, dynamic=dynamic)
            with pytest.raises(Exception) as stopped, torch.inference_mode(), \
                    mock.patch.object(Scheduler, "codegen", _stop):
                compiled(*args)
            if not _reached(stopped.value, _FusionDone):
                raise stopped.value
    finally:
        torch._dynamo.reset()
