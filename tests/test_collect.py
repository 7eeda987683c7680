"""ModelEngine.collect: the tokens, SampledTokens and candidates it reads from a step's packed output."""

from __future__ import annotations

import torch

from llmfx.model_engine import OUT_COLUMNS, InFlight, ModelEngine, SampledToken
from llmfx.sampler import TOP_LOGPROBS
from llmfx.scheduler import ScheduledBatch, ScheduledSeq


def _out(rows: int) -> torch.Tensor:
    out = torch.zeros(rows, OUT_COLUMNS, dtype=torch.float64)
    for row in range(rows):
        out[row, :3] = torch.tensor([100 + row, -0.25 * row, 1 + row % 3])
        out[row, 3: 3 + TOP_LOGPROBS] = torch.arange(TOP_LOGPROBS) + 1000 * row
        out[row, 3 + TOP_LOGPROBS:] = -torch.arange(TOP_LOGPROBS) / 4 - row
    return out


def _expected(out: torch.Tensor, seqs, top_rows) -> dict[int, SampledToken]:
    """Row by row, every field read back as the slow path would."""
    ids_at, lps_at = 3, 3 + TOP_LOGPROBS
    return {s.request_id: SampledToken(
        token=int(out[row, 0]), logprob=float(out[row, 1]), rank=int(out[row, 2]),
        top_ids=tuple(int(v) for v in out[row, ids_at:lps_at]) if row in top_rows else (),
        top_logprobs=tuple(float(v) for v in out[row, lps_at:]) if row in top_rows else ())
        for row, s in enumerate(seqs) if s.sample}


def _collect(seqs, top_rows, out):
    rows = [row for row, s in enumerate(seqs) if s.sample]
    every = len(rows) == len(seqs)
    return ModelEngine.collect(None, InFlight(batch=ScheduledBatch(seqs=tuple(seqs)), host=out, ready=None,
                                              sampling_ids=[seqs[r].request_id for r in rows],
                                              sampling_rows=None if every else rows, top_rows=top_rows))


def test_decode_rows_read_the_token_and_top_rows_their_top_20():
    seqs = [ScheduledSeq(request_id=10 + i, token_ids=(1,), start_pos=5, pages=(1,), sample=True) for i in range(6)]
    out = _out(6)
    top_rows = (1, 4)  # a logprobs request and a beam
    got = _collect(seqs, top_rows, out)
    assert got.sampled == _expected(out, seqs, top_rows)
    assert got.tokens == {s.request_id: t.token for s, t in zip(seqs, got.sampled.values())}
    assert got.candidates == {11: (got.sampled[11].top_ids, got.sampled[11].top_logprobs),
                              14: (got.sampled[14].top_ids, got.sampled[14].top_logprobs)}
    assert len(got.sampled[14].top_ids) == TOP_LOGPROBS and got.sampled[0 + 10].top_ids == ()


def test_rows_that_sample_nothing_are_left_out_even_when_they_read_their_top_20():
    seqs = [ScheduledSeq(request_id=7, token_ids=(1, 2, 3), start_pos=0, pages=(1,), sample=False),
            ScheduledSeq(request_id=3, token_ids=(4,), start_pos=9, pages=(2, 3), sample=True),
            ScheduledSeq(request_id=5, token_ids=(5, 6), start_pos=0, pages=(4,), sample=True)]
    out = _out(3)
    got = _collect(seqs, (0, 2), out)
    assert got.sampled == _expected(out, seqs, (0, 2))
    assert list(got.tokens) == [3, 5] and list(got.candidates) == [5]
    assert got.tokens[3] == 101 and got.sampled[5].top_ids[0] == 2000
