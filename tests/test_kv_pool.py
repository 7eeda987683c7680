"""The device KV pool's layout and page copy (the reference implementation, on CPU)."""

from __future__ import annotations

import pytest
import torch

from llmfx.kv_pool import KVPool, copy_pages
from llmfx.presets import preset

CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                         reason="needs a CUDA device")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_copy_pages_copies_whole_pages_in_every_layer_and_leaves_the_rest(device):
    gen = torch.Generator().manual_seed(0)
    layers = tuple((torch.randn(6, 2, 4, 8, generator=gen).to(device).transpose(1, 2),  # head-major, as allocated
                    torch.randn(6, 4, 2, 8, generator=gen).to(device)) for _ in range(3))
    before = [(k.clone(), v.clone()) for k, v in layers]
    copy_pages(layers, [(2, 5), (4, 1)])
    for layer, old in zip(layers, before):
        for new, was in zip(layer, old):
            assert torch.equal(new[5], was[2]) and torch.equal(new[1], was[4])
            assert torch.equal(new[[0, 2, 3, 4]], was[[0, 2, 3, 4]])


def test_pages_are_shaped_token_major_and_stored_head_major():
    cfg = preset("tinyllama-1.1b")
    k, v = KVPool.allocate(cfg, 5, 16, torch.bfloat16, "cpu").layers[0]
    for pages in (k, v):
        assert pages.shape == (5, 16, cfg.num_kv_heads, cfg.head_dim)
        # One KV head's 16 tokens of a page lie together: head, then token, then dim in memory.
        assert pages.stride() == (cfg.num_kv_heads * 16 * cfg.head_dim, cfg.head_dim, 16 * cfg.head_dim, 1)
        assert pages.eq(0).all()
