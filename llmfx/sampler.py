"""Sampler: seeded sampling with penalties, top-k/top-p/min-p and logprobs, sync-free and compilable.

Randomness is a value. The noise for token v of a row is a hash of (request seed, position, v),
so a seeded row's token depends neither on what it was batched with, nor on padding, row order or
step order. Sampling is Gumbel-max: argmax(logits / T + g), g = -log(-log(u)), which draws from
softmax(logits / T) without a host sync or torch.multinomial. Every per-row choice (greedy or
sampled, which filters, which penalties) is a tensor value selected with torch.where, so one batch
mixes greedy, sampled and penalized requests and the graph has static shapes.

Order of operations per row, as in vLLM:
  1. penalties on the raw logits: repetition (tokens in prompt OR output: positive logits divided
     by it, the others multiplied), then frequency * output count, then presence * (count > 0);
  2. temperature: scaled = penalized / T, with T = 1 for greedy rows;
  3. logprobs, rank and top-20 come from log_softmax(scaled): after penalties and temperature,
     before any filter;
  4. filters: top-k and min-p (value thresholds, so their order does not matter), then top-p over
     the renormalized survivors; ties with the last kept value are always kept;
  5. greedy rows take argmax(penalized), sampled rows argmax(filtered scaled + g).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from llmfx.penalty_histories import offsets_from_scratch
from llmfx.sampling_params import SamplingParams

TOP_LOGPROBS = 20  # top logprobs always computed (static shape); the host slices the k it was asked
_M32 = 0xFFFFFFFF
# MurmurHash3 (x86_32) constants.
_C1 = 0xCC9E2D51
_C2 = 0x1B873593
_F1 = 0x85EBCA6B
_F2 = 0xC2B2AE35
_NOISE_BITS = 24  # the 24 high bits of the hash make u = (k + 0.5) / 2**24, k in [0, 2**24)
_HALF = 1 << (_NOISE_BITS - 1)
# The fields of a packed float64 sampling buffer (one row each), with the value a padding row gets: the
# float32 fields first, then the int64 ones, so each dtype converts as one block (SamplingTensors.of_blocks).
SAMPLING_FIELDS = (("temperature", 0.0), ("top_p", 1.0), ("min_p", 0.0), ("repetition_penalty", 1.0),
                   ("presence_penalty", 0.0), ("frequency_penalty", 0.0), ("seed", 0.0), ("position", 0.0),
                   ("top_k", 0.0))
_INT64_FIELDS = ("seed", "position", "top_k")
NUM_FLOAT_FIELDS = len(SAMPLING_FIELDS) - len(_INT64_FIELDS)  # the first ones are float32 on the device
assert tuple(name for name, _ in SAMPLING_FIELDS[NUM_FLOAT_FIELDS:]) == _INT64_FIELDS, "int64 fields come last"


@dataclass(frozen=True, slots=True, kw_only=True)
class SamplingTensors:
    """Per-row sampling parameters on the device; neutral values (greedy padding rows) filter nothing."""

    temperature: Tensor  # [B] float32, 0 means greedy
    seed: Tensor  # [B] int64, a 32-bit value per request
    position: Tensor  # [B] int64, position of the token being sampled (== tokens before it)
    top_k: Tensor  # [B] int64, <= 0 (or >= V) disables
    top_p: Tensor  # [B] float32 in (0, 1], 1 disables
    min_p: Tensor  # [B] float32 in [0, 1], 0 disables
    repetition_penalty: Tensor  # [B] float32 > 0, 1 disables
    presence_penalty: Tensor  # [B] float32, 0 disables
    frequency_penalty: Tensor  # [B] float32, 0 disables

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
        packed = np.empty((len(SAMPLING_FIELDS), rows), dtype=np.float64)
        write_sampling_rows(packed, [sampling_row(p, s, pos) for p, s, pos in zip(params, seeds, positions)])
        host = torch.from_numpy(packed)
        device = torch.device(device)
        if device.type == "cuda":
            host = host.pin_memory()
        return SamplingTensors.unpack(host.to(device, non_blocking=True))  # [9, B]; the one host-to-device copy

    @staticmethod
    def unpack(packed: Tensor) -> SamplingTensors:
        """Device side: the fields of a packed float64 buffer [9, B] (SAMPLING_FIELDS order)."""
        return SamplingTensors.of_blocks(packed[:NUM_FLOAT_FIELDS].float(), packed[NUM_FLOAT_FIELDS:].long())

    @staticmethod
    def of_blocks(floats: Tensor, ints: Tensor) -> SamplingTensors:
        """The fields as rows of a float32 block [6, B] and an int64 block [3, B], in SAMPLING_FIELDS order."""
        rows = [*floats, *ints]
        assert len(rows) == len(SAMPLING_FIELDS), f"{len(rows)} rows for {len(SAMPLING_FIELDS)} sampling fields"
        return SamplingTensors(**{name: row for (name, _), row in zip(SAMPLING_FIELDS, rows)})


def write_sampling_rows(packed: np.ndarray, rows: Sequence[Sequence[float]]) -> None:
    """Fill a packed float64 buffer [9, B] (SAMPLING_FIELDS order): rows first, neutral padding after."""
    n = len(rows)
    if n:
        packed[:, :n] = np.asarray(rows, dtype=np.float64).T
    for i, (_, neutral) in enumerate(SAMPLING_FIELDS):
        packed[i, n:] = neutral


def sampling_row(params: SamplingParams, seed: int, position: int) -> list[float]:
    """One row's SAMPLING_FIELDS values; float fields rounded through float32, as the device holds them."""
    assert 0 <= seed <= _M32, f"seed must be a 32-bit value (see request_seed), got {seed}"
    assert 0 <= position <= _M32, f"position must be in [0, 2**32), got {position}"
    ints = {"seed": seed, "position": position, "top_k": max(params.top_k, 0)}
    return [float(ints[name]) if name in ints else float(struct.unpack("f", struct.pack("f", getattr(params, name)))[0])
            for name, _ in SAMPLING_FIELDS]


