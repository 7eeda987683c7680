"""The engine step compiles as inductor compiles it for the H200: the TinyLlama shape (vocab 32000, hidden 2048),
and the sampler at the presets' larger vocabularies.

Three failures would show only on the H200, never with the tiny test models:
- session 1: compiling the batch-1 step asserted in inductor's fusion pass (simd.py can_fuse:
  `assert rnumel1 == 1 and rnumel2 != 1`): the `ranks` reduction read the sampled token's argmax and
  inductor split it along the argmax's ranges (the opaque `llmfx::argmax_rows` fixed it);
- session 17: an int32 version of the noise hash compiled everywhere but at batch 256, where inductor
  split the vocabulary reduction in four and wrote `arange(V) * C1` as an index expression whose
  constant Triton refuses as int32 (`Scalar -6896391544000 is out of range for type int32`);
- found here, session 17: the int64 noise hash the same way with Llama-3's 128,256 ids at batch 256.
On the CPU, inductor's Triton (SIMD) codegen runs with `cpu_backend="triton"` and the H200's 132 SMs
(split reductions are decided by the SM count). Every kernel it writes is then compiled for sm_90 by
Triton's own compiler instead of for the CPU, which has no Triton driver; the kernels never run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from unittest import mock

import pytest
import torch

triton = pytest.importorskip("triton")

import torch.utils._triton as torch_triton  # noqa: E402
from torch._inductor import config as inductor_config  # noqa: E402
from torch._inductor.runtime import triton_helpers, triton_heuristics  # noqa: E402
from torch._inductor.runtime.hints import DeviceProperties  # noqa: E402
from torch.fx.experimental import _config as fx_config  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from llmfx.buckets import BucketKey  # noqa: E402
from llmfx.kv_pool import KVPool  # noqa: E402
from llmfx.model_engine import EngineConfig, ModelEngine, forward_step, mark_sampler_sizes, sample_step  # noqa: E402
from llmfx.ops import rope_table  # noqa: E402
from llmfx.presets import preset  # noqa: E402
from llmfx.testing.sampler_inputs import padding_sampler_inputs  # noqa: E402
from llmfx.weights import dummy_params  # noqa: E402

H200_SMS = 132


@contextlib.contextmanager
def h200_codegen():
    """Compile with inductor's Triton codegen as for an H200; yields the list of (kernel, launch config, error
    or None) that each written kernel's sm_90 compile appends to."""
    kernels: list[tuple[str, dict, str | None]] = []
    create = DeviceProperties.create.__func__

    def as_h200(cls, device):
        return create(cls, device)._replace(multi_processor_count=H200_SMS)

    def compile_for_sm90(self, *args, **kwargs):  # stands in for CachingAutotuner.precompile: no launchers
        for cfg in self.configs:
            meta = self._create_compile_meta(cfg)
            source = ASTSource(self.fn, meta["signature"], meta["constants"], meta["configs"][0])
            try:
                triton.compile(source, target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
                kernels.append((self.fn.__name__, cfg.kwargs, None))
            except Exception as err:  # noqa: BLE001 (every compile error is a finding)
                kernels.append((self.fn.__name__, cfg.kwargs, str(err).strip().splitlines()[-1]))

    # Kernel tests elsewhere set TRITON_INTERPRET=1 for the session; with it inductor would interpret its
    # kernels instead of compiling them.
    with mock.patch.dict(os.environ, {"TRITON_INTERPRET": "0"}), \
            mock.patch.object(DeviceProperties, "create", classmethod(as_h200)), \
            mock.patch.object(torch_triton, "triton_hash_with_backend", lambda: "h200-codegen-on-cpu"), \
            mock.patch.object(triton_helpers, "set_driver_to_cpu", lambda: None), \
            mock.patch.object(triton_heuristics.CachingAutotuner, "precompile", compile_for_sm90), \
            inductor_config.patch(cpu_backend="triton", compile_threads=1, force_disable_caches=True):
        yield kernels


def compile_for_h200(fn, calls: list[tuple], *, dynamic: bool | None) -> list[tuple[str, dict, str | None]]:
    """Compile fn as inductor would for the H200 by running it on each argument tuple in turn; the kernels of
    the last compile. Running a compiled graph fails (its kernels have no launchers): that is expected."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic)
    try:
        for args in calls:
            with h200_codegen() as kernels, torch.inference_mode():
                try:
                    compiled(*args)
                except Exception:
                    if not kernels:  # failed before any kernel was written: a real error
                        raise
    finally:
        torch._dynamo.reset()
    return kernels


@pytest.fixture(scope="module")
def engine():
    cfg = dataclasses.replace(preset("tinyllama-1.1b"), num_layers=1, max_position_embeddings=64)
    params = dummy_params(cfg, dtype=torch.bfloat16, device="cpu", seed=0)
    params["rope"] = rope_table(cfg, 64, "cpu")
    eng = ModelEngine(params, cfg, EngineConfig(page_size=16, seed=0, max_pages_per_seq=4, max_batch_size=256))
    kv = KVPool.allocate(cfg, 2, 16, torch.bfloat16, "cpu").layers
    return eng, kv


def _halves(engine, num_seqs: int, filtering: bool) -> tuple[tuple, tuple]:
    """(forward_step's arguments, sample_step's) for a decode batch of num_seqs padding rows."""
    eng, kv = engine
    inputs, sampling, gather_rows, penalties, token_pool, words = eng._padding_args(
        BucketKey(num_tokens=num_seqs, num_seqs=num_seqs, decode=True))
    logits = torch.randn(num_seqs, eng.cfg.vocab_size, dtype=torch.bfloat16)
    unseen = torch.full((num_seqs,), -1, dtype=torch.int64)
    return ((eng.params, eng.cfg, kv, inputs, gather_rows, token_pool),
            (logits, unseen, sampling, penalties, token_pool, words, filtering, True, filtering))


def _assert_all_compiled(kernels):
    assert kernels, "no kernel was written"
    failed = [k for k in kernels if k[2] is not None]
    assert not failed, failed


@pytest.mark.parametrize("filtering", [True, False])
@pytest.mark.parametrize("num_seqs", [1, 256])
def test_a_bucket_step_compiles_for_sm90(engine, num_seqs, filtering):
    forward_args, sampler_args = _halves(engine, num_seqs, filtering)
    _assert_all_compiled(compile_for_h200(forward_step, [forward_args], dynamic=False))
    _assert_all_compiled(compile_for_h200(sample_step, [sampler_args], dynamic=False))


@pytest.mark.parametrize("filtering", [True, False])
def test_the_shape_generic_step_compiles_for_sm90(engine, filtering):
    # As the engine warms up: the forward compiles at one row, then shape-generic at the largest batch
    # (automatic dynamic shapes); the sampler once, its batch dimension marked dynamic, size-oblivious.
    one, _ = _halves(engine, 1, filtering)
    forward_args, sampler_args = _halves(engine, 256, filtering)
    _assert_all_compiled(compile_for_h200(forward_step, [one, forward_args], dynamic=None))
    logits, unseen, sampling, penalties, token_pool, *_ = sampler_args
    mark_sampler_sizes(logits, unseen, sampling, penalties, token_pool.shape[0])
    with fx_config.patch(backed_size_oblivious=True):
        _assert_all_compiled(compile_for_h200(sample_step, [sampler_args], dynamic=None))


@pytest.mark.parametrize("filtering", [True, False])
@pytest.mark.parametrize("model", ["llama-3.2-1b", "qwen3-0.6b"])
def test_the_sampler_compiles_for_sm90_at_large_vocabularies(model, filtering):
    args = (*padding_sampler_inputs(256, preset(model).vocab_size), filtering, True, filtering)
    _assert_all_compiled(compile_for_h200(sample_step, [args], dynamic=False))
