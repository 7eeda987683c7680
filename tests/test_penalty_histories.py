"""The penalty histories kept across steps give exactly the offsets a from-scratch conversion gives."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmfx.penalty_histories import PenaltyHistories, offsets_from_scratch
from llmfx.persistent import TokenTape, append_token


@given(st.data())
def test_kept_histories_equal_a_fresh_conversion_whatever_happens_between_steps(data):
    vocab = data.draw(st.integers(2, 40))
    token = st.integers(0, vocab - 1)
    histories = PenaltyHistories(vocab)
    seqs: dict[int, tuple[tuple[int, ...], object]] = {}  # seq id -> (prompt, output)
    kept_versions: list[tuple[int, object]] = []  # older output versions, to branch from (a rollback's copy)
    for _ in range(data.draw(st.integers(1, 10))):
        rows = data.draw(st.lists(st.integers(0, 6), unique=True, max_size=5))  # this step's rows, in order
        for sid in rows:
            action = data.draw(st.sampled_from(["grow", "grow", "same", "fresh", "tuple", "branch"]))
            if sid not in seqs or action == "fresh":  # a new sequence, or a spare beam id with another history
                seqs[sid] = (tuple(data.draw(st.lists(token, min_size=1, max_size=30))),
                             TokenTape(data.draw(st.lists(token, max_size=20))))
                continue
            prompt, output = seqs[sid]
            if action == "grow":  # one token a step, or several when unpenalized steps ran in between
                for t in data.draw(st.lists(token, min_size=1, max_size=4)):
                    kept_versions.append((sid, output))
                    output = append_token(output, t)
            elif action == "tuple":
                output = tuple(output) + (data.draw(token),)
            elif action == "branch":
                older = [v for s, v in kept_versions if s == sid]
                if older:  # appending to an older version copies the list (another version grew it)
                    output = append_token(data.draw(st.sampled_from(older)), data.draw(token))
            seqs[sid] = (prompt, output)
        prompts, outputs = [seqs[s][0] for s in rows], [seqs[s][1] for s in rows]
        got = histories.offsets(rows, prompts, outputs)
        want = offsets_from_scratch(prompts, outputs, vocab)
        assert all(np.array_equal(g, w) for g, w in zip(got, want))


def test_an_id_outside_the_vocabulary_is_refused():
    with pytest.raises(AssertionError, match=r"token ids must be in \[0, 8\)"):
        PenaltyHistories(8).offsets([0], [(1, 2)], [TokenTape([3, 8])])


def test_a_steady_step_converts_only_the_new_tokens(monkeypatch):
    import llmfx.penalty_histories as module

    histories = PenaltyHistories(100)
    prompt, output = tuple(range(50)), TokenTape(range(10))
    histories.offsets([7], [prompt], [output])
    converted = []
    real = module.token_ids
    monkeypatch.setattr(module, "token_ids", lambda ids, vocab: converted.append(len(ids)) or real(ids, vocab))
    for t in range(20, 60):
        output = append_token(output, t)
        prompt_offsets, output_offsets = histories.offsets([7], [prompt], [output])
    assert converted == [1] * 40  # one new token a step; the prompt never again
    assert list(output_offsets) == list(range(10)) + list(range(20, 60)) and list(prompt_offsets) == list(range(50))