@dataclass(frozen=True, slots=True, kw_only=True)
class PenaltyState:
    """Which tokens each row has seen: the input of repetition, presence and frequency penalties."""

    prompt_mask: Tensor  # [B, V] bool, token occurs in the prompt
    output_counts: Tensor  # [B, V] int32, occurrences among the generated tokens

    @staticmethod
    def build(
        prompt_token_ids_per_row: Sequence[Sequence[int]],
        output_token_ids_per_row: Sequence[Sequence[int]],
        vocab_size: int,
        device: torch.device | str,
        *,
        pad_to: int | None = None,
    ) -> PenaltyState:
        """A state for these rows, padded with rows that have seen nothing to pad_to rows."""
        rows = len(prompt_token_ids_per_row) if pad_to is None else pad_to
        state = PenaltyState(prompt_mask=torch.zeros(rows, vocab_size, dtype=torch.bool, device=device),
                             output_counts=torch.zeros(rows, vocab_size, dtype=torch.int32, device=device))
        state.write(prompt_token_ids_per_row, output_token_ids_per_row)
        return state

    def write(self, prompt_token_ids_per_row: Sequence[Sequence[int]],
              output_token_ids_per_row: Sequence[Sequence[int]]) -> None:
        """Overwrite this state in place (rows past the given ones: nothing seen); the engine's static buffers."""
        n = len(prompt_token_ids_per_row)
        assert len(output_token_ids_per_row) == n, (n, len(output_token_ids_per_row))
        prompt, output = offsets_from_scratch(prompt_token_ids_per_row, output_token_ids_per_row,
                                              self.prompt_mask.shape[1])
        staging = offsets_staging(len(prompt) + len(output), self.prompt_mask.device)
        self.write_offsets(n, prompt, output, staging)

    def write_offsets(self, num_rows: int, prompt_offsets: np.ndarray, output_offsets: np.ndarray,
                      staging: Tensor) -> None:
        """Overwrite this state in place from flat offsets row * V + id of num_rows rows' prompt and output ids.

        The offsets go into staging (an int64 host buffer, pinned for CUDA, with room for both; the
        caller must not refill it before this copy has landed) and one copy moves them; the device
        scatters them into the zeroed tensors: no [B, V] tensor is built on the host.
        `llmfx.penalty_histories` keeps the offsets' parts across steps.
        """
        rows = self.prompt_mask.shape[0]
        if rows < num_rows:
            raise ValueError(f"PenaltyState: {num_rows} rows of token ids do not fit a state of {rows} rows")
        n_prompt, total = len(prompt_offsets), len(prompt_offsets) + len(output_offsets)
        assert staging.dtype == torch.int64 and staging.numel() >= total, "staging must hold every offset"
        host = staging[:total]
        flat = host.numpy()
        flat[:n_prompt] = prompt_offsets
        flat[n_prompt:] = output_offsets
        offsets = host.to(self.prompt_mask.device, non_blocking=True)  # the one host-to-device copy
        self.prompt_mask.zero_()
        self.output_counts.zero_()
        self.prompt_mask.view(-1).index_fill_(0, offsets[:n_prompt], True)
        outputs = offsets[n_prompt:]
        self.output_counts.view(-1).index_add_(0, outputs, torch.ones_like(outputs, dtype=torch.int32))


