"""Sampler specification for filters, penalties and logprobs: each checked against a direct reference."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import fields

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chi2

from llmfx.sampler import (
    TOP_LOGPROBS,
    PenaltyState,
    SampleOutput,
    SamplingTensors,
    apply_penalties,
    count_tokens,
    filter_threshold,
    sample,
    score_tokens,
    top_ranked,
)
from llmfx.persistent import TokenTape
from llmfx.sampling_params import SamplingParams

_P_MIN = 1e-6  # deterministic given the hash, so a tiny p threshold only guards against a wrong distribution
_SLACK = 1e-5  # float32 vs float64 rounding at a top-p / min-p boundary


def _build(rows: list[SamplingParams], positions: list[int] | None = None, seeds: list[int] | None = None):
    n = len(rows)
    seeds = seeds if seeds is not None else [(7919 * i + 13) % 2**32 for i in range(n)]
    return SamplingTensors.build(rows, seeds, positions if positions is not None else [5] * n, "cpu")


# --- references, written from the definitions -------------------------------------------------------


def _reference_penalized(logits: np.ndarray, prompts, outputs, params) -> np.ndarray:
    """vLLM's penalties element by element in float32: repetition, then frequency, then presence."""
    out = logits.astype(np.float32).copy()
    for b, p in enumerate(params):
        rep, freq, pres = np.float32(p.repetition_penalty), np.float32(p.frequency_penalty), np.float32(p.presence_penalty)
        for v in range(out.shape[1]):
            count = outputs[b].count(v)
            x = out[b, v]
            if v in prompts[b] or count > 0:
                x = x / rep if x > 0 else x * rep
            x = x - freq * np.float32(count)
            x = x - pres * np.float32(count > 0)
            out[b, v] = x
    return out


def _reference_allowed(scaled: list[float], p: SamplingParams, slack: float = _SLACK) -> set[int]:
    """Tokens top-k, then min-p, then top-p (renormalized) may keep; slack widens only, never narrows."""
    order = sorted(range(len(scaled)), key=lambda v: -scaled[v])
    top = scaled[order[0]]
    probs = [math.exp(x - top) for x in scaled]  # unnormalized; min-p and the renormalized top-p need no norm
    k = p.top_k if 0 < p.top_k < len(scaled) else len(scaled)
    kth = scaled[order[k - 1]]
    candidates = [v for v in order if scaled[v] >= kth and probs[v] >= p.min_p * (1 - slack)]
    total = sum(probs[v] for v in candidates)
    kept, mass = [], 0.0
    for v in candidates:
        if p.top_p < 1 and mass / total >= p.top_p + slack:
            break
        kept.append(v)
        mass += probs[v]
    return {v for v in range(len(scaled)) if scaled[v] >= scaled[kept[-1]]}


def _scaled(penalized: np.ndarray, params) -> np.ndarray:
    temps = np.array([p.temperature if p.temperature > 0 else 1.0 for p in params], dtype=np.float32)
    return penalized / temps[:, None]


# --- strategies -------------------------------------------------------------------------------------


@st.composite
def sampling_rows(draw, rows: int, vocab: int):
    return [
        SamplingParams(
            temperature=draw(st.sampled_from([0.0, 0.5, 1.0, 1.5])),
            top_k=draw(st.sampled_from([-1, 0, 1, 2, 3, vocab, vocab + 5])),
            top_p=draw(st.one_of(st.just(1.0), st.floats(0.01, 1.0))),
            min_p=draw(st.one_of(st.just(0.0), st.floats(0.0, 1.0))),
            repetition_penalty=draw(st.sampled_from([1.0, 0.8, 1.3, 2.0])),
            presence_penalty=draw(st.sampled_from([0.0, -0.5, 1.0, 2.0])),
            frequency_penalty=draw(st.sampled_from([0.0, -1.0, 0.5, 2.0])),
        )
        for _ in range(rows)
    ]


