"""The device KV pool's page copy (the reference implementation, on CPU)."""

from __future__ import annotations

import pytest
import torch

from llmfx.kv_pool import copy_pages

CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                         reason="needs a CUDA device")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_copy_pages_copies_whole_pages_in_every_layer_and_leaves_the_rest(device):
    gen = torch.Generator().manual_seed(0)
    layers = tuple((torch.randn(6, 4, 2, 8, generator=gen).to(device), torch.randn(6, 4, 2, 8, generator=gen).to(device))
                   for _ in range(3))
    before = [(k.clone(), v.clone()) for k, v in layers]
    copy_pages(layers, [(2, 5), (4, 1)])
    for layer, old in zip(layers, before):
        for new, was in zip(layer, old):
            assert torch.equal(new[5], was[2]) and torch.equal(new[1], was[4])
            assert torch.equal(new[[0, 2, 3, 4]], was[[0, 2, 3, 4]])