def offsets_staging(size: int, device: torch.device | str) -> Tensor:
    """An int64 host buffer for PenaltyState.write_offsets: pinned when the state lives on CUDA (async copy)."""
    return torch.empty(size, dtype=torch.int64, pin_memory=torch.device(device).type == "cuda")


def count_tokens(output_counts: Tensor, tokens: Tensor) -> Tensor:
    """Add this step's tokens [B] int64 to output_counts [B, V]; rows whose token is -1 are unchanged.

    A comparison, not a scatter: pointwise, so inductor fuses it into the penalties that read the counts
    instead of writing a [B, V] copy every step (39-78 us a step at batch 256 on the H200, session 16).
    """
    vocab = torch.arange(output_counts.shape[1], device=output_counts.device)
    return output_counts + (vocab.unsqueeze(0) == tokens.unsqueeze(1)).to(output_counts.dtype)  # [B, V]


@dataclass(frozen=True, slots=True, kw_only=True)
class SampleOutput:
    """A sampled (or scored) token per row with its logprob, rank and the top-20 alternatives."""

    tokens: Tensor  # [B] int64
    logprobs: Tensor  # [B] float32, logprob of tokens
    ranks: Tensor  # [B] int64, 1 + the number of tokens strictly more likely (ties share the best rank)
    topk_ids: Tensor  # [B, 20] int64, most likely first (ties: lower id first); -1 pads when V < 20 (all when skipped)
    topk_logprobs: Tensor  # [B, 20] float32, descending; -inf pads where ids are -1


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


def _murmur3_of_scrambled(seed: Tensor, scrambled: Tensor) -> Tensor:
    """MurmurHash3 x86_32 of one 4-byte word with seed, from the word's scramble."""
    return _fmix32(_absorb(seed, scrambled) ^ 4)  # 4 = input length in bytes


def token_words(vocab_size: int, device: torch.device | str = "cpu") -> Tensor:
    """murmur3's scrambled input word of every token id: [V] int64, the per-token half of hash_bits.

    The engine computes it once and passes it to each step. Computed inside a compiled step, the arange
    and its products become one inductor index expression, evaluated in the kernel's int32 index type:
    at Llama-3's 128,256 ids and batch 256 its constants overflow int32 and Triton refuses the kernel
    (tests/test_compile_for_h200.py). Loaded from a tensor, the ids are data.
    """
    return _scramble(torch.arange(vocab_size, device=device, dtype=torch.int64))


