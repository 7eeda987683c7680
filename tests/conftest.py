"""Shared fixtures: random tiny Hugging Face checkpoints of every supported family."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch._inductor.cudagraph_trees  # noqa: F401  (its thread state belongs to the main thread, where tests run)
from hypothesis import settings

# CI has 2 cores and no GPU: keep hypothesis quick and deterministic there.
settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=30, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

_COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)

# name -> (transformers config class name, overrides): one case per behaviour the issue names.
HF_CASES = {
    "llama": ("LlamaConfig", {}),
    "llama-tied": ("LlamaConfig", {"tie_word_embeddings": True}),
    "llama-bias": ("LlamaConfig", {"attention_bias": True}),
    "llama3-rope": ("LlamaConfig", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 64}}),
    "llama-linear-rope": ("LlamaConfig", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0,
                                                              "factor": 4.0}}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 24, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}),
    "mistral": ("MistralConfig", {"sliding_window": 8, "head_dim": 16}),
}


def make_hf_model(case: str, seed: int = 0):
    """A random transformers model of a tiny config; weights scaled up so greedy tokens vary."""
    import transformers

    config_class, overrides = HF_CASES[case]
    config = getattr(transformers, config_class)(**{**_COMMON, **overrides})
    config._attn_implementation = "eager"
    model_class = getattr(transformers, config_class.replace("Config", "ForCausalLM"))
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0.0, 0.15)
    return model


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """A function case -> (transformers model, checkpoint dir), saved once per session."""
    cache: dict[str, tuple[object, Path]] = {}

    def get(case: str):
        if case not in cache:
            model = make_hf_model(case)
            path = tmp_path_factory.mktemp(case)
            model.save_pretrained(path)
            cache[case] = (model, path)
        return cache[case]

    return get
