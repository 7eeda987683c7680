"""llmfx::rope_write_kv on CPU is apply_rope then write_kv, bit for bit, and it traces under compile."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmfx.ops import apply_rope, rope_write_kv, write_kv


def rotary_table(head_dim: int, rows: int, theta: float = 10000.0) -> torch.Tensor:
    """[rows, D] float32 cos|sin, the layout of ops.rope.rope_table."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(rows).float(), inv_freq)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def packed_qkv(tokens, heads, kv_heads, head_dim, dtype, gen):
    """q, k, v as the decoder makes them: strided views into one [T, (H + 2K) * D] projection."""
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    return (q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim),
            v.view(tokens, kv_heads, head_dim))


@st.composite
def cases(draw):
    kv_heads = draw(st.sampled_from([1, 2]))
    heads = kv_heads * draw(st.sampled_from([1, 3, 4]))
    head_dim = draw(st.sampled_from([8, 16, 24]))
    page_size = draw(st.sampled_from([1, 4]))
    tokens = draw(st.integers(0, 6))
    slots = draw(st.lists(st.one_of(st.just(-1), st.integers(page_size, 4 * page_size - 1)), min_size=tokens,
                          max_size=tokens, unique_by=lambda s: s if s >= 0 else object()))
    positions = draw(st.lists(st.integers(0, 63), min_size=tokens, max_size=tokens))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    return kv_heads, heads, head_dim, page_size, slots, positions, dtype, draw(st.integers(0, 2**16))


@settings(max_examples=20)
@given(cases())
def test_op_on_cpu_is_apply_rope_then_write_kv_padding_to_the_null_page(case):
    kv_heads, heads, head_dim, page_size, slots, positions, dtype, seed = case
    gen = torch.Generator().manual_seed(seed)
    q, k, v = packed_qkv(len(slots), heads, kv_heads, head_dim, dtype, gen)
    rope = rotary_table(head_dim, 64)
    positions, slots = torch.tensor(positions, dtype=torch.int64), torch.tensor(slots, dtype=torch.int64)
    pools = torch.randn(2, 4, page_size, kv_heads, head_dim, generator=gen).to(dtype)
    k_pages, v_pages = pools.clone()
    expected_k_pages, expected_v_pages = pools.clone()
    cos_sin = rope[positions]
    write_kv(expected_k_pages, expected_v_pages, apply_rope(k, cos_sin), v, slots)
    q_rot = rope_write_kv(k_pages, v_pages, q, k, v, rope, positions, slots)
    assert torch.equal(q_rot, apply_rope(q, cos_sin))
    assert torch.equal(k_pages, expected_k_pages) and torch.equal(v_pages, expected_v_pages)


def _args():
    gen = torch.Generator().manual_seed(0)
    q, k, v = packed_qkv(3, 4, 2, 8, torch.float32, gen)
    return (torch.zeros(3, 2, 2, 8), torch.zeros(3, 2, 2, 8), q, k, v, rotary_table(8, 16), torch.tensor([5, 0, 15]),
            torch.tensor([2, -1, 5]))


def test_op_schema_and_fake_kernel_pass_opcheck():
    torch.library.opcheck(torch.ops.llmfx.rope_write_kv.default, _args())


def test_op_traces_with_fullgraph_compile():
    def step(k_pages, v_pages, q, k, v, rope, positions, slots):
        q = rope_write_kv(k_pages, v_pages, q, k, v, rope, positions, slots)
        return q * 2.0

    eager_args, compiled_args = _args(), [a.clone() for a in _args()]
    eager = step(*eager_args)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(*compiled_args)
    assert torch.equal(compiled, eager)
    assert torch.equal(compiled_args[0], eager_args[0]) and torch.equal(compiled_args[1], eager_args[1])
    assert compiled_args[0].abs().sum() > 0  # the write happened through the traced graph