def hash_bits(seed: Tensor, position: Tensor, words: Tensor) -> Tensor:
    """32-bit hash of (seed [B], position [B], token id) for every token: [B, V] int64 in [0, 2**32).

    words [V] is token_words(V): murmur3(token id; row key) with the token's scramble done ahead.
    """
    row_key = _murmur3_of_scrambled((seed & _M32).unsqueeze(1), _scramble((position & _M32).unsqueeze(1)))  # [B, 1]
    return _murmur3_of_scrambled(row_key, words)  # [B, V]


def uniform_noise(seed: Tensor, position: Tensor, words: Tensor) -> Tensor:
    """The u in (0, 1) behind the Gumbel noise, exact in float64 (for tests and analysis): [B, V]."""
    k = hash_bits(seed, position, words) >> (32 - _NOISE_BITS)  # [B, V] in [0, 2**24)
    return (k.double() + 0.5) * 2.0**-_NOISE_BITS


def gumbel_noise(seed: Tensor, position: Tensor, words: Tensor) -> Tensor:
    """Gumbel noise g = -log(-log(u)) per (row, token): [B, V] float32, always finite."""
    k = hash_bits(seed, position, words) >> (32 - _NOISE_BITS)  # [B, V] in [0, 2**24)
    return -torch.log(_neg_log_uniform(k))


def _neg_log_uniform(k: Tensor) -> Tensor:
    """-log(u) for u = (k + 0.5) / 2**24, k int64 in [0, 2**24): float32, always > 0 and finite."""
    # u rounds to 1.0 in float32 for the top k, so -log(u) is taken from whichever of u or 1 - u
    # is exact in float32 (each has at most 24 significant bits on its half of the range).
    low = k < _HALF
    u_low = (k.float() + 0.5) * 2.0**-_NOISE_BITS  # exact where low
    one_minus_u = ((1 << _NOISE_BITS) - k).float().sub(0.5) * 2.0**-_NOISE_BITS  # exact where ~low
    return torch.where(low, -torch.log(u_low), -torch.log1p(-one_minus_u))


def apply_penalties(logits: Tensor, tensors: SamplingTensors, penalties: PenaltyState) -> Tensor:
    """Repetition, then frequency, then presence penalty (vLLM's order): logits [B, V] float32 -> [B, V]."""
    output_seen = penalties.output_counts > 0  # [B, V]
    seen = penalties.prompt_mask | output_seen  # [B, V]
    rep = tensors.repetition_penalty.unsqueeze(1)  # [B, 1]
    # Neutral rows (1, 0, 0) come out bit for bit unchanged, so passing penalties never moves them.
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - tensors.frequency_penalty.unsqueeze(1) * penalties.output_counts.float()
    return logits - tensors.presence_penalty.unsqueeze(1) * output_seen.float()  # [B, V]


@torch.library.custom_op("llmfx::cumsum_rows", mutates_args=())
def cumsum_rows(x: Tensor) -> Tensor:
    """Cumulative sum along the last dim [B, V], in x's dtype.

    Opaque to inductor: on the H200 (torch 2.11) the vocabulary-sized scan went through inductor's
    split-scan kernels, which raised "NYI TritonSplitDimKernel reductions" under one of the
    compile settings tried; the plain kernel is cheap here. Kept until the compiled TinyLlama
    step is verified on the GPU without it.
    """
    return torch.cumsum(x, dim=-1, dtype=x.dtype)  # an integer cumsum would otherwise widen to int64


@cumsum_rows.register_fake
def _(x: Tensor) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("llmfx::argmax_rows", mutates_args=())
def argmax_rows(x: Tensor) -> Tensor:
    """Index of the largest value of each row [B, V] (first on ties): [B] int64.

    An opaque op on purpose: with one row (B = 1) inductor (torch 2.11 to 2.13) splits a later
    row reduction that reads this argmax, `ranks` in _with_logprobs, along the argmax's own ranges
    and leaves a second stage that reduces over a single element; its fusion pass then asserts
    (simd.py can_fuse: `assert rnumel1 == 1 and rnumel2 != 1`). Inductor does not look through an
    opaque op, so the ranks reduction is split normally. tests/test_compile_for_h200.py.
    """
    return x.argmax(dim=-1)


