"""Checkpoint loading: formats, dtypes, presets, and clear errors for bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmfx.presets import PRESETS
from llmfx.weights import load_params, resolve_model


def _copy(path, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(path, target)
    return target


def test_sharded_checkpoint_loads_the_same_params_as_a_single_file(hf_checkpoint, tmp_path):
    model, path = hf_checkpoint("qwen2")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    single = load_params(resolve_model(path), dtype="float32")
    sharded = load_params(resolve_model(tmp_path / "sharded"), dtype="float32")
    torch.testing.assert_close(single, sharded, rtol=0, atol=0)


@pytest.mark.parametrize(("dtype", "expected"), [("bf16", torch.bfloat16), ("float16", torch.float16),
                                                  ("fp32", torch.float32), ("auto", torch.float32)])
def test_dtype_names_load_to_that_dtype(hf_checkpoint, dtype, expected):
    _, path = hf_checkpoint("llama")
    params = load_params(resolve_model(path), dtype=dtype)
    assert params["embed"].dtype == expected and params["layers"][0]["wqkv"].dtype == expected
    assert params["rope"].dtype == torch.float32  # angles stay exact whatever the weights' dtype


def test_tied_embeddings_share_one_tensor(hf_checkpoint):
    _, path = hf_checkpoint("llama-tied")
    params = load_params(resolve_model(path))
    assert params["lm_head"] is params["embed"]


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_resolve_to_their_config_without_a_checkpoint(name):
    source = resolve_model(name)
    assert source.path is None and source.config == PRESETS[name]


def test_dummy_weights_are_reproducible_from_the_seed():
    a = load_params(resolve_model("tiny"), seed=7)
    b = load_params(resolve_model("tiny"), seed=7)
    c = load_params(resolve_model("tiny"), seed=8)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a["embed"], c["embed"])


def test_load_format_dummy_ignores_checkpoint_values_but_keeps_shapes(hf_checkpoint):
    _, path = hf_checkpoint("qwen3")
    real = load_params(resolve_model(path))
    dummy = load_params(resolve_model(path), load_format="dummy")
    assert real["layers"][0]["q_norm"].shape == dummy["layers"][0]["q_norm"].shape
    assert not torch.equal(real["embed"], dummy["embed"])


def test_missing_path_says_what_was_looked_for():
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        resolve_model("/no/such/model/dir")


def test_uncached_hub_id_explains_how_to_provide_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache.*huggingface-cli download"):
        resolve_model("nobody-llmfx/not-a-model")


def test_unsupported_architecture_lists_the_supported_ones(hf_checkpoint, tmp_path):
    _, path = hf_checkpoint("llama")
    target = _copy(path, tmp_path)
    config = json.loads((target / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported architecture.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        resolve_model(target)


def test_missing_tensor_is_named(hf_checkpoint, tmp_path):
    _, path = hf_checkpoint("llama")
    target = _copy(path, tmp_path)
    tensors = load_file(target / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, target / "model.safetensors")
    with pytest.raises(ValueError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        load_params(resolve_model(target))


def test_wrong_shape_is_named(hf_checkpoint, tmp_path):
    _, path = hf_checkpoint("llama")
    target = _copy(path, tmp_path)
    tensors = load_file(target / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, target / "model.safetensors")
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.k_proj.weight' has shape \(3, 3\)"):
        load_params(resolve_model(target))


def test_unknown_dtype_preset_and_load_format_are_rejected():
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        load_params(resolve_model("tiny"), dtype="float8")
    with pytest.raises(FileNotFoundError, match="tiny"):
        resolve_model("tiny-llama-typo")
    with pytest.raises(ValueError, match="load_format must be one of auto, dummy"):
        load_params(resolve_model("tiny"), load_format="pickle")


def test_rope_types_without_support_are_refused(hf_checkpoint, tmp_path):
    _, path = hf_checkpoint("llama")
    target = _copy(path, tmp_path)
    config = json.loads((target / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="rope scaling type 'yarn' is not supported"):
        resolve_model(target)
