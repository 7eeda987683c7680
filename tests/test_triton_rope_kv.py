"""The Triton rope + KV-write kernel: on CPU through the Triton interpreter, on CUDA natively.

The kernel rotates in float32 and rounds once, so its exact oracle is apply_rope on float32 copies
rounded to the output dtype, with padding rows (slot -1) writing nothing; the interpreter matches it
bit for bit, a GPU within one rounding (FMA contraction). Against the op's reference, which rotates
in the inputs' dtype, it agrees to the dtype's rounding. The `gpu` tests add TinyLlama-sized
batches, dispatch through torch.ops, and the op in a fullgraph compile replayed as CUDA graphs.
Without a GPU the kernel is also compiled for sm_90 (tests/sm90_compile.py) to catch what the
interpreter accepts and the compiler does not, and register spills.
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

# First: it turns the interpreter on (without CUDA) before anything imports triton.
from tests.triton_interpreter import (DEVICE, INTERPRET, KERNELS_RUN_HERE, kernels, needs_cuda,  # isort: skip
                                      assert_compiled_without_spills, run_kernel_tests_in_fresh_interpreter,
                                      sm90_reports)

from llmfx.ops import apply_rope
from llmfx.ops import triton_rope_kv as tr
from llmfx.ops.rope_kv import rope_write_kv_reference
from tests.test_rope_kv import packed_qkv, rotary_table

TABLE_ROWS = 8192
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


@functools.lru_cache
def table(head_dim: int) -> torch.Tensor:
    return rotary_table(head_dim, TABLE_ROWS)


def make_case(tokens, heads, kv_heads, head_dim, page_size, num_pages, pad, positions, dtype, seed, packed=True,
              head_major=False, device=DEVICE):
    """Args of rope_write_kv: real rows get distinct slots on pages 1.. in shuffled order, pad rows slot -1.

    The pools start random (not zero), so a slot the kernel must not touch shows any stray write.
    head_major stores them as KVPool does ([P, K, S, D] memory seen as [P, S, K, D]).
    """
    gen = torch.Generator().manual_seed(seed)
    q, k, v = packed_qkv(tokens, heads, kv_heads, head_dim, dtype, gen)
    if not packed:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    slots = torch.randperm((num_pages - 1) * page_size, generator=gen)[:tokens] + page_size
    slots[torch.as_tensor(pad, dtype=torch.bool)] = -1
    pools = torch.randn(2, num_pages, page_size, kv_heads, head_dim, generator=gen).to(dtype)
    if head_major:
        pools = pools.transpose(2, 3).contiguous().transpose(2, 3)  # same values, head-major memory
    to = dict(device=device)
    return (pools[0].to(**to), pools[1].to(**to), q.to(**to), k.to(**to), v.to(**to), table(head_dim).to(**to),
            torch.as_tensor(positions, dtype=torch.int64).to(**to), slots.to(**to))


def float32_rotation(args):
    """What the kernel computes: (q out, k pages, v pages) from float32 rotations rounded once; slot -1 skipped."""
    k_pages, v_pages, q, k, v, rope, positions, slots = [a.cpu() for a in args]
    k_pages, v_pages = k_pages.clone(), v_pages.clone()
    cos_sin = rope[positions]
    real = slots >= 0
    page, offset = slots[real] // k_pages.shape[1], slots[real] % k_pages.shape[1]
    k_pages[page, offset] = apply_rope(k.float(), cos_sin).to(k_pages.dtype)[real]
    v_pages[page, offset] = v.to(v_pages.dtype)[real]
    return apply_rope(q.float(), cos_sin).to(q.dtype), k_pages, v_pages


def run_kernel(args, **kwargs):
    """The kernel on copies of the pools: (q out, k pages, v pages) on CPU."""
    k_pages, v_pages = args[0].clone(), args[1].clone()
    q_out = tr.triton_rope_write_kv(k_pages, v_pages, *args[2:], **kwargs)
    return q_out.cpu(), k_pages.cpu(), v_pages.cpu()


def assert_same_as_float32_rotation(actual, expected):
    """Bitwise in the interpreter; compiled, one rounding of the dtype (FMA changes float32's last bit)."""
    for a, e in zip(actual, expected, strict=True):
        assert a.dtype == e.dtype and a.shape == e.shape
        if INTERPRET:
            assert torch.equal(a, e)
        else:
            scale = e.float().abs().amax().item() if e.numel() else 1.0
            rtol = 2 * UNIT_ROUNDOFF[e.dtype]
            torch.testing.assert_close(a, e, rtol=rtol, atol=2.0**-20 * scale)


@st.composite
def batches(draw):
    """Any GQA ratio, head_dim 16/24/64/128 (24: a half that is no power of two), padding rows, 8k positions."""
    kv_heads = draw(st.sampled_from([1, 2, 3, 4]))
    heads = kv_heads * draw(st.sampled_from([1, 3, 4, 8]))
    head_dim = draw(st.sampled_from([16, 24, 64, 128]))
    page_size = draw(st.sampled_from([1, 4, 16]))
    tokens = draw(st.integers(0, 6))
    num_pages = 1 + -(-tokens // page_size) + draw(st.integers(0, 2))
    pad = draw(st.lists(st.booleans(), min_size=tokens, max_size=tokens))
    positions = draw(st.lists(st.integers(0, TABLE_ROWS - 1), min_size=tokens, max_size=tokens))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    packed = draw(st.booleans())
    head_major = draw(st.booleans())
    return tokens, heads, kv_heads, head_dim, page_size, num_pages, pad, positions, dtype, draw(
        st.integers(0, 2**16)), packed, head_major


@kernels
@settings(max_examples=25)
@given(batches())
def test_kernel_rotates_in_float32_and_writes_only_real_slots(case):
    *shape, packed, head_major = case
    args = make_case(*shape, packed=packed, head_major=head_major)
    assert_same_as_float32_rotation(run_kernel(args), float32_rotation(args))


@kernels
@settings(max_examples=10)
@given(batches())
def test_kernel_agrees_with_the_reference_op_to_the_dtypes_rounding(case):
    *shape, packed, head_major = case
    args = make_case(*shape, packed=packed, head_major=head_major)
    k_pages, v_pages = args[0].clone().cpu(), args[1].clone().cpu()
    q_ref = rope_write_kv_reference(k_pages, v_pages, *[a.cpu() for a in args[2:]])
    q_out, k_out, v_out = run_kernel(args)
    # The reference rounds every product to the dtype; 8 unit roundoffs of the inputs' scale bound the gap.
    atol = 8 * UNIT_ROUNDOFF[q_ref.dtype] * max([1.0] + [a.abs().max().item() for a in args[2:5] if a.numel()])
    torch.testing.assert_close(q_out, q_ref, rtol=0, atol=atol)
    # The reference sends padding rows to the null page 0; the kernel leaves it alone.
    torch.testing.assert_close(k_out[1:], k_pages[1:], rtol=0, atol=atol)
    assert torch.equal(v_out[1:], v_pages[1:])
    assert torch.equal(k_out[0], args[0][0].cpu()) and torch.equal(v_out[0], args[1][0].cpu())


@kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_tinyllama_heads_at_positions_near_8k(head_dim, dtype):
    # 32 q heads over 4 KV heads, the last rows of the table, one padding row between real ones.
    positions = [TABLE_ROWS - 1, 0, TABLE_ROWS - 2, 4097]
    args = make_case(4, 32, 4, head_dim, 16, 3, [False, True, False, False], positions, dtype, head_dim)
    assert_same_as_float32_rotation(run_kernel(args), float32_rotation(args))


@kernels
def test_padding_only_batch_writes_nothing():
    args = make_case(3, 4, 2, 16, 4, 2, [True] * 3, [0, 0, 0], torch.bfloat16, 0)
    _, k_pages, v_pages = run_kernel(args)
    assert torch.equal(k_pages, args[0].cpu()) and torch.equal(v_pages, args[1].cpu())


@kernels
@pytest.mark.parametrize("num_warps", [1, 2, 8])
def test_result_does_not_depend_on_launch_settings(num_warps):
    args = make_case(5, 8, 2, 64, 16, 2, [False, False, True, False, False], [1, 2, 3, 4, 5000],
                     torch.bfloat16, 7)
    assert_same_as_float32_rotation(run_kernel(args, num_warps=num_warps), float32_rotation(args))


@kernels
def test_empty_batch_returns_empty_q():
    args = make_case(0, 4, 2, 16, 4, 2, [], [], torch.float16, 0)
    q_out, k_pages, v_pages = run_kernel(args)
    assert q_out.shape == (0, 4, 16) and torch.equal(k_pages, args[0].cpu())


@pytest.mark.skipif(KERNELS_RUN_HERE, reason="the kernel tests run in this process")
def test_kernels_in_a_fresh_interpreter_process():
    run_kernel_tests_in_fresh_interpreter(__file__)


@pytest.mark.skipif(KERNELS_RUN_HERE, reason="once per session, outside the interpreter; a GPU compiles for itself")
def test_kernel_compiles_for_sm90_without_spilling_registers():
    reports = sm90_reports()
    assert len(reports) == 5, reports
    assert_compiled_without_spills(reports)


# ---- CUDA only -------------------------------------------------------------------------------------------


@st.composite
def cuda_batches(draw):
    """Decode and prefill token counts at real head shapes (TinyLlama, Llama-3-8B, Qwen3), every dtype."""
    heads, kv_heads, head_dim = draw(st.sampled_from([(32, 4, 64), (32, 8, 128), (16, 8, 128), (64, 8, 128),
                                                      (12, 2, 64), (4, 2, 24)]))
    tokens = draw(st.sampled_from([1, 3, 8, 64, 256, 1000]))
    page_size = draw(st.sampled_from([16, 32]))
    num_pages = 1 + -(-tokens // page_size) + 3
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    pad = torch.rand(tokens, generator=gen) < draw(st.sampled_from([0.0, 0.3]))  # drawn by torch: up to 1000 rows
    positions = torch.randint(0, TABLE_ROWS, (tokens,), generator=gen)
    dtype = draw(st.sampled_from([torch.bfloat16, torch.bfloat16, torch.float16, torch.float32]))
    return tokens, heads, kv_heads, head_dim, page_size, num_pages, pad, positions, dtype, seed


@settings(max_examples=15, deadline=None)
@given(cuda_batches())
@pytest.mark.gpu
@needs_cuda
def test_cuda_op_dispatches_to_the_kernel_and_matches_float32_rotation(case):
    args = make_case(*case, device="cuda")
    k_pages, v_pages = args[0].clone(), args[1].clone()
    q_out = torch.ops.llmfx.rope_write_kv(k_pages, v_pages, *args[2:])
    assert q_out.is_contiguous() and q_out.dtype == args[2].dtype
    assert_same_as_float32_rotation((q_out.cpu(), k_pages.cpu(), v_pages.cpu()), float32_rotation(args))


@pytest.mark.gpu
@needs_cuda
def test_op_compiles_fullgraph_into_cuda_graphs_that_replay_new_positions_and_slots():
    from torch._dynamo.utils import counters

    heads, kv_heads, head_dim, page_size, num_pages, tokens = 32, 4, 64, 16, 40, 8

    def step(k_pages, v_pages, x, w, rope, positions, slots):
        qkv = x @ w  # [T, (H + 2K) * D]
        q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        q = torch.ops.llmfx.rope_write_kv(k_pages, v_pages, q.view(tokens, heads, head_dim),
                                          k.view(tokens, kv_heads, head_dim), v.view(tokens, kv_heads, head_dim),
                                          rope, positions, slots)
        return q * 1.0

    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(256, (heads + 2 * kv_heads) * head_dim, generator=gen) / 16).to("cuda", torch.bfloat16)
    rope = table(head_dim).cuda()
    pools = [torch.zeros(num_pages, page_size, kv_heads, head_dim, dtype=torch.bfloat16, device="cuda")
             for _ in range(2)]
    for pool in pools:
        torch._dynamo.mark_static_address(pool)
    compiled = torch.compile(step, fullgraph=True, mode="reduce-overhead", dynamic=False)
    counters.clear()
    for seed in range(3):
        x = torch.randn(tokens, 256, generator=torch.Generator().manual_seed(seed)).to("cuda", torch.bfloat16)
        positions = torch.randint(0, TABLE_ROWS, (tokens,), generator=gen).cuda()
        slots = torch.randperm((num_pages - 1) * page_size, generator=gen)[:tokens] + page_size
        slots[seed] = -1
        slots = slots.cuda()
        for _ in range(3):  # warm-up, record, replay
            for pool in pools:
                pool.zero_()
            out = compiled(*pools, x, w, rope, positions, slots).clone()
        expected_pools = [torch.zeros_like(p) for p in pools]
        q, k, v = (x @ w).split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        expected = rope_write_kv_reference(*expected_pools, q.view(tokens, heads, head_dim),
                                           k.view(tokens, kv_heads, head_dim), v.view(tokens, kv_heads, head_dim),
                                           rope, positions, slots)
        atol = 8 * UNIT_ROUNDOFF[torch.bfloat16] * qkv_scale(x, w)
        torch.testing.assert_close(out, expected, rtol=0, atol=atol)
        for pool, expected_pool in zip(pools, expected_pools):  # page 0: the reference's padding row
            torch.testing.assert_close(pool[1:], expected_pool[1:], rtol=0, atol=atol)
    assert counters["inductor"]["cudagraph_skips"] == 0


def qkv_scale(x, w):
    return (x @ w).abs().max().item()