@argmax_rows.register_fake
def _(x: Tensor) -> Tensor:
    return x.new_empty(x.shape[:-1], dtype=torch.int64)


def filter_threshold(sorted_scaled: Tensor, tensors: SamplingTensors) -> Tensor:
    """Lowest kept value per row given each row's scaled logits sorted descending [B, V]: [B, 1].

    Kept: values >= the k-th largest (top-k), with p >= min_p * p_max (min-p), then the shortest
    prefix of those whose renormalized mass reaches top_p; every value equal to the last kept one
    is kept too, so the kept set is a function of the values alone, not of the order among ties.
    """
    vocab = sorted_scaled.shape[1]
    k = tensors.top_k  # [B]
    k = torch.where((k <= 0) | (k > vocab), vocab, k)
    kth = sorted_scaled.gather(1, (k - 1).unsqueeze(1))  # [B, 1]
    relative = torch.exp(sorted_scaled - sorted_scaled[:, :1])  # [B, V] p / p_max
    candidate = (sorted_scaled >= kth) & (relative >= tensors.min_p.unsqueeze(1))  # [B, V], a prefix
    probs = torch.softmax(sorted_scaled.masked_fill(~candidate, float("-inf")), dim=-1)  # [B, V]
    mass_before = F.pad(cumsum_rows(probs)[:, :-1], (1, 0))  # [B, V], exclusive cumulative sum
    top_p = tensors.top_p.unsqueeze(1)  # [B, 1]
    # top_p >= 1 keeps all: the float32 sum may reach 1 before the last token.
    keep = candidate & ((mass_before < top_p) | (top_p >= 1))  # [B, V], a prefix holding rank 0
    last = keep.sum(dim=-1, keepdim=True).clamp(min=1) - 1  # [B, 1]
    return sorted_scaled.gather(1, last)  # [B, 1]


def sample(logits: Tensor, tensors: SamplingTensors, penalties: PenaltyState | None = None, *,
           filtering: bool = True, noise: bool = True, top_logprobs: bool = True,
           words: Tensor | None = None) -> SampleOutput:
    """Sample one token per row from logits [B, V] (any float dtype), no host sync; see the module doc.

    Logprobs, ranks and top-20 are of log_softmax(penalized logits / T) (T = 1 for greedy rows),
    i.e. after penalties and temperature, BEFORE top-k/top-p/min-p. penalties=None means none.
    Two promises skip work and change no result: filtering=False, that no row filters (see
    SamplingParams.filters), skips the filters and the vocabulary sort they need; noise=False, that
    every row is greedy, skips the Gumbel noise (a hash per vocabulary entry). top_logprobs=False
    skips the top-20: every row's ids come back -1 and logprobs -inf, as for an empty vocabulary;
    tokens, logprobs and ranks are unchanged. words is token_words(V), computed here when not given (a
    compiled caller passes it: see token_words).
    """
    assert logits.dim() == 2, f"logits must be [B, V], got shape {tuple(logits.shape)}"
    batch, vocab = logits.shape
    for name in SamplingTensors.__slots__:
        assert getattr(tensors, name).shape == (batch,), (name, getattr(tensors, name).shape, batch)
    scores = logits.float()  # [B, V]
    if penalties is not None:
        assert penalties.prompt_mask.shape == penalties.output_counts.shape == (batch, vocab)
        scores = apply_penalties(scores, tensors, penalties)
    temperature = tensors.temperature.float()  # [B]
    sampled_row = temperature > 0  # [B]
    safe_t = torch.where(sampled_row, temperature, torch.ones_like(temperature))  # [B]
    scaled = scores / safe_t.unsqueeze(1)  # [B, V]; greedy rows: scores exactly
    if filtering:
        sorted_scaled, sorted_ids = torch.sort(scaled, dim=-1, descending=True, stable=True)  # [B, V] each
        kept = scaled >= filter_threshold(sorted_scaled, tensors)  # [B, V]
        candidates = scaled.masked_fill(~kept, float("-inf"))  # [B, V]
    else:
        candidates = scaled  # what filter_threshold keeps of a row that filters nothing
    if not top_logprobs:  # [B, 0]: _with_logprobs pads every column
        top_values, top_ids = scaled[:, :0], torch.zeros(batch, 0, dtype=torch.int64, device=scaled.device)
    elif filtering:  # the sort's head: free
        top_values, top_ids = sorted_scaled[:, :TOP_LOGPROBS], sorted_ids[:, :TOP_LOGPROBS]
    else:
        top_values, top_ids = top_ranked(scaled, TOP_LOGPROBS)
    if noise:
        words = token_words(vocab, logits.device) if words is None else words
        noisy = candidates + gumbel_noise(tensors.seed, tensors.position, words)  # [B, V]
        tokens = argmax_rows(torch.where(sampled_row.unsqueeze(1), noisy, scaled))  # [B]; one argmax for both kinds
    else:
        tokens = argmax_rows(scaled)  # [B]; what a greedy row takes above
    return _with_logprobs(scaled, tokens, top_values, top_ids)