@st.composite
def batches(draw, max_rows: int = 6):
    """Logits (with ties, zeros and negatives), per-row params and token histories for penalties."""
    rows = draw(st.integers(1, max_rows))
    vocab = draw(st.integers(1, 40))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    logits = torch.randn(rows, vocab, generator=gen) * draw(st.sampled_from([0.3, 1.0, 4.0]))
    if draw(st.booleans()):  # integer logits: many exact ties
        logits = logits.round()
    params = draw(sampling_rows(rows, vocab))
    history = st.lists(st.integers(0, vocab - 1), max_size=12)
    prompts = [draw(history) for _ in range(rows)]
    outputs = [draw(history) for _ in range(rows)]
    return logits, params, prompts, outputs


def _run(logits, params, prompts, outputs, positions=None, seeds=None) -> SampleOutput:
    penalties = PenaltyState.build(prompts, outputs, logits.shape[1], "cpu")
    return sample(logits, _build(params, positions, seeds), penalties)


# --- filters ----------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(batches())
def test_filters_only_emit_allowed_tokens(batch):
    logits, params, prompts, outputs = batch
    draws = 24  # each row at many positions, so a wrong filter shows
    rows = logits.shape[0]
    params_rep = [p for p in params for _ in range(draws)]
    out = _run(logits.repeat_interleave(draws, 0), params_rep, [q for q in prompts for _ in range(draws)],
               [o for o in outputs for _ in range(draws)], positions=list(range(draws)) * rows,
               seeds=[1 + b for b in range(rows) for _ in range(draws)])
    scaled = _scaled(_reference_penalized(logits.numpy(), prompts, outputs, params), params)
    for b, p in enumerate(params):
        allowed = _reference_allowed(scaled[b].astype(np.float64).tolist(), p)
        assert set(out.tokens[b * draws:(b + 1) * draws].tolist()) <= allowed


@pytest.mark.parametrize(
    ("probs", "params", "kept"),
    [
        ([0.1, 0.4, 0.2, 0.3], dict(top_k=2), {1, 3}),
        ([0.4, 0.2, 0.2, 0.2], dict(top_k=2), {0, 1, 2, 3}),  # ties with the k-th value are kept
        ([0.5, 0.25, 0.125, 0.125], dict(top_p=0.4), {0}),
        ([0.5, 0.25, 0.125, 0.125], dict(top_p=0.7), {0, 1}),
        ([0.5, 0.25, 0.125, 0.125], dict(top_p=0.8), {0, 1, 2, 3}),  # 0.875 suffices, but 3 ties with 2
        ([0.5, 0.25, 0.125, 0.125], dict(min_p=0.3), {0, 1}),
        ([0.4, 0.3, 0.2, 0.1], dict(top_k=3, top_p=0.75), {0, 1}),  # top-p over the renormalized top-3
        ([0.4, 0.3, 0.2, 0.1], dict(top_p=0.75), {0, 1, 2}),
        ([0.4, 0.3, 0.2, 0.1], dict(min_p=0.4, top_p=0.75), {0, 1}),  # min-p before top-p, as vLLM
        ([0.4, 0.3, 0.2, 0.1], dict(top_k=-1, top_p=1.0, min_p=0.0), {0, 1, 2, 3}),
    ],
)
def test_filter_keeps_exactly_the_worked_set(probs, params, kept):
    scaled = torch.tensor([probs]).log()  # [1, 4]
    sorted_scaled, _ = torch.sort(scaled, descending=True, stable=True)
    tensors = _build([SamplingParams(**params)])
    got = (scaled >= filter_threshold(sorted_scaled, tensors))[0].nonzero().flatten().tolist()
    assert set(got) == kept
    assert _reference_allowed(scaled[0].double().tolist(), SamplingParams(**params), slack=0.0) == kept


def test_top_p_one_keeps_a_negligible_tail():
    scaled = torch.tensor([[0.0] + [-30.0] * 3 + [-200.0]])  # the tail is below float32 resolution of 1
    sorted_scaled, _ = torch.sort(scaled, descending=True, stable=True)
    assert bool((scaled >= filter_threshold(sorted_scaled, _build([SamplingParams(top_p=1.0)]))).all())


