"""ModelConfig from Hugging Face configs of both layouts, and the donated KV handle."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from llmfx.config import ModelConfig, RopeScaling
from llmfx.kv_pool import KVPool, SpentHandleError
from llmfx.ops.rope import inverse_frequencies
from llmfx.presets import preset

# A transformers 4.x style config.json, as TinyLlama and Llama 3.2 ship it on the hub.
LLAMA_32_1B = {
    "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 2048, "num_hidden_layers": 16,
    "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 8192, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": True, "head_dim": 64,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16",
}


def test_legacy_hub_config_translates_to_the_llama_3_2_preset():
    assert ModelConfig.from_hf(LLAMA_32_1B) == preset("llama-3.2-1b")


def test_list_of_eos_ids_is_kept():
    cfg = ModelConfig.from_hf({**LLAMA_32_1B, "eos_token_id": [128001, 128009]})
    assert cfg.eos_token_ids == (128001, 128009)


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "linear", "factor": 4.0},
])
def test_scaled_inverse_frequencies_match_transformers(rope):
    hf = LlamaConfig(hidden_size=256, num_attention_heads=2, rope_parameters={**rope, "rope_theta": 500000.0})
    expected, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf, "cpu")
    ours = inverse_frequencies(ModelConfig.from_hf({**hf.to_dict(), "architectures": ["LlamaForCausalLM"]}))
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=0)


def test_invalid_shapes_are_rejected_naming_the_field():
    base = preset("tiny")
    with pytest.raises(ValueError, match="num_heads .* must be a multiple of num_kv_heads"):
        ModelConfig(**{**{f: getattr(base, f) for f in base.__dataclass_fields__}, "num_kv_heads": 3})
    with pytest.raises(ValueError, match="mlp_bias"):
        ModelConfig.from_hf({**LLAMA_32_1B, "mlp_bias": True})
    assert RopeScaling(rope_type="linear", factor=2.0).factor == 2.0


def test_a_donated_kv_handle_is_spent():
    kv = KVPool.allocate(preset("tiny"), 3, 4, torch.float32, "cpu")
    layers = kv.take()
    fresh = KVPool(layers)
    with pytest.raises(SpentHandleError):
        kv.take()
    with pytest.raises(SpentHandleError):
        _ = kv.num_pages
    assert fresh.num_pages == 3 and fresh.page_size == 4
