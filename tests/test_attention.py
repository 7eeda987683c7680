"""The paged attention reference equals dense causal attention, and the ops trace under compile."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from llmfx.ops import paged_attention, write_kv


def dense_attention(q, k, v, window: int) -> torch.Tensor:
    """Causal attention over one contiguous sequence whose last q.shape[0] tokens are the queries."""
    n_q, n_kv = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    q_pos = torch.arange(n_kv - n_q, n_kv)[:, None]
    k_pos = torch.arange(n_kv)[None, :]
    mask = (k_pos <= q_pos) & ((k_pos > q_pos - window) if window else True)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.double()).float()


@st.composite
def paged_batches(draw):
    page_size = draw(st.sampled_from([1, 2, 4, 16]))
    kv_heads = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([8, 16]))
    window = draw(st.sampled_from([0, 0, 3, 7]))
    seqs = draw(st.lists(st.tuples(st.integers(1, 40), st.integers(0, 40)), min_size=1, max_size=4))
    seqs = [(min(n_q, n_q + cached), cached) for n_q, cached in seqs]  # (queries, cached tokens)
    seed = draw(st.integers(0, 2**16))
    head_major = draw(st.booleans())  # pools stored as KVPool stores them, or token-major
    return page_size, kv_heads, group, head_dim, window, seqs, seed, head_major


@given(paged_batches())
def test_paged_reference_equals_dense_causal_attention(case):
    page_size, kv_heads, group, head_dim, window, seqs, seed, head_major = case
    gen = torch.Generator().manual_seed(seed)
    heads = kv_heads * group
    pages_needed = [-(-(n_q + cached) // page_size) for n_q, cached in seqs]
    num_pages = sum(pages_needed) + 1
    order = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()  # pages in shuffled order
    k_pages = torch.randn(num_pages, page_size, kv_heads, head_dim, generator=gen)
    v_pages = torch.randn(num_pages, page_size, kv_heads, head_dim, generator=gen)
    if head_major:
        k_pages, v_pages = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k_pages, v_pages))
    table = torch.zeros(len(seqs), max(pages_needed), dtype=torch.int32)
    qs, expected, starts, lens = [], [], [0], []
    for b, (n_q, cached) in enumerate(seqs):
        pages = [order.pop() for _ in range(pages_needed[b])]
        table[b, : len(pages)] = torch.tensor(pages)
        length = n_q + cached
        k = torch.randn(length, kv_heads, head_dim, generator=gen)
        v = torch.randn(length, kv_heads, head_dim, generator=gen)
        slots = torch.tensor([pages[p // page_size] * page_size + p % page_size for p in range(length)])
        write_kv(k_pages, v_pages, k, v, slots)
        q = torch.randn(n_q, heads, head_dim, generator=gen)
        qs.append(q)
        expected.append(dense_attention(q, k, v, window))
        starts.append(starts[-1] + n_q)
        lens.append(length)
    out = paged_attention(torch.cat(qs), k_pages, v_pages, table, torch.tensor(starts, dtype=torch.int32),
                          torch.tensor(lens, dtype=torch.int32), head_dim**-0.5, window)
    torch.testing.assert_close(out, torch.cat(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head_major", [False, True])
def test_write_kv_sends_padding_slots_to_the_null_page(head_major):
    k_pages = torch.zeros(3, 1, 2, 4).transpose(1, 2) if head_major else torch.zeros(3, 2, 1, 4)
    v_pages = torch.zeros_like(k_pages)
    k = torch.ones(3, 1, 4)
    write_kv(k_pages, v_pages, k, 2 * k, torch.tensor([5, -1, 2]))
    assert k_pages[2, 1].eq(1).all() and k_pages[1, 0].eq(1).all() and v_pages[1, 0].eq(2).all()
    assert k_pages[0].abs().sum() == 1 * 4  # the padding row landed on the null page's slot 0
    assert k_pages[1, 1].eq(0).all() and k_pages[2, 0].eq(0).all()


def test_ops_trace_with_fullgraph_compile():
    def step(q, k, v, k_pages, v_pages, slots, table, starts, lens):
        write_kv(k_pages, v_pages, k, v, slots)
        return paged_attention(q, k_pages, v_pages, table, starts, lens, 0.5, 0)

    args = (torch.randn(3, 2, 4), torch.randn(3, 1, 4), torch.randn(3, 1, 4), torch.zeros(3, 2, 1, 4),
            torch.zeros(3, 2, 1, 4), torch.tensor([2, 3, 4]), torch.tensor([[1, 2]], dtype=torch.int32),
            torch.tensor([0, 3], dtype=torch.int32), torch.tensor([3], dtype=torch.int32))
    eager = step(*[a.clone() for a in args])
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(*[a.clone() for a in args])
    torch.testing.assert_close(compiled, eager)