_LOGITS8 = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0, 0.25, -2.0])


@pytest.mark.parametrize("params", [dict(top_p=0.8), dict(top_k=3), dict(min_p=0.2), dict(top_k=5, top_p=0.9)])
def test_filtered_frequencies_match_the_renormalized_truncated_softmax(params):
    n = 20_000
    p = SamplingParams(temperature=1.0, **params)
    tokens = sample(_LOGITS8.expand(n, -1), _build([p] * n, list(range(n)), [99] * n)).tokens
    allowed = _reference_allowed(_LOGITS8.double().tolist(), p, slack=0.0)
    probs = torch.softmax(_LOGITS8.double(), dim=-1)
    mask = torch.zeros(8, dtype=torch.bool)
    mask[list(allowed)] = True
    truncated = torch.where(mask, probs, 0.0) / probs[mask].sum()
    counts = torch.bincount(tokens, minlength=8).double()
    assert counts[~mask].sum() == 0
    expected = truncated[mask] * n
    stat = float(((counts[mask] - expected) ** 2 / expected).sum())
    assert len(allowed) > 1 and chi2.sf(stat, df=len(allowed) - 1) > _P_MIN


@settings(max_examples=80, deadline=None)
@given(batches(), st.booleans())
def test_skipping_the_filters_changes_nothing_when_no_row_filters(batch, masked):
    # The engine passes filtering=False when no row's SamplingParams.filters; greedy rows keep their
    # filter settings here, since filters are documented to have no effect on them.
    logits, params, prompts, outputs = batch
    params = [p if not p.filters else dataclasses.replace(p, top_k=0, top_p=1.0, min_p=0.0) for p in params]
    if masked:  # -inf logits (masked tokens) tie with each other and must rank last, lower id first
        logits[:, 1::3] = float("-inf")
    penalties = PenaltyState.build(prompts, outputs, logits.shape[1], "cpu")
    tensors = _build(params, list(range(len(params))))
    full = sample(logits, tensors, penalties)
    fast = sample(logits, tensors, penalties, filtering=False)
    for f in fields(SampleOutput):
        assert torch.equal(getattr(fast, f.name), getattr(full, f.name)), f.name


@settings(max_examples=60, deadline=None)
@given(batches(), st.booleans())
def test_skipping_the_noise_changes_nothing_when_every_row_is_greedy(batch, filtering):
    logits, params, prompts, outputs = batch
    params = [dataclasses.replace(p, temperature=0.0) for p in params]  # filters stay: greedy rows ignore them
    penalties = PenaltyState.build(prompts, outputs, logits.shape[1], "cpu")
    tensors = _build(params, list(range(len(params))))
    full = sample(logits, tensors, penalties)
    fast = sample(logits, tensors, penalties, filtering=filtering, noise=False)
    for f in fields(SampleOutput):
        assert torch.equal(getattr(fast, f.name), getattr(full, f.name)), f.name


@settings(max_examples=60, deadline=None)
@given(batches(), st.booleans(), st.booleans())
def test_skipping_the_top_20_changes_nothing_else(batch, filtering, masked):
    # The engine passes top_logprobs=False when no row reads its top-20 (no logprobs, no beams).
    logits, params, prompts, outputs = batch
    if not filtering:
        params = [p if not p.filters else dataclasses.replace(p, top_k=0, top_p=1.0, min_p=0.0) for p in params]
    if masked:
        logits[:, 1::3] = float("-inf")
    penalties = PenaltyState.build(prompts, outputs, logits.shape[1], "cpu")
    tensors = _build(params, list(range(len(params))))
    full = sample(logits, tensors, penalties)
    lean = sample(logits, tensors, penalties, filtering=filtering, top_logprobs=False)
    for name in ("tokens", "logprobs", "ranks"):
        assert torch.equal(getattr(lean, name), getattr(full, name)), name
    assert lean.topk_ids.shape == full.topk_ids.shape and (lean.topk_ids == -1).all()
    assert lean.topk_logprobs.shape == full.topk_logprobs.shape and (lean.topk_logprobs == float("-inf")).all()