def top_ranked(values: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest of each row of values [B, V] float32, ties lower id first: (values, ids) [B, min(k, V)].

    The first k of a stable descending sort, found by torch.topk instead of sorting the row: topk's
    order among equal values is unspecified, so it ranks an int64 key that orders by value, then
    by id ascending. The key is the float's bits made monotonic (negative floats' magnitude bits
    flipped; -0.0 is taken as 0.0, which it equals) in the high half and V - 1 - id in the low half.
    On the H200 the whole sampler is faster with it than with the sort from 2 rows up
    (benchmarks/sampler_variants.py; the engine's SORT_FREE_MIN_ROWS).
    """
    assert values.dtype == torch.float32, values.dtype
    vocab = values.shape[1]
    k = min(k, vocab)
    bits = torch.where(values == 0, 0.0, values).view(torch.int32)  # [B, V]
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()  # [B, V], same order as the floats
    ids = torch.arange(vocab, device=values.device, dtype=torch.int64)
    keys = ordered * (1 << 32) + (vocab - 1 - ids)  # [B, V]; never overflows: |ordered| <= 2**31
    top_ids = (vocab - 1) - (keys.topk(k, dim=-1).values & _M32)  # [B, k]
    return values.gather(1, top_ids), top_ids


def score_tokens(logits: Tensor, token_ids: Tensor) -> SampleOutput:
    """Logprob, rank and top-20 of given tokens under log_softmax(logits) [T, V] (prompt logprobs)."""
    scores = logits.float()  # [T, V]
    return _with_logprobs(scores, token_ids, *top_ranked(scores, TOP_LOGPROBS))


def _with_logprobs(scaled: Tensor, tokens: Tensor, top_values: Tensor, top_ids: Tensor) -> SampleOutput:
    lse = torch.logsumexp(scaled, dim=-1, keepdim=True)  # [B, 1]
    token_value = scaled.gather(1, tokens.unsqueeze(1))  # [B, 1]
    missing = TOP_LOGPROBS - top_ids.shape[1]  # > 0 only when V < 20 or the top-20 was skipped
    return SampleOutput(
        tokens=tokens,
        logprobs=(token_value - lse).squeeze(1),
        ranks=1 + (scaled > token_value).sum(dim=-1),
        topk_ids=F.pad(top_ids, (0, missing), value=-1),
        topk_logprobs=F.pad(top_values - lse, (0, missing), value=float("-inf")),
    )
