"""Sampler: greedy and seeded temperature sampling, sync-free and compilable, as pure functions.

Randomness is a value. The noise for token v of a row is a hash of (request seed, position, v),
so a seeded row's token depends neither on what it was batched with, nor on padding, row order or
step order. Sampling is Gumbel-max: argmax(logits / T + g), g = -log(-log(u)), which draws from
softmax(logits / T) without a host sync or torch.multinomial. Greedy rows (T == 0) are chosen per
row with torch.where, so one batch mixes greedy and sampled requests.

Later sampling features (top-k/p, min-p, penalties, logprobs) add per-row fields to
SamplingTensors and rows to the packed host buffer in `SamplingTensors.build`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from llmfx.sampling_params import SamplingParams

_M32 = 0xFFFFFFFF
# MurmurHash3 (x86_32) constants.
_C1 = 0xCC9E2D51
_C2 = 0x1B873593
_F1 = 0x85EBCA6B
_F2 = 0xC2B2AE35
_NOISE_BITS = 24  # the 24 high bits of the hash make u = (k + 0.5) / 2**24, k in [0, 2**24)
_HALF = 1 << (_NOISE_BITS - 1)


@dataclass(frozen=True, slots=True, kw_only=True)
class SamplingTensors:
    """Per-row sampling parameters on the device, so one batch mixes greedy and sampled rows."""

    temperature: Tensor  # [B] float32, 0 means greedy
    seed: Tensor  # [B] int64, a 32-bit value per request
    position: Tensor  # [B] int64, position of the token being sampled (== tokens before it)

    @staticmethod
    def build(
        params: Sequence[SamplingParams],
        seeds: Sequence[int],
        positions: Sequence[int],
        device: torch.device | str,
        *,
        pad_to: int | None = None,
    ) -> SamplingTensors:
        """Host side: pack rows (greedy padding rows up to pad_to) into one buffer, copy it once."""
        assert len(params) == len(seeds) == len(positions), (len(params), len(seeds), len(positions))
        rows = len(params) if pad_to is None else pad_to
        if rows < len(params):
            raise ValueError(f"SamplingTensors.build: pad_to must be >= the number of rows {len(params)}, got {pad_to}")
        for s in seeds:
            assert 0 <= s <= _M32, f"seed must be a 32-bit value (see request_seed), got {s}"
        for p in positions:
            assert 0 <= p <= _M32, f"position must be in [0, 2**32), got {p}"
        # float64 holds every field exactly (float32 temperatures, 32-bit seeds, positions < 2**53).
        host = torch.zeros(3, rows, dtype=torch.float64)  # [3, B]; padding rows: T=0, seed=0, pos=0
        n = len(params)
        if n:
            host[0, :n] = torch.tensor([p.temperature for p in params], dtype=torch.float32).double()
            host[1, :n] = torch.tensor(list(seeds), dtype=torch.float64)
            host[2, :n] = torch.tensor(list(positions), dtype=torch.float64)
        device = torch.device(device)
        if device.type == "cuda":
            host = host.pin_memory()
        packed = host.to(device, non_blocking=True)  # [3, B]; the one host-to-device copy
        return SamplingTensors(
            temperature=packed[0].float(),
            seed=packed[1].long(),
            position=packed[2].long(),
        )


def request_seed(params_seed: int | None, engine_seed: int, request_id: int) -> int:
    """32-bit sampling seed: the user's seed hashed, else derived from (engine seed, request id)."""
    if params_seed is not None:
        assert params_seed >= 0, params_seed
        return _fold32(params_seed, salt=0x5EED5EED)
    assert request_id >= 0, request_id
    # fmix32 is a bijection on 32 bits, so distinct request ids (mod 2**32) give distinct seeds.
    key = _fold32(engine_seed & ((1 << 64) - 1), salt=0x0E61E5EE)
    return _fmix32_int((request_id + key) & _M32)


def _fmix32_int(h: int) -> int:
    h ^= h >> 16
    h = (h * _F1) & _M32
    h ^= h >> 13
    h = (h * _F2) & _M32
    return h ^ (h >> 16)


def _fold32(x: int, *, salt: int) -> int:
    """Hash a non-negative int of any size to 32 bits; injective on [0, 2**32)."""
    h = _fmix32_int((x & _M32) ^ salt)
    x >>= 32
    while x:
        h = _fmix32_int(h ^ _fmix32_int((x & _M32) ^ salt))
        x >>= 32
    return h


