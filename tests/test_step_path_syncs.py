"""The serving loop's host side never reads a tensor back (.item(), .tolist(), bool(), ...).

On the GPU each such read waits for the device and stalls the overlap scheduler. The model step
is replaced by a stand-in (the compiled step is one graph replay on the GPU; the CPU reference
attention reads its lengths on purpose and refuses device tensors), so what runs on the executor
thread is exactly the per-step host path: staging, penalties, beams' page copies, result copy, collect, schedule,
postprocess and delivery. Any read of a tensor's values there is recorded and fails the test.
The CUDA kernels' host wrappers (linear, paged attention, rope + KV write, silu_mul), which the stand-in skips,
are checked the same way with their Triton launches recorded instead of run. (The `.tolist()` calls
left in the step path files are on numpy arrays of host buffers: no device is involved.)
"""

from __future__ import annotations

import itertools
import threading
import traceback

import pytest
import torch

from llmfx import model_engine
from llmfx.kv_cache import KvCacheConfig
from llmfx.llm import LLM
from llmfx.sampling_params import SamplingParams
from llmfx.testing.stand_in import instant_step

READS = ("item", "tolist", "cpu", "__bool__", "__int__", "__float__", "__index__")


def _serve_recording_reads(monkeypatch) -> tuple[list, list[str]]:
    reads: list[str] = []
    copied: list[int] = []
    copy_pages = model_engine.copy_pages
    monkeypatch.setattr(model_engine, "copy_pages", lambda layers, copies: (copied.append(len(copies)),
                                                                           copy_pages(layers, copies))[1])

    def recording(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if threading.current_thread().name == "llmfx-executor":
                reads.append(f"Tensor.{name} at\n" + "".join(traceback.format_stack(limit=6)[:-1]))
            return original(self, *args, **kwargs)

        return read

    params = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.9, seed=5, top_p=0.8, top_k=7, max_tokens=9, ignore_eos=True),
              SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2, max_tokens=10,
                             ignore_eos=True),
              SamplingParams(logprobs=3, n=2, temperature=0.7, seed=1, max_tokens=8, ignore_eos=True),
              SamplingParams(stop_token_ids=[1], max_tokens=20),  # the stand-in samples 1: stops at once
              # Beams fork onto shared partial pages: the step copies KV pages before it runs.
              SamplingParams(use_beam_search=True, beam_width=2, n=2, temperature=0.0, max_tokens=6, ignore_eos=True)]
    prompts = [[(5 * i + j) % 90 + 2 for j in range(3 + 11 * i)] for i in range(len(params))]
    with LLM("tiny", device="cpu", max_batch_size=8, max_num_tokens=32,
             kv_cache_config=KvCacheConfig(page_size=4, max_tokens=2048)) as llm:
        llm._engine._step = instant_step(llm._engine.engine_cfg.max_batch_size)
        for name in READS:
            monkeypatch.setattr(torch.Tensor, name, recording(name))
        outs = llm.generate(prompts, params, use_tqdm=False)
    assert copied, "the beams never copied a page: the page-copy path went unchecked"
    return outs, reads


def test_the_per_step_host_path_reads_no_tensor_back(monkeypatch):
    outs, reads = _serve_recording_reads(monkeypatch)
    assert [o.finish_reason for out in outs for o in out.outputs] == ["length"] * 5 + ["stop"] + ["length"] * 2
    assert reads == [], reads[0]


def test_a_tensor_read_on_the_step_path_is_caught(monkeypatch):
    # The guard itself: one .tolist() slipped into collect must show up.
    from llmfx.model_engine import ModelEngine

    collect = ModelEngine.collect

    def collect_reading_back(self, inflight):
        inflight.host[:1, 0].tolist()
        return collect(self, inflight)

    monkeypatch.setattr(ModelEngine, "collect", collect_reading_back)
    _, reads = _serve_recording_reads(monkeypatch)
    assert reads and all(r.startswith("Tensor.tolist") for r in reads)


def _record_reads(monkeypatch) -> list[str]:
    """The names of the tensor reads made from here until monkeypatch.undo() (from any thread)."""
    reads: list[str] = []
    for name in READS:
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _n=name, _o=original, **k: (
            reads.append(_n), _o(self, *a, **k))[1])
    return reads


def test_the_sampler_reads_no_tensor_back_in_any_variant(monkeypatch):
    # On the GPU the sampler runs inside a CUDA graph, where a read would fail the capture; on the
    # eager path (CPU, enforce_eager) it would stall the step. Every variant the engine picks, with penalties.
    from llmfx.sampler import PenaltyState, SamplingTensors, sample

    logits = torch.randn(4, 50)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, seed=2, top_p=0.9, top_k=5),
              SamplingParams(temperature=0.7, min_p=0.1, repetition_penalty=1.2), SamplingParams(temperature=1.0)]
    tensors = SamplingTensors.build(params, [1, 2, 3, 4], [7, 7, 7, 7], "cpu")
    penalties = PenaltyState.build([[1, 2]] * 4, [[3]] * 4, 50, "cpu")
    reads = _record_reads(monkeypatch)
    for filtering, noise, top in itertools.product((True, False), repeat=3):
        sample(logits, tensors, penalties, filtering=filtering, noise=noise, top_logprobs=top)
    penalties.write([[4]] * 4, [[5, 6]] * 4)
    monkeypatch.undo()
    assert reads == []


