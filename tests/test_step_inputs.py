"""Step inputs: the cached StepStager writes exactly what a from-scratch fill writes, step after step."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmfx.batch import BatchColumns, SequenceChunk
from llmfx.sampler import SamplingTensors, request_seed, sampling_row
from llmfx.sampling_params import SamplingParams
from llmfx.scheduler import PLACEHOLDER
from llmfx.step_inputs import SEQ_ROWS, StepLayout, StepStager, fill_batch, fill_sampling, host_buffer
from tests.op_calls import OpCalls

PAGE, MAX_PAGES, ROWS = 4, 6, 5
PARAMS = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=11, logprobs=2),
          SamplingParams(temperature=1.3, min_p=0.1, repetition_penalty=1.2, presence_penalty=0.5),
          SamplingParams(temperature=0.9, seed=4), SamplingParams(temperature=0.0, top_k=3, top_p=0.5)]


def _reference(layout, chunks, params, ids, gather, engine_seed):
    """Every field written from scratch, sampling rows from SamplingTensors.build's own packing."""
    views = layout.views(host_buffer(layout.size, pinned=False))
    fill_batch(views, BatchColumns.of(chunks), PAGE)
    built = SamplingTensors.build([params[i] for i in ids], [request_seed(params[i].seed, engine_seed, i) for i in ids],
                                  [c.start_pos + len(c.token_ids) for c in chunks], "cpu", pad_to=layout.num_seqs)
    fill_sampling(views, [])
    for row, (name, _) in enumerate(SEQ_ROWS):
        if name in SamplingTensors.__slots__:
            views.seqs[row] = getattr(built, name).double()
    token_row = 0
    for rid, chunk in zip(ids, chunks):
        if rid in gather:
            views.tokens[3, token_row] = gather[rid]
        token_row += len(chunk.token_ids)
    return views


# A step: for each live request, how its pages change (keep, append one, or replace all: a
# preemption or a fork reusing freed page ids) and how many tokens it feeds.
step = st.lists(st.tuples(st.integers(0, 7), st.sampled_from(["keep", "append", "replace"]), st.integers(1, 3),
                          st.booleans()), min_size=1, max_size=ROWS, unique_by=lambda t: t[0])