def test_without_the_top_20_nothing_is_ranked(monkeypatch):
    import llmfx.sampler

    logits = torch.randn(4, 50)
    tensors = _build([SamplingParams(temperature=t) for t in (0.0, 0.7, 1.0, 0.0)])
    expected = sample(logits, tensors)
    monkeypatch.setattr(llmfx.sampler, "top_ranked", lambda *a: pytest.fail("ranked the top-20"))
    monkeypatch.setattr(torch, "sort", lambda *a, **k: pytest.fail("sorted the vocabulary"))
    monkeypatch.setattr(torch, "topk", lambda *a, **k: pytest.fail("took a topk"))
    monkeypatch.setattr(torch.Tensor, "topk", lambda *a, **k: pytest.fail("took a topk"))
    assert torch.equal(sample(logits, tensors, filtering=False, top_logprobs=False).tokens, expected.tokens)


def test_without_noise_no_hash_is_computed(monkeypatch):
    import llmfx.sampler

    logits = torch.randn(3, 40)
    tensors = _build([SamplingParams(temperature=0.0)] * 3)
    expected = sample(logits, tensors)
    monkeypatch.setattr(llmfx.sampler, "gumbel_noise", lambda *a: pytest.fail("drew noise for a greedy batch"))
    assert torch.equal(sample(logits, tensors, noise=False).tokens, expected.tokens)


def test_without_filtering_the_vocabulary_is_not_sorted(monkeypatch):
    logits = torch.randn(4, 50)
    tensors = _build([SamplingParams(temperature=t) for t in (0.0, 0.7, 1.0, 0.0)])
    expected = sample(logits, tensors)
    monkeypatch.setattr(torch, "sort", lambda *a, **k: pytest.fail("sorted the vocabulary"))
    assert torch.equal(sample(logits, tensors, filtering=False).topk_ids, expected.topk_ids)


def test_a_filtering_row_needs_the_filters():
    # The promise filtering=False makes is load-bearing: a top-k=1 row sampled without it strays from the argmax.
    n = 64
    logits = torch.randn(1, 50).expand(n, -1)
    tensors = _build([SamplingParams(temperature=1.0, top_k=1)] * n, list(range(n)))
    assert SamplingParams(temperature=1.0, top_k=1).filters
    assert set(sample(logits, tensors).tokens.tolist()) == {int(logits[0].argmax())}
    assert len(set(sample(logits, tensors, filtering=False).tokens.tolist())) > 1


finite_or_not = st.one_of(st.sampled_from([0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), 1e-45, -1e-45]),
                          st.floats(-1e6, 1e6, width=32))


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 3).flatmap(lambda rows: st.integers(1, 45).flatmap(
    lambda vocab: st.lists(st.lists(finite_or_not, min_size=vocab, max_size=vocab), min_size=rows, max_size=rows))),
    st.integers(1, 50))
def test_top_ranked_is_the_head_of_a_stable_descending_sort(rows, k):
    values = torch.tensor(rows, dtype=torch.float32)
    top_values, top_ids = top_ranked(values, k)
    sorted_values, sorted_ids = torch.sort(values, dim=-1, descending=True, stable=True)
    assert torch.equal(top_ids, sorted_ids[:, :k])
    assert torch.equal(top_values, sorted_values[:, :k])


# --- penalties --------------------------------------------------------------------------------------


def test_penalties_worked_by_hand():
    # token 0: prompt only -> 2 / 2; token 1: output twice -> -1 * 2 - 0.25 * 2 - 0.5; token 2: output once
    # -> 0.5 / 2 - 0.25 - 0.5; token 3: unseen.
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    tensors = _build([SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)])
    penalties = PenaltyState.build([[0]], [[1, 1, 2]], 4, "cpu")
    assert apply_penalties(logits, tensors, penalties).tolist() == [[1.0, -3.0, -0.5, 3.0]]


