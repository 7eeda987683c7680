"""Sampler specification: greedy rows are argmax, seeded rows are batch-invariant and follow softmax(logits / T)."""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chi2

from llmfx.sampler import (SamplingTensors, _neg_log_uniform, gumbel_noise, hash_bits, request_seed, sample,
                           token_words, uniform_noise)
from llmfx.sampling_params import SamplingParams

# Deterministic given the hash, so a tiny p threshold only guards against a wrong distribution.
_P_MIN = 1e-6


def _tensors(temps, seeds, positions) -> SamplingTensors:
    """Temperature-only rows: every filter and penalty at its neutral value."""
    rows = len(temps)
    return SamplingTensors(
        temperature=torch.tensor(temps, dtype=torch.float32),
        seed=torch.tensor(seeds, dtype=torch.int64),
        position=torch.tensor(positions, dtype=torch.int64),
        top_k=torch.zeros(rows, dtype=torch.int64),
        top_p=torch.ones(rows),
        min_p=torch.zeros(rows),
        repetition_penalty=torch.ones(rows),
        presence_penalty=torch.zeros(rows),
        frequency_penalty=torch.zeros(rows),
    )


def _gather(tensors: SamplingTensors, index: torch.Tensor) -> SamplingTensors:
    return SamplingTensors(**{f.name: getattr(tensors, f.name)[index] for f in fields(SamplingTensors)})


def _cat(a: SamplingTensors, b: SamplingTensors) -> SamplingTensors:
    return SamplingTensors(**{f.name: torch.cat([getattr(a, f.name), getattr(b, f.name)]) for f in fields(SamplingTensors)})


def _sample(logits: torch.Tensor, tensors: SamplingTensors) -> torch.Tensor:
    return sample(logits, tensors).tokens


@st.composite
def batches(draw, min_rows=1, max_rows=12):
    """Random logits and per-row (temperature, seed, position), mixing greedy and sampled rows."""
    rows = draw(st.integers(min_rows, max_rows))
    vocab = draw(st.integers(1, 64))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    logits = (torch.randn(rows, vocab, generator=gen) * draw(st.floats(0.1, 10.0))).to(dtype)
    temps = draw(st.lists(st.sampled_from([0.0, 0.3, 0.7, 1.0, 1.5]), min_size=rows, max_size=rows))
    seeds = draw(st.lists(st.integers(0, 2**32 - 1), min_size=rows, max_size=rows))
    positions = draw(st.lists(st.integers(0, 2**20), min_size=rows, max_size=rows))
    return logits, _tensors(temps, seeds, positions)


@settings(max_examples=60, deadline=None)
@given(batches())
def test_greedy_rows_are_argmax(batch):
    logits, tensors = batch
    tokens = _sample(logits, tensors)
    greedy = tensors.temperature == 0
    assert tokens.dtype == torch.int64 and tokens.shape == (logits.shape[0],)
    assert torch.equal(tokens[greedy], logits.argmax(dim=-1)[greedy])


@settings(max_examples=60, deadline=None)
@given(batches(), st.randoms(use_true_random=False))
def test_row_token_is_invariant_to_batch_order(batch, rnd):
    logits, tensors = batch
    perm = list(range(logits.shape[0]))
    rnd.shuffle(perm)
    perm_t = torch.tensor(perm)
    assert torch.equal(_sample(logits[perm_t], _gather(tensors, perm_t)), _sample(logits, tensors)[perm_t])


@settings(max_examples=60, deadline=None)
@given(batches(), st.data())
def test_row_token_is_invariant_to_unrelated_rows(batch, data):
    logits, tensors = batch
    vocab = logits.shape[1]
    extra = data.draw(st.integers(1, 8))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    other_logits = torch.randn(extra, vocab, generator=gen).to(logits.dtype)
    other = _tensors(
        data.draw(st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=extra, max_size=extra)),
        data.draw(st.lists(st.integers(0, 2**32 - 1), min_size=extra, max_size=extra)),
        data.draw(st.lists(st.integers(0, 2**20), min_size=extra, max_size=extra)),
    )
    alone = _sample(logits, tensors)
    rows = logits.shape[0]
    assert torch.equal(_sample(torch.cat([logits, other_logits]), _cat(tensors, other))[:rows], alone)
    assert torch.equal(_sample(torch.cat([other_logits, logits]), _cat(other, tensors))[extra:], alone)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from([0.0, 0.5, 1.0]), st.integers(0, 2**32 - 1), st.integers(0, 4096)), min_size=1, max_size=8),
    st.integers(0, 8),
    st.integers(0, 2**31),
)
def test_padding_rows_are_greedy_and_leave_real_rows_unchanged(rows, padding, gen_seed):
    params = [SamplingParams(temperature=t) for t, _, _ in rows]
    seeds = [s for _, s, _ in rows]
    positions = [p for _, _, p in rows]
    n = len(rows)
    logits = torch.randn(n + padding, 32, generator=torch.Generator().manual_seed(gen_seed))
    plain = SamplingTensors.build(params, seeds, positions, "cpu")
    padded = SamplingTensors.build(params, seeds, positions, "cpu", pad_to=n + padding)
    assert padded.temperature.shape == (n + padding,)
    assert torch.all(padded.temperature[n:] == 0)
    tokens = _sample(logits, padded)
    assert torch.equal(tokens[:n], _sample(logits[:n], plain))
    assert torch.equal(tokens[n:], logits[n:].argmax(dim=-1))