# Device hash: two nested MurmurHash3 x86_32 calls on one 4-byte word each, in int64 ops:
# row key = murmur3(position; seed) per row [B, 1], then murmur3(token id; row key) per token.
# Finalizing the row key first means rows with nearby (seed, position) get unrelated keys. Every
# value is kept in [0, 2**32) and every product below 2**49, so no signed overflow happens.


def _mul32(x: Tensor, c: int) -> Tensor:
    # (x * c) mod 2**32 via 16-bit halves of c: x*lo < 2**48, (x*hi mod 2**16) << 16 < 2**32.
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _rotl32(x: Tensor, r: int) -> Tensor:
    return ((x << r) & _M32) | (x >> (32 - r))


def _scramble(k: Tensor) -> Tensor:
    return _mul32(_rotl32(_mul32(k, _C1), 15), _C2)


def _absorb(h: Tensor, scrambled: Tensor) -> Tensor:
    h = _rotl32(h ^ scrambled, 13)
    return (h * 5 + 0xE6546B64) & _M32


def _fmix32(h: Tensor) -> Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, _F1)
    h = h ^ (h >> 13)
    h = _mul32(h, _F2)
    return h ^ (h >> 16)


def _murmur3_word(seed: Tensor, word: Tensor) -> Tensor:
    return _fmix32(_absorb(seed, _scramble(word)) ^ 4)  # 4 = input length in bytes


def hash_bits(seed: Tensor, position: Tensor, vocab_size: int) -> Tensor:
    """32-bit hash of (seed [B], position [B], token id) for every token: [B, V] int64 in [0, 2**32)."""
    row_key = _murmur3_word((seed & _M32).unsqueeze(1), (position & _M32).unsqueeze(1))  # [B, 1]
    token = torch.arange(vocab_size, device=seed.device, dtype=torch.int64)  # [V]
    return _murmur3_word(row_key, token)  # [B, V]


def uniform_noise(seed: Tensor, position: Tensor, vocab_size: int) -> Tensor:
    """The u in (0, 1) behind the Gumbel noise, exact in float64 (for tests and analysis): [B, V]."""
    k = hash_bits(seed, position, vocab_size) >> (32 - _NOISE_BITS)  # [B, V] in [0, 2**24)
    return (k.double() + 0.5) * 2.0**-_NOISE_BITS


def gumbel_noise(seed: Tensor, position: Tensor, vocab_size: int) -> Tensor:
    """Gumbel noise g = -log(-log(u)) per (row, token): [B, V] float32, always finite."""
    k = hash_bits(seed, position, vocab_size) >> (32 - _NOISE_BITS)  # [B, V] in [0, 2**24)
    return -torch.log(_neg_log_uniform(k))


def _neg_log_uniform(k: Tensor) -> Tensor:
    """-log(u) for u = (k + 0.5) / 2**24, k int64 in [0, 2**24): float32, always > 0 and finite."""
    # u rounds to 1.0 in float32 for the top k, so -log(u) is taken from whichever of u or 1 - u
    # is exact in float32 (each has at most 24 significant bits on its half of the range).
    low = k < _HALF
    u_low = (k.float() + 0.5) * 2.0**-_NOISE_BITS  # exact where low
    one_minus_u = ((1 << _NOISE_BITS) - k).float().sub(0.5) * 2.0**-_NOISE_BITS  # exact where ~low
    return torch.where(low, -torch.log(u_low), -torch.log1p(-one_minus_u))


def sample(logits: Tensor, tensors: SamplingTensors) -> Tensor:
    """Sample one token per row: logits [B, V] (any float dtype) -> tokens [B] int64, no host sync."""
    assert logits.dim() == 2, f"logits must be [B, V], got shape {tuple(logits.shape)}"
    batch, vocab = logits.shape
    for name in ("temperature", "seed", "position"):
        assert getattr(tensors, name).shape == (batch,), (name, getattr(tensors, name).shape, batch)
    scores = logits.float()  # [B, V]
    temperature = tensors.temperature.float()  # [B]
    sampled_row = temperature > 0  # [B]
    safe_t = torch.where(sampled_row, temperature, torch.ones_like(temperature))  # [B]
    noisy = scores / safe_t.unsqueeze(1) + gumbel_noise(tensors.seed, tensors.position, vocab)  # [B, V]
    return torch.where(sampled_row, noisy.argmax(dim=-1), scores.argmax(dim=-1))  # [B]
