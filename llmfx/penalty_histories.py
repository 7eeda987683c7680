"""The host side of the penalties: every row's seen tokens as flat offsets row * V + id, kept across steps.

A penalized batch hands the device each row's prompt and output ids every step (`PenaltyState`).
Converting them all anew took 3.45 ms of host time a step at 64 rows of 100-1024 prompt tokens
on the CPU box (0.97 ms as kept here), more than a whole batch-64 step on the H200 (~2 ms). A sequence's prompt never changes and
its output only grows, so each sequence's ids are converted once and kept here, and a step
converts only the tokens that are new since the last penalized step (`benchmarks/penalty_step.py`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from llmfx.persistent import TokenTape


def token_ids(ids: Sequence[int], vocab_size: int) -> np.ndarray:
    """ids as an int64 array, checked to lie in [0, vocab_size)."""
    out = np.fromiter(ids, dtype=np.int64, count=len(ids))
    assert not out.size or (out.min() >= 0 and out.max() < vocab_size), f"token ids must be in [0, {vocab_size})"
    return out


def flat_offsets(per_row: Sequence[np.ndarray], vocab_size: int) -> np.ndarray:
    """Row r's ids moved to r * vocab_size + id, all rows in one array."""
    if not per_row:
        return np.empty(0, dtype=np.int64)
    lengths = np.fromiter(map(len, per_row), dtype=np.int64, count=len(per_row))
    rows = np.arange(len(per_row), dtype=np.int64) * vocab_size
    return np.concatenate(per_row) + np.repeat(rows, lengths)


def offsets_from_scratch(prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]],
                         vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat offsets of every row's prompt ids and output ids, all converted anew (what PenaltyHistories keeps)."""
    return tuple(flat_offsets([token_ids(ids, vocab_size) for ids in rows], vocab_size) for rows in (prompts, outputs))


class PenaltyHistories:
    """Each running sequence's prompt and output ids as arrays, extended by the new tokens at each penalized step.

    A cached output stays valid while the sequence's output is a TokenTape of the same lineage and no
    shorter (versions of one lineage agree below the shorter's length). Anything else (a beam fork's
    new tape, a tuple, a version a rollback copied) is converted whole. Entries of
    sequences missing from a step are dropped.
    """

    def __init__(self, vocab_size: int) -> None:
        self._vocab = vocab_size
        self._prompts: dict[int, tuple[Sequence[int], np.ndarray]] = {}  # seq id -> (the prompt, its ids)
        self._outputs: dict[int, tuple[object, np.ndarray, int]] = {}  # seq id -> (tape lineage, buffer, length)

    def offsets(self, seq_ids: Sequence[int], prompts: Sequence[Sequence[int]],
                outputs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Flat offsets (row * V + id) of every row's prompt ids and output ids; row i is seq_ids[i]."""
        vocab = self._vocab
        old_prompts, old_outputs = self._prompts, self._outputs
        self._prompts, self._outputs = {}, {}
        prompt_rows, output_rows = [], []
        for seq_id, prompt, output in zip(seq_ids, prompts, outputs, strict=True):
            cached = old_prompts.get(seq_id)
            if cached is None or cached[0] is not prompt:
                cached = (prompt, token_ids(prompt, vocab))
            self._prompts[seq_id] = cached
            prompt_rows.append(cached[1])
            output_rows.append(self._output_ids(seq_id, output, old_outputs.get(seq_id)))
        return flat_offsets(prompt_rows, vocab), flat_offsets(output_rows, vocab)

    def _output_ids(self, seq_id: int, output: Sequence[int],
                    cached: tuple[object, np.ndarray, int] | None) -> np.ndarray:
        lineage = output.lineage if type(output) is TokenTape else None
        n = len(output)
        if cached is not None and lineage is not None and cached[0] is lineage and cached[2] <= n:
            _, buffer, known = cached
            if n > len(buffer):  # room for the coming tokens: doubling keeps a token's copies O(1) amortized
                grown = np.empty(2 * n, dtype=np.int64)
                grown[:known] = buffer[:known]
                buffer = grown
            if n > known:
                buffer[known:n] = token_ids(output[known:n], self._vocab)
        else:
            buffer = np.empty(max(2 * n, 16), dtype=np.int64)
            buffer[:n] = token_ids(output, self._vocab)
        self._outputs[seq_id] = (lineage, buffer, n)
        return buffer[:n]
