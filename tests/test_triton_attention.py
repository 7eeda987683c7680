"""The Triton paged-attention kernels equal the reference op: on CPU through the Triton interpreter, on CUDA natively.

Without CUDA the module runs every kernel in TRITON_INTERPRET mode on CPU tensors (small sizes); with
CUDA the same fp32 properties run compiled, and the `gpu` tests add bf16 at long lengths, CUDA-graph
replay with new lengths in the same buffers, and torch.compile.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

# First: it turns the interpreter on (without CUDA) before anything imports triton.
from tests.triton_interpreter import (DEVICE, KERNELS_RUN_HERE, kernels, needs_cuda,  # isort: skip
                                      assert_compiled_without_spills, run_kernel_tests_in_fresh_interpreter,
                                      sm90_reports)

from llmfx.ops import triton_attention as ta
from llmfx.ops.attention import paged_attention, write_kv


def random_batch(seqs, page_size, kv_heads, group, head_dim, pad_rows, seed, dtype=torch.float32,
                 device=DEVICE, extra_cols=0):
    """Args of paged_attention for seqs [(n_q, cached)]; n_q == 0 is a padding sequence (length 0).

    Pages are handed out in shuffled order; every pool slot that holds no token is NaN, as are padding
    query rows, so a kernel that reads past a sequence's end or a padding row shows it. Odd seeds store
    the pools head-major, as KVPool does, even ones token-major: the kernels read either by strides.
    """
    gen = torch.Generator().manual_seed(seed)
    lengths = [n_q + cached if n_q else 0 for n_q, cached in seqs]
    pages_needed = [-(-n // page_size) for n in lengths]
    num_pages = sum(pages_needed) + 1
    order = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()
    k_pages = torch.full((num_pages, page_size, kv_heads, head_dim), float("nan"))
    if seed % 2:
        k_pages = k_pages.transpose(1, 2).contiguous().transpose(1, 2)
    v_pages = torch.full_like(k_pages, float("nan"))  # full_like keeps the strides
    table = torch.zeros(len(seqs), max(pages_needed + [1]) + extra_cols, dtype=torch.int32)
    starts = [0]
    for b, n in enumerate(lengths):
        pages = [order.pop() for _ in range(pages_needed[b])]
        table[b, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        slots = torch.tensor([pages[p // page_size] * page_size + p % page_size for p in range(n)], dtype=torch.long)
        k, v = torch.randn(2, n, kv_heads, head_dim, generator=gen)
        write_kv(k_pages, v_pages, k, v, slots)
        starts.append(starts[-1] + seqs[b][0])
    q = torch.full((starts[-1] + pad_rows, kv_heads * group, head_dim), float("nan"))
    q[: starts[-1]] = torch.randn(starts[-1], kv_heads * group, head_dim, generator=gen)
    to = dict(device=device)
    return (q.to(dtype=dtype, **to), k_pages.to(dtype=dtype, **to), v_pages.to(dtype=dtype, **to), table.to(**to),
            torch.tensor(starts, dtype=torch.int32, **to), torch.tensor(lengths, dtype=torch.int32, **to),
            head_dim**-0.5)


def reference(args, window):
    """The reference op, in float32 on CPU, over the same (possibly bf16-rounded) inputs."""
    cpu = [a.cpu().float() if a.is_floating_point() else a.cpu() for a in args[:6]]
    return paged_attention(*cpu, args[6], window)


def nan_out(q):
    """An output buffer full of NaN: any element a kernel forgets to write fails the comparison."""
    return torch.full_like(q, float("nan"))


@st.composite
def mixed_batches(draw):
    """Prefill chunks, prefix continuations, decode rows, padding sequences and padding rows."""
    page_size = draw(st.sampled_from([1, 2, 4, 16]))
    kv_heads = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from([1, 2, 3, 4]))
    head_dim = draw(st.sampled_from([16, 24, 64]))
    window = draw(st.sampled_from([0, 0, 3, 7, 40]))
    seqs = draw(st.lists(st.tuples(st.integers(0, 12), st.integers(0, 40)), min_size=1, max_size=4))
    pad_rows = draw(st.integers(0, 3))
    blocks = draw(st.sampled_from([(16, 16), (32, 32), (64, 16), (64, 64), (128, 64)]))  # (block_m, block_n)
    return page_size, kv_heads, group, head_dim, window, seqs, pad_rows, blocks, draw(st.integers(0, 2**16))


@st.composite
def decode_batches(draw):
    """One query per real sequence (or none: padding), long enough to span several splits; T <= B."""
    page_size = draw(st.sampled_from([1, 2, 4, 16]))
    kv_heads = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from([1, 3, 4, 8]))
    head_dim = draw(st.sampled_from([16, 64]))
    window = draw(st.sampled_from([0, 0, 5, 40]))
    lengths = draw(st.lists(st.integers(0, 200), min_size=1, max_size=4))
    seqs = [(1, n - 1) if n else (0, 0) for n in lengths]
    pad_rows = draw(st.integers(0, lengths.count(0)))
    split = draw(st.sampled_from([(16, 2), (16, 3), (32, 32), (256, 32)]))  # (min_split, max_splits)
    return page_size, kv_heads, group, head_dim, window, seqs, pad_rows, split, draw(st.integers(0, 2**16))


@kernels
@settings(max_examples=25)
@given(mixed_batches())
def test_varlen_kernel_matches_reference(case):
    page_size, kv_heads, group, head_dim, window, seqs, pad_rows, (block_m, block_n), seed = case
    args = random_batch(seqs, page_size, kv_heads, group, head_dim, pad_rows, seed)
    out = ta.paged_attention_varlen(*args, window, block_m=block_m, block_n=block_n, out=nan_out(args[0]))
    torch.testing.assert_close(out.cpu(), reference(args, window), rtol=1e-4, atol=1e-4)


@kernels
@pytest.mark.parametrize("window", [0, 1, 20, 37, 64, 200])
def test_varlen_kernel_unmasked_blocks_keep_the_window_and_the_diagonal(window):
    # Long chunks after a cached prefix: a query tile's keys are window-edge blocks, blocks every row sees
    # (loaded without masks) and diagonal blocks, in every proportion the windows give.
    args = random_batch([(70, 90), (33, 0), (5, 130)], 4, 2, 2, 16, 2, window)
    out = ta.paged_attention_varlen(*args, window, block_m=16, block_n=16, out=nan_out(args[0]))
    torch.testing.assert_close(out.cpu(), reference(args, window), rtol=1e-4, atol=1e-4)


@kernels
@settings(max_examples=25)
@given(decode_batches())
def test_decode_kernel_matches_reference(case):
    page_size, kv_heads, group, head_dim, window, seqs, pad_rows, (min_split, max_splits), seed = case
    args = random_batch(seqs, page_size, kv_heads, group, head_dim, pad_rows, seed, extra_cols=seed % 3)
    out = ta.paged_attention_decode(*args, window, min_split=min_split, max_splits=max_splits, block_n=16,
                                    out=nan_out(args[0]))
    torch.testing.assert_close(out.cpu(), reference(args, window), rtol=1e-4, atol=1e-4)


@kernels
@pytest.mark.parametrize("length", [16, 17, 100, 128, 129, 250])
def test_decode_splits_long_sequences_whatever_the_remainder(length):
    # min_split 16, at most 4 splits: 250 tokens -> 4 splits of 64, the last one partial.
    args = random_batch([(1, length - 1), (1, 5)], 4, 2, 4, 16, 0, length)
    out = ta.paged_attention_decode(*args, 0, min_split=16, max_splits=4, block_n=16, out=nan_out(args[0]))
    torch.testing.assert_close(out.cpu(), reference(args, 0), rtol=1e-4, atol=1e-4)


@kernels
def test_decode_kernel_is_exact_for_several_queries_of_one_sequence():
    # T == B, but one sequence is a 2-token chunk next to a padding sequence: decode is still exact.
    args = random_batch([(2, 30), (0, 0)], 4, 1, 2, 16, 0, 1)
    assert args[0].shape[0] == 2 and args[5].shape[0] == 2
    out = ta.paged_attention_decode(*args, 7, min_split=16, max_splits=4, block_n=16, out=nan_out(args[0]))
    torch.testing.assert_close(out.cpu(), reference(args, 7), rtol=1e-4, atol=1e-4)


@kernels
def test_decode_result_of_a_sequence_does_not_depend_on_its_batch():
    # The split size is a function of the sequence alone: batch size and table width change nothing.
    batched = random_batch([(1, 150), (1, 40), (1, 90)], 4, 2, 2, 16, 0, 3, extra_cols=5)
    q, k_pages, v_pages, table, starts, lens, scale = batched
    alone = (q[:1], k_pages, v_pages, table[:1, : 151 // 4 + 1], starts[:2], lens[:1], scale)
    split = dict(min_split=16, max_splits=4, block_n=16)
    out_batched = ta.paged_attention_decode(*batched, 0, **split)
    out_alone = ta.paged_attention_decode(*alone, 0, **split)
    assert torch.equal(out_alone[0], out_batched[0])


@kernels
@pytest.mark.parametrize("seqs, pad_rows", [([(1, 20), (1, 3), (0, 0)], 1), ([(5, 20), (1, 3)], 2)])
def test_dispatch_picks_a_kernel_by_shape_and_is_exact(seqs, pad_rows):
    args = random_batch(seqs, 2, 2, 2, 16, pad_rows, 0)
    out = ta.triton_paged_attention(*args, 0)
    torch.testing.assert_close(out.cpu(), reference(args, 0), rtol=1e-4, atol=1e-4)


@kernels
def test_dispatch_gives_a_sequence_the_same_bits_alone_and_in_a_batch_of_200():
    # Batch sizes on both sides of every launch-setting bound: the split plan must not follow them.
    long_seq = (1, 299)
    crowd = random_batch([long_seq] + [(1, n % 37) for n in range(199)], 16, 1, 2, 16, 0, 5)
    q, k_pages, v_pages, table, starts, lens, scale = crowd
    alone = (q[:1], k_pages, v_pages, table[:1], starts[:2], lens[:1], scale)
    assert torch.equal(ta.triton_paged_attention(*alone, 0)[0], ta.triton_paged_attention(*crowd, 0)[0])


@given(st.integers(1, 4096), st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       st.sampled_from([16, 64, 128, 256]))
def test_decode_launch_settings_differ_by_batch_size_only_where_the_bits_cannot(num_seqs, dtype, head_dim):
    # Pipeline depth and the L2 prefetch change when loads are issued, never what is summed in which order.
    decode = ta._tuning(dtype, head_dim, num_seqs)[1]
    other = ta._tuning(dtype, head_dim, 1)[1]
    timing_only = ("num_stages", "prefetch_kv")
    assert {k: v for k, v in decode.items() if k not in timing_only} == {
        k: v for k, v in other.items() if k not in timing_only}
    assert ta.DECODE_MIN_SPLIT % decode["block_n"] == 0


@pytest.mark.skipif(KERNELS_RUN_HERE, reason="once per session, outside the interpreter; a GPU compiles for itself")
def test_shipped_launches_compile_for_sm90_without_spills():
    reports = sm90_reports("--attention")
    assert [r["kernel"] for r in reports] == ["varlen", "decode", "decode", "decode_reduce"] * 2, reports
    assert_compiled_without_spills(reports)
    for r in reports:
        assert "LDG.128" in r["global_loads"] or "LDGSTS.128" in r["global_loads"], r  # 16-byte K/V rows
    for r in reports:
        if r["kernel"] == "decode":  # bandwidth-bound: K/V tiles stream through a cp.async pipeline
            assert r["pipelined"] and "LDGSTS.128" in r["global_loads"], r


@pytest.mark.skipif(KERNELS_RUN_HERE, reason="the kernel tests run in this process")
def test_kernels_in_a_fresh_interpreter_process():
    run_kernel_tests_in_fresh_interpreter(__file__)


# ---- CUDA only -------------------------------------------------------------------------------------------


def assert_close_bf16(out, expected):
    scale = max(1.0, expected.abs().amax().item()) if expected.numel() else 1.0
    torch.testing.assert_close(out.float().cpu(), expected, rtol=0, atol=2e-2 * scale)


@st.composite
def long_batches(draw):
    """bf16/fp16 (and fp32) batches up to 8k tokens of context: decode batches (T <= B) or mixed ones."""
    page_size = draw(st.sampled_from([16, 32]))
    kv_heads = draw(st.sampled_from([1, 4]))
    group = draw(st.sampled_from([1, 4, 8]))
    head_dim = draw(st.sampled_from([64, 128]))
    window = draw(st.sampled_from([0, 0, 1024]))
    decode = draw(st.booleans())
    n_q = st.just(1) if decode else st.integers(0, 300)
    seqs = draw(st.lists(st.tuples(n_q, st.integers(0, 8000)), min_size=1, max_size=6))
    pad_seqs = draw(st.integers(0, 2))
    pad_rows = pad_seqs if decode else draw(st.integers(0, 3))
    dtype = draw(st.sampled_from([torch.bfloat16, torch.bfloat16, torch.float16, torch.float32]))
    return page_size, kv_heads, group, head_dim, window, seqs + [(0, 0)] * pad_seqs, pad_rows, dtype, draw(
        st.integers(0, 2**16))


@settings(max_examples=10)
@given(long_batches())
@pytest.mark.gpu
@needs_cuda
def test_cuda_op_matches_reference_at_long_lengths(case):
    page_size, kv_heads, group, head_dim, window, seqs, pad_rows, dtype, seed = case
    args = random_batch(seqs, page_size, kv_heads, group, head_dim, pad_rows, seed, dtype, "cuda")
    out = torch.ops.llmfx.paged_attention(*args, window)
    assert out.dtype == dtype
    assert_close_bf16(out, reference(args, window))


@pytest.mark.gpu
@needs_cuda
def test_cuda_decode_gives_a_sequence_the_same_bits_at_batch_1_and_256():
    # bf16 at served lengths, across the num_stages and K/V prefetch bounds: batch-invariant numerics on the GPU.
    gen = torch.Generator().manual_seed(11)
    others = [(1, int(n)) for n in torch.randint(0, 2000, (255,), generator=gen)]
    crowd = random_batch([(1, 1500)] + others, 16, 4, 8, 64, 0, 11, torch.bfloat16, "cuda")
    q, k_pages, v_pages, table, starts, lens, scale = crowd
    alone = (q[:1], k_pages, v_pages, table[:1], starts[:2], lens[:1], scale)
    out_alone = torch.ops.llmfx.paged_attention(*alone, 0)
    assert torch.equal(out_alone[0], torch.ops.llmfx.paged_attention(*crowd, 0)[0])
    assert_close_bf16(out_alone, reference(alone, 0))


@pytest.mark.gpu
@needs_cuda
def test_kernels_launch_with_pdl_where_the_gpu_has_it():
    # ops/triton_pdl.py: on compute capability 9.0+ every llmfx kernel is a programmatic dependent launch.
    for seqs in ([(1, 300), (1, 20)], [(40, 300), (3, 0)]):  # decode and varlen
        args = random_batch(seqs, 16, 4, 8, 64, 0, 3, torch.bfloat16, "cuda")
        assert_close_bf16(torch.ops.llmfx.paged_attention(*args, 0), reference(args, 0))
    expected = torch.cuda.get_device_capability()[0] >= 9
    kernels = [k for fn in (ta._varlen_kernel, ta._decode_kernel, ta._decode_reduce_kernel)
               for cache in fn.device_caches.values() for k in cache[0].values()]
    assert len(kernels) >= 3 and all(k.metadata.launch_pdl == expected for k in kernels)


@pytest.mark.parametrize("decode", [True, False])
@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_replays_new_lengths_in_the_same_buffers(decode):
    # Three batches of one shape (T, B, max_pages): captured once, replayed with the others' values.
    shapes = [[(1, 40), (1, 700), (0, 0)], [(1, 1500), (1, 3), (1, 64)], [(0, 0), (0, 0), (1, 2047)]] if decode \
        else [[(40, 0), (20, 700), (4, 0)], [(1, 1500), (60, 3), (3, 64)], [(0, 0), (0, 0), (64, 1900)]]
    batches = [random_batch(s, 16, 4, 8, 128, 0, i, torch.bfloat16, "cuda") for i, s in enumerate(shapes)]
    rows, max_pages = max(b[0].shape[0] for b in batches), 2048 // 16
    pages = max(b[1].shape[0] for b in batches)
    static = [torch.zeros(rows, 32, 128, dtype=torch.bfloat16, device="cuda"),
              torch.zeros(pages, 16, 4, 128, dtype=torch.bfloat16, device="cuda"),
              torch.zeros(pages, 16, 4, 128, dtype=torch.bfloat16, device="cuda"),
              torch.zeros(3, max_pages, dtype=torch.int32, device="cuda"),
              torch.zeros(4, dtype=torch.int32, device="cuda"), torch.zeros(3, dtype=torch.int32, device="cuda")]
    assert (rows <= 3) == decode

    def load(batch):
        for buf, src in zip(static, batch[:6]):
            buf.zero_()
            buf[tuple(slice(0, n) for n in src.shape)] = src

    load(batches[0])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile the kernels before capture
        torch.ops.llmfx.paged_attention(*static, 0.088, 0)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.llmfx.paged_attention(*static, 0.088, 0)
    for batch in batches[1:] + batches[:1]:
        load(batch)
        graph.replay()
        assert_close_bf16(out, reference([*static, 0.088], 0))


@pytest.mark.gpu
@needs_cuda
def test_op_compiles_fullgraph_into_cuda_graphs_without_skips():
    from torch._dynamo.utils import counters

    def step(q, k_pages, v_pages, table, starts, lens):
        return torch.ops.llmfx.paged_attention(q * 1.0, k_pages, v_pages, table, starts, lens, 0.125, 0) + 0.0

    compiled = torch.compile(step, fullgraph=True, mode="reduce-overhead", dynamic=False)
    counters.clear()
    for seed, seqs in enumerate([[(1, 90), (1, 300)], [(1, 400), (1, 7)], [(1, 5), (1, 2)]]):
        args = random_batch(seqs, 16, 2, 4, 64, 0, seed, torch.bfloat16, "cuda")
        args = list(args[:6])
        args[3] = torch.nn.functional.pad(args[3], (0, 40 - args[3].shape[1]))  # one table width for all
        args[1] = torch.nn.functional.pad(args[1], (0, 0, 0, 0, 0, 0, 0, 64 - args[1].shape[0]))
        args[2] = torch.nn.functional.pad(args[2], (0, 0, 0, 0, 0, 0, 0, 64 - args[2].shape[0]))
        for _ in range(3):  # warm-up, record, replay
            out = compiled(*args).clone()
        assert_close_bf16(out, reference([*args, 0.125], 0))
    assert counters["inductor"]["cudagraph_skips"] == 0