@settings(max_examples=60, deadline=None)
@given(steps=st.lists(step, min_size=1, max_size=8), pad=st.integers(0, 2), data=st.data())
def test_stager_matches_a_fresh_fill_every_step(steps, pad, data):
    stager = StepStager(page_size=PAGE, max_pages=MAX_PAGES, max_rows=ROWS, engine_seed=3, placeholder=PLACEHOLDER)
    pages: dict[int, tuple[int, ...]] = {}
    lengths: dict[int, int] = {}
    params = {rid: PARAMS[rid % len(PARAMS)] for rid in range(8)}
    previous: dict[int, int] = {}  # request id -> its row in the previous step
    for batch in steps:
        chunks, ids, gather = [], [], {}
        for rid, change, n, placeholder in batch:
            start = lengths.get(rid, 0)
            if start + n > MAX_PAGES * PAGE:
                start = 0
            need = -(-(start + n) // PAGE)
            old = pages.get(rid, ())
            if change == "replace" or len(old) < need or start == 0:
                fresh = data.draw(st.lists(st.integers(1, 30), min_size=need, max_size=need), label=f"pages {rid}")
                pages[rid] = tuple(fresh) if change == "replace" or not old else old[:need] + tuple(fresh[len(old[:need]):])
            if change == "append" and len(pages[rid]) < MAX_PAGES:
                pages[rid] = pages[rid] + (data.draw(st.integers(1, 30), label="appended"),)
            held = placeholder and n == 1 and rid in previous  # the previous step's token, still on the device
            chunks.append(SequenceChunk((PLACEHOLDER,) if held else tuple(range(100 + rid, 100 + rid + n)), start,
                                        pages[rid]))
            ids.append(rid)
            if held:
                gather[rid] = previous[rid]
            lengths[rid] = start + n
        previous = {rid: row for row, rid in enumerate(ids)}
        layout = StepLayout(num_tokens=sum(len(c.token_ids) for c in chunks) + pad, num_seqs=len(chunks) + pad,
                            max_pages=MAX_PAGES)
        staged = layout.views(host_buffer(layout.size + 3, pinned=False))
        staged.tokens.fill_(7.0)  # stale values from an earlier step must all be overwritten
        staged.seqs.fill_(7.0)
        staged.page_table.fill_(7.0)
        staged.query_start_loc.fill_(7.0)
        facts = stager.fill(staged, BatchColumns.of(chunks, ids), params.__getitem__)
        expected = _reference(layout, chunks, params, ids, gather, engine_seed=3)
        for name in ("tokens", "seqs", "query_start_loc", "page_table"):
            torch.testing.assert_close(getattr(staged, name), getattr(expected, name), rtol=0, atol=0, msg=name)
        assert facts.top_rows == tuple(row for row, rid in enumerate(ids) if params[rid].logprobs is not None)
        assert facts.penalized == any(params[rid].repetition_penalty != 1.0 or params[rid].presence_penalty
                                      for rid in ids)
        assert facts.filtering == any(params[rid].temperature > 0 and (params[rid].top_k > 0 or params[rid].min_p > 0)
                                      for rid in ids)
        assert facts.sampled == any(params[rid].temperature > 0 for rid in ids)


def test_unpack_gives_the_model_and_sampler_their_dtypes():
    layout = StepLayout(num_tokens=3, num_seqs=2, max_pages=2)
    views = layout.views(host_buffer(layout.size, pinned=False))
    fill_batch(views, BatchColumns.of([SequenceChunk((5, 6), 0, (3,)), SequenceChunk((9,), 4, (1, 2))]), PAGE)
    fill_sampling(views, [])
    batch, sampling, gather = views.unpack()
    assert batch.token_ids.tolist() == [5, 6, 9] and batch.slot_mapping.tolist() == [12, 13, 8]
    assert batch.page_table.tolist() == [[3, 0], [1, 2]] and batch.page_table.dtype == torch.int32
    assert batch.seq_lens.tolist() == [2, 5] and batch.logits_indices.tolist() == [1, 2]
    assert sampling.top_p.dtype == torch.float32 and sampling.seed.dtype == torch.int64
    assert gather.tolist() == [-1, -1, -1]


def test_unpack_converts_each_dtype_block_with_one_op_and_keeps_every_field():
    layout = StepLayout(num_tokens=4, num_seqs=3, max_pages=2)
    views = layout.views(host_buffer(layout.size + 5, pinned=False))
    fill_batch(views, BatchColumns.of([SequenceChunk((5, 6), 0, (3,)), SequenceChunk((9,), 4, (1, 2))]), PAGE)
    p = SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, repetition_penalty=1.2,
                       presence_penalty=0.5, frequency_penalty=-0.25, seed=11)
    fill_sampling(views, [sampling_row(p, 12345, 2), sampling_row(SamplingParams(), 7, 5)])
    with OpCalls(torch.ops.aten._to_copy.default) as conversions:
        batch, sampling, gather = views.unpack()
    assert conversions.count == 3  # int32, float32, int64
    assert batch.query_start_loc.tolist() == [0, 2, 3, 3] and batch.query_start_loc.dtype == torch.int32
    assert batch.positions.tolist() == [0, 1, 4, 0] and batch.positions.dtype == torch.int64
    assert batch.seq_lens.tolist() == [2, 5, 0] and batch.logits_indices.tolist() == [1, 2, 0]
    expected = SamplingTensors.build([p, SamplingParams()], [12345, 7], [2, 5], "cpu", pad_to=3)
    for name in SamplingTensors.__slots__:
        got, want = getattr(sampling, name), getattr(expected, name)
        assert got.dtype == want.dtype and torch.equal(got, want), name
    assert gather.tolist() == [-1, -1, -1, -1]


@given(st.lists(st.tuples(st.integers(1, 9), st.integers(0, 50)), max_size=12))
def test_token_counts_of_columns_are_the_chunks_counts(chunks):
    columns = BatchColumns.of([SequenceChunk((7,) * n, start, ()) for n, start in chunks])
    assert columns.token_counts() == (sum(n for n, _ in chunks), sum(n == 1 for n, _ in chunks),
                                      sum(start + n for n, start in chunks))