@settings(max_examples=60, deadline=None)
@given(batches())
def test_penalties_equal_the_reference(batch):
    logits, params, prompts, outputs = batch
    got = apply_penalties(logits, _build(params), PenaltyState.build(prompts, outputs, logits.shape[1], "cpu"))
    assert np.array_equal(got.numpy(), _reference_penalized(logits.numpy(), prompts, outputs, params))


@settings(max_examples=60, deadline=None)
@given(batches())
def test_greedy_rows_are_argmax_of_penalized_logits(batch):
    logits, params, prompts, outputs = batch
    tokens = _run(logits, params, prompts, outputs).tokens
    reference = _reference_penalized(logits.numpy(), prompts, outputs, params).argmax(axis=1)
    greedy = [b for b, p in enumerate(params) if p.greedy]
    assert tokens[greedy].tolist() == reference[greedy].tolist()


@settings(max_examples=30, deadline=None)
@given(batches())
def test_neutral_penalties_change_nothing(batch):
    logits, params, prompts, outputs = batch
    neutral = [SamplingParams(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p) for p in params]
    with_state = _run(logits, neutral, prompts, outputs)
    without = sample(logits, _build(neutral))
    for f in fields(SampleOutput):
        assert torch.equal(getattr(with_state, f.name), getattr(without, f.name)), f.name


def test_penalty_state_build_counts_prompt_and_output_and_pads():
    state = PenaltyState.build([[1, 1, 3], []], [[2, 2, 0], [3]], 5, "cpu", pad_to=3)
    assert state.prompt_mask.tolist() == [[False, True, False, True, False], [False] * 5, [False] * 5]
    assert state.output_counts.dtype == torch.int32
    assert state.output_counts.tolist() == [[1, 0, 2, 0, 0], [0, 0, 0, 1, 0], [0] * 5]


histories = st.lists(st.lists(st.integers(0, 6), max_size=9), min_size=1, max_size=4)


@given(histories, histories, st.integers(0, 2))
def test_penalty_state_write_overwrites_in_place_what_a_reference_counts(prompts, outputs, extra_rows):
    n = min(len(prompts), len(outputs))
    prompts, outputs = prompts[:n], [TokenTape(o) for o in outputs[:n]]  # output histories arrive as tapes
    state = PenaltyState.build([[6, 5]] * (n + extra_rows), [[4, 4]] * (n + extra_rows), 7, "cpu")  # stale rows
    mask, counts = state.prompt_mask.data_ptr(), state.output_counts.data_ptr()
    state.write(prompts, outputs)
    assert (state.prompt_mask.data_ptr(), state.output_counts.data_ptr()) == (mask, counts)  # the same buffers
    rows = list(zip(prompts, outputs)) + [([], [])] * extra_rows  # padding rows: nothing seen
    assert state.prompt_mask.tolist() == [[t in p for t in range(7)] for p, _ in rows]
    assert state.output_counts.tolist() == [[list(o).count(t) for t in range(7)] for _, o in rows]


@given(histories, histories)
def test_write_offsets_through_a_reused_larger_staging_buffer_equals_write(prompts, outputs):
    from llmfx.penalty_histories import offsets_from_scratch

    n = min(len(prompts), len(outputs))
    prompts, outputs = prompts[:n], outputs[:n]
    expected = PenaltyState.build(prompts, outputs, 7, "cpu")
    staging = torch.full((200,), 3, dtype=torch.int64)  # stale offsets past this step's must not count
    state = PenaltyState.build([[1]] * n, [[2]] * n, 7, "cpu")
    state.write_offsets(n, *offsets_from_scratch(prompts, outputs, 7), staging)
    assert torch.equal(state.prompt_mask, expected.prompt_mask)
    assert torch.equal(state.output_counts, expected.output_counts)