def test_build_copies_fields_exactly():
    params = [SamplingParams(temperature=0.7), SamplingParams(temperature=0.0)]
    tensors = SamplingTensors.build(params, [2**32 - 1, 5], [123456, 0], "cpu")
    assert tensors.temperature.dtype == torch.float32 and tensors.seed.dtype == torch.int64
    assert tensors.temperature.tolist() == [torch.tensor(0.7).item(), 0.0]
    assert tensors.seed.tolist() == [2**32 - 1, 5]
    assert tensors.position.tolist() == [123456, 0]


def test_build_rejects_pad_to_below_row_count():
    with pytest.raises(ValueError, match="pad_to"):
        SamplingTensors.build([SamplingParams()] * 3, [0, 1, 2], [0, 0, 0], "cpu", pad_to=2)


def test_positions_give_different_draws():
    n = 200
    tokens = _sample(torch.zeros(n, 1000), _tensors([1.0] * n, [7] * n, list(range(n))))
    assert len(set(tokens.tolist())) > n // 2


def test_seeds_give_different_draws():
    n = 200
    tokens = _sample(torch.zeros(n, 1000), _tensors([1.0] * n, list(range(n)), [3] * n))
    assert len(set(tokens.tolist())) > n // 2


def test_same_seed_and_position_give_the_same_draw():
    tensors = _tensors([1.0, 1.0], [11, 11], [5, 5])
    logits = torch.zeros(1, 1000).expand(2, 1000)
    tokens = _sample(logits, tensors)
    assert tokens[0] == tokens[1]


_LOGITS8 = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0, 0.25, -2.0])


def _chi_square_p(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * tokens.numel()
    stat = float(((counts - expected) ** 2 / expected).sum())
    return float(chi2.sf(stat, df=probs.numel() - 1))


@pytest.mark.parametrize("temperature", [1.0, 0.5])
@pytest.mark.parametrize("vary", ["seed", "position"])
def test_token_frequencies_match_softmax(temperature, vary):
    n = 20_000
    index = list(range(n))
    seeds = [request_seed(None, 0, i) for i in index] if vary == "seed" else [1234] * n
    positions = [17] * n if vary == "seed" else index
    logits = _LOGITS8.expand(n, -1)
    tokens = _sample(logits, _tensors([temperature] * n, seeds, positions))
    probs = torch.softmax(_LOGITS8 / temperature, dim=-1)
    assert _chi_square_p(tokens, probs) > _P_MIN


def test_temperature_changes_the_distribution():
    n = 20_000
    tokens = _sample(_LOGITS8.expand(n, -1), _tensors([0.5] * n, list(range(n)), [0] * n))
    assert _chi_square_p(tokens, torch.softmax(_LOGITS8, dim=-1)) < _P_MIN


def test_sampling_any_float_dtype_matches_float32():
    n = 64
    logits = torch.randn(n, 100, generator=torch.Generator().manual_seed(0)).bfloat16()
    tensors = _tensors([1.0] * n, list(range(n)), [0] * n)
    assert torch.equal(_sample(logits, tensors), _sample(logits.float(), tensors))


def test_uniform_noise_is_uniform_and_open():
    seeds = torch.arange(256, dtype=torch.int64)
    u = uniform_noise(seeds, seeds * 3, token_words(4096))  # [256, 4096]
    assert u.min() > 0 and u.max() < 1
    assert abs(float(u.mean()) - 0.5) < 1e-3
    # Each decile holds a tenth of the draws.
    deciles = torch.bincount((u * 10).long().flatten(), minlength=10).double() / u.numel()
    assert torch.allclose(deciles, torch.full((10,), 0.1, dtype=torch.float64), atol=2e-3)


def _murmur3_x86_32(word: int, seed: int) -> int:
    """MurmurHash3 x86_32 of one 4-byte little-endian word, in Python ints: the reference for hash_bits."""
    m = 0xFFFFFFFF
    rotl = lambda x, r: ((x << r) | (x >> (32 - r))) & m  # noqa: E731
    k = rotl((word * 0xCC9E2D51) & m, 15) * 0x1B873593 & m
    h = (rotl(seed ^ k, 13) * 5 + 0xE6546B64) & m
    h ^= 4
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & m
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & m
    return h ^ (h >> 16)


def test_murmur3_reference_matches_a_published_value():
    # MurmurHash3_x86_32 of the 4 bytes 00 00 00 00 with seed 0 is 0x2362F9DE.
    assert _murmur3_x86_32(0, 0) == 0x2362F9DE


@given(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=4), st.data())
def test_hash_bits_are_two_nested_murmur3_calls(seeds, data):
    positions = data.draw(st.lists(st.integers(0, 2**32 - 1), min_size=len(seeds), max_size=len(seeds)))
    vocab = data.draw(st.integers(1, 40))
    bits = hash_bits(torch.tensor(seeds), torch.tensor(positions), token_words(vocab))
    assert bits.dtype == torch.int64
    expected = [[_murmur3_x86_32(token, _murmur3_x86_32(position, seed)) for token in range(vocab)]
                for seed, position in zip(seeds, positions)]
    assert bits.tolist() == expected