class _RecordedKernel:
    """A Triton kernel stand-in: `kernel[grid](...)` records the launch by name instead of running it."""

    def __init__(self, name: str, launched: list[str]) -> None:
        self.name, self.launched = name, launched

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launched.append(self.name)


def _record_launches(monkeypatch, *kernels: tuple[object, str]) -> list[str]:
    """Replace each (module, Triton kernel name) by a recorder; the launched names, in order."""
    launched: list[str] = []
    for module, name in kernels:
        monkeypatch.setattr(module, name, _RecordedKernel(name, launched))
    return launched


def test_the_cuda_linear_route_reads_no_tensor_back(monkeypatch):
    # llmfx::linear's CUDA kernel picks the GEMV, the Triton matmul or F.linear by rows on every layer of
    # every step (inside the graph when compiled, per call when eager). Its host side, with the Triton
    # launches recorded instead of run, must read no value back: shapes, strides and dtypes only.
    pytest.importorskip("triton")
    from llmfx.ops import triton_gemm, triton_gemv, triton_linear

    launched = _record_launches(monkeypatch, (triton_gemv, "_gemv_partial_kernel"), (triton_gemv, "_gemv_reduce_kernel"),
                                (triton_gemm, "_gemm_kernel"), (triton_gemm, "_gemv_reduce_kernel"))
    w = torch.randn(64, 5632).bfloat16()  # the down projection's K: the GEMV and the matmul both split K
    x = torch.randn(triton_linear.LINEAR_GEMM_ROWS + 1, 5632).bfloat16()
    reads = _record_reads(monkeypatch)
    for rows in range(1, len(x) + 1):
        launched.clear()
        triton_linear.triton_linear(x[:rows], w)
        kernel = ("_gemv_partial_kernel" if rows <= triton_linear.LINEAR_GEMV_ROWS else
                  "_gemm_kernel" if rows <= triton_linear.LINEAR_GEMM_ROWS and triton_gemm.gemm_config(rows, *w.shape)
                  else None)
        assert launched == ([] if kernel is None else [kernel, "_gemv_reduce_kernel"]), (rows, launched)
    monkeypatch.undo()
    assert reads == []


def test_the_cuda_attention_rope_kv_and_silu_mul_wrappers_read_no_tensor_back(monkeypatch):
    # The other CUDA kernels of every layer: paged attention (decode and varlen), the fused rope + KV
    # write and the MLP's silu(gate) * up. On the GPU path their wrappers run at every eager step and at
    # every capture: lengths, page tables and positions must stay on the device, only shapes and strides
    # may steer the launch.
    pytest.importorskip("triton")
    from llmfx.ops import triton_activation, triton_attention, triton_rope_kv

    launched = _record_launches(monkeypatch, (triton_attention, "_decode_kernel"),
                                (triton_attention, "_decode_reduce_kernel"), (triton_attention, "_varlen_kernel"),
                                (triton_rope_kv, "_rope_write_kv_kernel"), (triton_activation, "_silu_mul_kernel"))
    tokens, seqs, heads, kv_heads, head_dim, pages, page_size = 6, 3, 8, 2, 64, 9, 16
    q = torch.randn(tokens, heads, head_dim).bfloat16()
    k = v = torch.randn(tokens, kv_heads, head_dim).bfloat16()
    k_pages = v_pages = torch.zeros(pages, kv_heads, page_size, head_dim).bfloat16().transpose(1, 2)
    table = torch.arange(1, 1 + seqs * 3, dtype=torch.int32).reshape(seqs, 3)
    rope = torch.randn(64, head_dim)
    positions, slots = torch.arange(tokens), torch.arange(tokens) + page_size
    reads = _record_reads(monkeypatch)
    triton_rope_kv.triton_rope_write_kv(k_pages, v_pages, q, k, v, rope, positions, slots)
    for starts, lens in (([0, 1, 2, 3], [10, 20, 30]), ([0, 2, 5, 6], [12, 21, 33])):  # decode, then prefill chunks
        qsl, seq_lens = torch.tensor(starts, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32)
        rows = q[: starts[-1]]
        triton_attention.triton_paged_attention(rows, k_pages, v_pages, table, qsl, seq_lens, 0.125, 0)
    for rows in (1, tokens):  # a decode row, a prefill chunk
        triton_activation.triton_silu_mul(torch.randn(rows, 2 * 5632).bfloat16())
    monkeypatch.undo()
    assert launched == ["_rope_write_kv_kernel", "_decode_kernel", "_decode_reduce_kernel", "_varlen_kernel",
                        "_silu_mul_kernel", "_silu_mul_kernel"]
    assert reads == []