def test_penalized_serving_reuses_its_staging_buffers_instead_of_allocating_each_step(monkeypatch):
    from llmfx import model_engine
    from llmfx.llm import LLM

    allocations, writes = [], []
    allocate, write = model_engine.offsets_staging, PenaltyState.write_offsets
    monkeypatch.setattr(model_engine, "offsets_staging", lambda size, device: allocations.append(size)
                        or allocate(size, device))
    monkeypatch.setattr(PenaltyState, "write_offsets", lambda self, *a: writes.append(1) or write(self, *a))
    with LLM("tiny", max_batch_size=4) as llm:
        llm.generate([[5, 6, 7, 8]] * 3, SamplingParams(max_tokens=40, repetition_penalty=1.3, ignore_eos=True,
                                                       detokenize=False), use_tqdm=False)
    # two empty buffers at construction, then doublings per parity as the histories grow: not one per step
    assert len(writes) >= 40 and len(allocations) <= 2 + 2 * math.ceil(math.log2(max(allocations))), allocations


def test_penalty_state_refuses_more_rows_than_it_holds():
    with pytest.raises(ValueError, match="3 rows of token ids do not fit a state of 2 rows"):
        PenaltyState.build([[1]] * 3, [[]] * 3, 4, "cpu", pad_to=2)


def test_count_tokens_adds_one_per_row_and_skips_minus_one():
    counts = torch.tensor([[0, 1, 0], [2, 0, 0], [0, 0, 0]], dtype=torch.int32)
    updated = count_tokens(counts, torch.tensor([1, 2, -1]))
    assert updated.tolist() == [[0, 2, 0], [2, 0, 1], [0, 0, 0]]
    assert counts.tolist() == [[0, 1, 0], [2, 0, 0], [0, 0, 0]]  # pure: the input is untouched


@given(st.integers(1, 6), st.integers(1, 9), st.data())
def test_count_tokens_equals_a_scatter_add_of_the_valid_tokens(rows, vocab, data):
    counts = torch.tensor(data.draw(st.lists(st.lists(st.integers(0, 5), min_size=vocab, max_size=vocab),
                                             min_size=rows, max_size=rows)), dtype=torch.int32)
    tokens = torch.tensor(data.draw(st.lists(st.integers(-1, vocab - 1), min_size=rows, max_size=rows)))
    valid = (tokens >= 0).to(torch.int32).unsqueeze(1)
    expected = counts.scatter_add(1, tokens.clamp(min=0).unsqueeze(1), valid)
    updated = count_tokens(counts, tokens)
    assert updated.dtype == torch.int32 and torch.equal(updated, expected)


# --- batch invariance -------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(batches(), st.randoms(use_true_random=False), batches())
def test_outputs_are_invariant_to_row_order_and_unrelated_rows(batch, rnd, other):
    logits, params, prompts, outputs = batch
    rows = logits.shape[0]
    alone = _run(logits, params, prompts, outputs)
    perm = list(range(rows))
    rnd.shuffle(perm)
    permuted = _run(logits[perm], [params[i] for i in perm], [prompts[i] for i in perm], [outputs[i] for i in perm],
                    seeds=[(7919 * i + 13) % 2**32 for i in perm])
    o_logits, o_params, o_prompts, o_outputs = other
    vocab = logits.shape[1]
    o_logits = torch.randn(o_logits.shape[0], vocab, generator=torch.Generator().manual_seed(rows))
    o_prompts = [[t % vocab for t in ids] for ids in o_prompts]
    o_outputs = [[t % vocab for t in ids] for ids in o_outputs]
    o_params = [SamplingParams(temperature=p.temperature, top_p=p.top_p, top_k=min(p.top_k, vocab),
                               repetition_penalty=p.repetition_penalty) for p in o_params]
    mixed = _run(torch.cat([o_logits, logits]), o_params + params, o_prompts + prompts, o_outputs + outputs,
                 seeds=[3] * len(o_params) + [(7919 * i + 13) % 2**32 for i in range(rows)])
    for f in fields(SampleOutput):
        value = getattr(alone, f.name)
        assert torch.equal(getattr(permuted, f.name), value[perm]), f.name
        assert torch.equal(getattr(mixed, f.name)[len(o_params):], value), f.name


