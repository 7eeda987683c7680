"""GPU checks (run on the H200; skipped without CUDA): bf16 parity with transformers on the paged path."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmfx.batch import SequenceChunk
from llmfx.step_inputs import pack
from llmfx.kv_pool import KVPool
from llmfx.models import run
from llmfx.testing.reference import greedy_generate
from llmfx.weights import load_params, resolve_model
from tests.conftest import HF_CASES

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("case", list(HF_CASES))
def test_bf16_prefill_logits_match_transformers_on_gpu(hf_checkpoint, case):
    _, path = hf_checkpoint(case)
    source = resolve_model(path)
    params = load_params(source, dtype="bf16", device="cuda")
    ids = torch.randint(0, source.config.vocab_size, (20,), generator=torch.Generator().manual_seed(1))
    # A private bf16 copy: the session's fp32 model stays untouched for the CPU parity tests.
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="eager").cuda()
    with torch.no_grad():
        expected = hf(ids[None].cuda()).logits[0, -1].float()
    kv = KVPool.allocate(source.config, 7, 4, torch.bfloat16, "cuda")
    with torch.no_grad():
        logits, _ = run(params, source.config, pack([SequenceChunk(tuple(ids.tolist()), 0, (5, 3, 1, 2, 6))], 4,
                                                     "cuda"), kv)
    # bf16 keeps 8 bits of mantissa: compare at a tolerance proportional to the logits' scale.
    scale = expected.abs().max().item()
    torch.testing.assert_close(logits[0], expected, rtol=0, atol=0.05 * scale)
    assert logits[0].argmax() == expected.argmax() or (expected.max() - expected[logits[0].argmax()]) < 0.02 * scale


@pytest.mark.parametrize("case", ["llama", "qwen3", "mistral"])
def test_greedy_tokens_on_gpu_in_fp32_equal_cpu(hf_checkpoint, case):
    _, path = hf_checkpoint(case)
    source = resolve_model(path)
    prompt = list(range(3, 23))
    cpu = greedy_generate(load_params(source), source.config, prompt, 32, shuffle_pages_seed=0)
    gpu = greedy_generate(load_params(source, device="cuda"), source.config, prompt, 32, shuffle_pages_seed=0)
    assert gpu == cpu


@pytest.mark.parametrize("rows, vocab", [(1, 32000), (256, 32000), (256, 128256)])
def test_the_compiled_sampler_at_the_served_shape_equals_eager(rows, vocab):
    # The GPU suite's models have small vocabularies; at 32,000 ids (TinyLlama) and 128,256 (Llama-3) and 256
    # rows inductor splits the reductions (the codegen the CPU's tests/test_compile_for_h200.py compiles): run
    # it against eager.
    from llmfx.model_engine import sample_step
    from llmfx.sampler import PenaltyState, SamplingTensors, token_words
    from llmfx.sampling_params import SamplingParams

    g = torch.Generator().manual_seed(rows)
    params = [SamplingParams(temperature=0.0) if i % 3 == 0 else
              SamplingParams(temperature=0.8, top_p=0.9, top_k=50, presence_penalty=0.5, seed=i) for i in range(rows)]
    sampling = SamplingTensors.build(params, list(range(rows)), list(range(100, 100 + rows)), "cuda")
    outputs = [torch.randint(0, vocab, (5,), generator=g).tolist() for _ in range(rows)]
    penalties = PenaltyState.build([[1, 2, 3]] * rows, outputs, vocab, "cuda")
    logits = (torch.randn(rows, vocab, generator=g) * 3).to("cuda", torch.bfloat16)
    unseen = torch.full((rows,), -1, dtype=torch.int64, device="cuda")
    run = lambda fn: fn(logits, unseen, sampling, penalties, torch.zeros(rows, dtype=torch.int64, device="cuda"),  # noqa: E731
                        token_words(vocab, "cuda"), True, True, True)
    eager, compiled = run(sample_step), run(torch.compile(sample_step, fullgraph=True, dynamic=False))
    assert torch.equal(compiled[:, 0], eager[:, 0])  # the tokens
    torch.testing.assert_close(compiled[:, 1:], eager[:, 1:], rtol=1e-4, atol=1e-4)  # logprobs, ranks, top-20