def test_hash_bits_use_all_32_bits():
    seeds = torch.arange(64, dtype=torch.int64)
    bits = hash_bits(seeds, seeds, token_words(1024))
    assert bits.min() >= 0 and bits.max() <= 2**32 - 1
    ones = torch.stack([(bits >> b) & 1 for b in range(32)]).double().mean(dim=(1, 2))  # [32]
    assert torch.all((ones - 0.5).abs() < 0.01)


def test_gumbel_noise_is_finite_and_matches_float64_reference():
    seeds = torch.arange(128, dtype=torch.int64)
    g = gumbel_noise(seeds, seeds + 1, token_words(4096))
    reference = -torch.log(-torch.log(uniform_noise(seeds, seeds + 1, token_words(4096))))
    assert torch.isfinite(g).all()
    assert torch.allclose(g.double(), reference, rtol=1e-5, atol=1e-5)


def test_exponential_noise_is_exact_at_the_extremes():
    # u = (k + 0.5) / 2**24 rounds to 1.0 in float32 at k = 2**24 - 1; -log(u) must stay positive.
    k = torch.tensor([0, 1, 2**23 - 1, 2**23, 2**24 - 2, 2**24 - 1], dtype=torch.int64)
    e = _neg_log_uniform(k)
    reference = -torch.log((k.double() + 0.5) * 2.0**-24)
    assert torch.all(e > 0) and torch.isfinite(e).all()
    assert torch.allclose(e.double(), reference, rtol=1e-6, atol=0)


def test_compiled_sample_equals_eager():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(16, 257, generator=gen) * 3
    tensors = _tensors(
        [0.0, 1.0, 0.5, 2.0] * 4, torch.randint(0, 2**32, (16,), generator=gen).tolist(), list(range(16))
    )
    compiled = torch.compile(sample, fullgraph=True)
    assert torch.equal(compiled(logits, tensors).tokens, _sample(logits, tensors))


def test_request_seed_is_deterministic():
    assert request_seed(None, 3, 42) == request_seed(None, 3, 42)
    assert request_seed(9, 3, 42) == request_seed(9, 3, 42)


def test_request_seed_is_32_bit():
    for value in [request_seed(None, 0, 0), request_seed(2**70 + 5, 0, 0), request_seed(None, 2**63, 2**40)]:
        assert 0 <= value < 2**32


def test_distinct_request_ids_get_distinct_seeds():
    assert len({request_seed(None, 0, i) for i in range(10_000)}) == 10_000


def test_engine_seed_changes_derived_seeds():
    assert [request_seed(None, 0, i) for i in range(8)] != [request_seed(None, 1, i) for i in range(8)]


def test_user_seed_is_respected_across_engines_and_requests():
    assert request_seed(1234, 0, 0) == request_seed(1234, 99, 7)
    assert request_seed(1234, 0, 0) != request_seed(1235, 0, 0)
    assert len({request_seed(s, 0, 0) for s in range(10_000)}) == 10_000


@pytest.mark.parametrize("dtype", [torch.float32, torch.int32, torch.bool])
def test_sampler_ops_fake_kernels_agree_with_the_real_ones(dtype):
    # A fake kernel that promises another dtype or shape than the real op returns makes inductor
    # misread the result: cumsum_rows of int32 once came back as int64 behind an int32 fake.
    x = (torch.randn(3, 17) * 4).to(dtype)
    if dtype != torch.bool:
        torch.library.opcheck(torch.ops.llmfx.cumsum_rows.default, (x,))
    torch.library.opcheck(torch.ops.llmfx.argmax_rows.default, (x.float(),))