# --- logprobs ---------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(batches())
def test_logprobs_are_log_softmax_after_penalties_and_temperature_before_filters(batch):
    logits, params, prompts, outputs = batch
    out = _run(logits, params, prompts, outputs)
    scaled = _scaled(_reference_penalized(logits.numpy(), prompts, outputs, params), params)  # [B, V]
    log_softmax = torch.log_softmax(torch.from_numpy(scaled), dim=-1)
    rows, vocab = scaled.shape
    shown = min(vocab, TOP_LOGPROBS)
    assert out.topk_ids.shape == out.topk_logprobs.shape == (rows, TOP_LOGPROBS)
    for b in range(rows):
        token = int(out.tokens[b])
        assert math.isclose(float(out.logprobs[b]), float(log_softmax[b, token]), rel_tol=1e-5, abs_tol=1e-5)
        assert int(out.ranks[b]) == 1 + sum(scaled[b, v] > scaled[b, token] for v in range(vocab))
        ids, values = out.topk_ids[b, :shown], out.topk_logprobs[b, :shown]
        assert len(set(ids.tolist())) == shown
        assert torch.all(values[:-1] >= values[1:])
        assert torch.allclose(values, log_softmax[b, ids], rtol=1e-5, atol=1e-5)
        assert torch.allclose(values, log_softmax[b].sort(descending=True).values[:shown], rtol=1e-5, atol=1e-5)
        assert torch.all(out.topk_ids[b, shown:] == -1) and torch.all(out.topk_logprobs[b, shown:] == -math.inf)


def test_logprobs_ignore_filters():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    out = sample(logits, _build([SamplingParams(temperature=1.0, top_k=1)]))
    assert out.tokens.tolist() == [0] and out.ranks.tolist() == [1]
    assert math.isclose(float(out.logprobs[0]), float(torch.log_softmax(logits, -1)[0, 0]), rel_tol=1e-6)


def test_score_tokens_gives_raw_logprobs_and_ranks():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 5.0, 1.0]])
    out = score_tokens(logits, torch.tensor([2, 1]))
    assert torch.allclose(out.logprobs, torch.log_softmax(logits, -1)[[0, 1], [2, 1]])
    assert out.ranks.tolist() == [2, 1]  # ties share the best rank


def test_logprobs_and_repetition_penalty_match_transformers():
    from tests.conftest import make_hf_model

    model = make_hf_model("llama")
    prompt = torch.tensor([[3, 17, 17, 42, 5, 60]])
    with torch.no_grad():
        hf = model.generate(prompt, max_new_tokens=4, do_sample=False, repetition_penalty=1.3, output_logits=True,
                            output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    generated = hf.sequences[0, prompt.shape[1]:].tolist()
    for step, (raw, processed) in enumerate(zip(hf.logits, hf.scores)):
        penalties = PenaltyState.build([prompt[0].tolist()], [generated[:step]], raw.shape[1], "cpu")
        out = sample(raw, _build([SamplingParams(temperature=0.0, repetition_penalty=1.3)]), penalties)
        assert int(out.tokens[0]) == generated[step]
        reference = torch.log_softmax(processed.float(), dim=-1)[0]
        assert torch.allclose(out.logprobs, reference[generated[step]], atol=1e-5)
        assert torch.allclose(out.topk_logprobs[0], reference.topk(TOP_LOGPROBS).values, atol=1e-5)


# --- compile ----------------------------------------------------------------------------------------


def test_compiled_sample_with_filters_and_penalties_equals_eager():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(3)
    rows, vocab = 12, 97
    logits = torch.randn(rows, vocab, generator=gen) * 3
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m, repetition_penalty=r, presence_penalty=0.5,
                             frequency_penalty=0.3)
              for t, k, p, m, r in zip([0.0, 1.0, 0.7, 1.3] * 3, [0, 5, -1, 40] * 3, [1.0, 0.9, 0.5, 0.95] * 3,
                                       [0.0, 0.05, 0.0, 0.1] * 3, [1.0, 1.2, 0.9, 1.5] * 3)]
    histories = torch.randint(0, vocab, (2, rows, 10), generator=gen).tolist()
    tensors = _build(params, list(range(rows)))
    penalties = PenaltyState.build(histories[0], histories[1], vocab, "cpu")
    eager = sample(logits, tensors, penalties)
    compiled = torch.compile(sample, fullgraph=True)
    _assert_same_sample(compiled(logits, tensors, penalties), eager)
    unfiltered = [dataclasses.replace(p, top_k=0, top_p=1.0, min_p=0.0) for p in params]
    tensors = _build(unfiltered, list(range(rows)))
    _assert_same_sample(compiled(logits, tensors, penalties, filtering=False), sample(logits, tensors, penalties))
    _assert_same_sample(compiled(logits, tensors, penalties, filtering=False, top_logprobs=False),
                        sample(logits, tensors, penalties, top_logprobs=False))


def _assert_same_sample(compiled: SampleOutput, eager: SampleOutput) -> None:
    for name in ("tokens", "ranks", "topk_ids"):
        assert torch.equal(getattr(compiled, name), getattr(eager, name)), name
    assert torch.allclose(compiled.logprobs, eager.logprobs, atol=1e-5)
    assert torch.allclose(compiled.topk_logprobs, eager.topk_logprobs, atol=1e-5)


# --- SamplingParams ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [("logprobs", 21), ("logprobs", -1), ("prompt_logprobs", 21), ("logprobs", 1.5), ("top_p", 0.0), ("top_p", 1.01),
     ("top_p", float("nan")), ("top_k", -2), ("top_k", 2.0), ("min_p", -0.1), ("min_p", 1.1), ("repetition_penalty", 0.0),
     ("repetition_penalty", float("inf")), ("presence_penalty", 2.1), ("presence_penalty", -2.1),
     ("frequency_penalty", 3.0), ("frequency_penalty", True), ("n", 0), ("n", 1.5), ("best_of", 0), ("use_beam_search", 1),
     ("beam_width", 11), ("length_penalty", float("inf")), ("early_stopping", "sometimes")],
)
def test_sampling_params_reject_out_of_range_fields(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**{field: value})


@pytest.mark.parametrize(
    "kwargs",
    [dict(logprobs=0), dict(logprobs=20), dict(top_p=1e-9), dict(top_k=-1), dict(top_k=1),
     dict(min_p=0.0), dict(min_p=1.0), dict(repetition_penalty=1e-3), dict(presence_penalty=-2.0, frequency_penalty=2.0)],
)
def test_sampling_params_accept_the_edges_of_each_range(kwargs):
    SamplingParams(**kwargs)


def test_build_copies_filter_and_penalty_fields_and_pads_neutral():
    params = [SamplingParams(top_k=-1, top_p=0.9, min_p=0.05, repetition_penalty=1.2, presence_penalty=-0.5,
                             frequency_penalty=0.25), SamplingParams(top_k=7)]
    t = SamplingTensors.build(params, [1, 2], [3, 4], "cpu", pad_to=3)
    assert t.top_k.dtype == torch.int64 and t.top_k.tolist() == [0, 7, 0]
    assert t.top_p.tolist() == [torch.tensor(0.9).item(), 1.0, 1.0]
    assert t.min_p.tolist() == [torch.tensor(0.05).item(), 0.0, 0.0]
    assert t.repetition_penalty.tolist() == [torch.tensor(1.2).item(), 1.0, 1.0]
    assert t.presence_penalty.tolist() == [-0.5, 0.0, 0.0]
    assert t.frequency_penalty.tolist() == [0.25, 0.0, 0.0]
