"""Checkpoints to params: Hugging Face safetensors directories, hub ids from the local cache, dummy weights.

Tensors are read straight onto the target device and cast once; fused projections (q|k|v and
gate|up) are concatenated there, so no second copy of the model is ever held.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open
from torch import Tensor

from llmfx.config import ModelConfig
from llmfx.dtypes import resolve_dtype
from llmfx.models import Params
from llmfx.ops import rope_table
from llmfx.presets import PRESETS, preset

LOAD_FORMATS = ("auto", "dummy")


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSource:
    """Where a model comes from: a checkpoint directory, or a preset (shape only, dummy weights)."""

    name: str
    path: Path | None  # None for presets
    config: ModelConfig


def resolve_model(model: str | Path) -> ModelSource:
    """A preset name, a local checkpoint directory, or a hub id found in the local Hugging Face cache."""
    name = str(model)
    if name in PRESETS:
        return ModelSource(name=name, path=None, config=preset(name))
    path = Path(name).expanduser()
    if path.is_dir():
        return ModelSource(name=name, path=path, config=ModelConfig.from_pretrained(path))
    if path.exists():
        raise ValueError(f"model path {name!r} is a file: pass the checkpoint directory holding config.json")
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        cached = _hub_cache_dir(name)
        return ModelSource(name=name, path=cached, config=ModelConfig.from_pretrained(cached))
    raise FileNotFoundError(
        f"model {name!r} is neither a preset ({', '.join(PRESETS)}) nor an existing directory "
        f"nor a Hugging Face hub id of the form 'org/name'"
    )


def _hub_cache_dir(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE

    try:
        # local_files_only: never download behind the user's back; the error below says how to.
        return Path(snapshot_download(repo_id, local_files_only=True,
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as err:  # huggingface_hub raises several types for "not cached"
        raise FileNotFoundError(
            f"model {repo_id!r} is not in the local Hugging Face cache ({HF_HUB_CACHE}). On a machine with "
            f"internet run `huggingface-cli download {repo_id}` (or set HF_HOME to a cache that has it), "
            f"or pass the path of a local checkpoint directory with config.json and *.safetensors"
        ) from err


def load_params(source: ModelSource, *, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu",
                load_format: str = "auto", seed: int = 0, max_positions: int | None = None) -> Params:
    """The params pytree of a model source on `device`, in `dtype`; rope table up to max_positions."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {load_format!r}")
    cfg = source.config
    target = resolve_dtype(dtype, cfg.dtype)
    if source.path is None or load_format == "dummy":
        params = dummy_params(cfg, dtype=target, device=device, seed=seed)
    else:
        params = _assemble(cfg, _checkpoint_reader(source.path, device), target)
    params["rope"] = rope_table(cfg, max_positions or cfg.max_position_embeddings, device)
    return params


def dummy_params(cfg: ModelConfig, *, dtype: torch.dtype, device: str | torch.device, seed: int) -> Params:
    """Random weights of the config's shapes from a fixed seed (throughput does not depend on values)."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def read(name: str, shape: tuple[int, ...]) -> Tensor:
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=dtype, device=device)
        fan_in = shape[-1]
        weight = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        return weight.mul_(fan_in**-0.5).to(dtype)

    return _assemble(cfg, read, dtype)


Reader = Callable[[str, tuple[int, ...]], Tensor]


def _checkpoint_reader(path: Path, device: str | torch.device) -> Reader:
    """A function from (HF tensor name, expected shape) to the tensor, checked, on `device`."""
    locations = dict(_tensor_files(path))

    def read(name: str, shape: tuple[int, ...]) -> Tensor:
        if name not in locations:
            raise ValueError(f"checkpoint {path} is missing tensor {name!r}")
        with safe_open(str(locations[name]), framework="pt", device=str(device)) as f:
            tensor = f.get_tensor(name)
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"checkpoint {path}: tensor {name!r} has shape {tuple(tensor.shape)}, the config needs {shape}"
            )
        return tensor

    return read


def _tensor_files(path: Path) -> Iterator[tuple[str, Path]]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        for name, file in json.loads(index.read_text())["weight_map"].items():
            yield name, path / file
        return
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}: llmfx loads safetensors checkpoints only")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, file


def _assemble(cfg: ModelConfig, read: Reader, dtype: torch.dtype) -> Params:
    """Read every tensor the config needs under its Hugging Face name and fuse q|k|v and gate|up."""
    hidden, inter = cfg.hidden_size, cfg.intermediate_size

    def get(name: str, *shape: int) -> Tensor:
        return read(name, shape).to(dtype)

    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        attn = p + "self_attn."
        layer = {
            "attn_norm": get(p + "input_layernorm.weight", hidden),
            "wqkv": torch.cat([get(attn + "q_proj.weight", cfg.q_size, hidden),
                               get(attn + "k_proj.weight", cfg.kv_size, hidden),
                               get(attn + "v_proj.weight", cfg.kv_size, hidden)]),
            "wo": get(attn + "o_proj.weight", hidden, cfg.q_size),
            "mlp_norm": get(p + "post_attention_layernorm.weight", hidden),
            "w_gate_up": torch.cat([get(p + "mlp.gate_proj.weight", inter, hidden),
                                    get(p + "mlp.up_proj.weight", inter, hidden)]),
            "w_down": get(p + "mlp.down_proj.weight", hidden, inter),
        }
        if cfg.attention_bias:
            layer["bqkv"] = torch.cat([get(attn + "q_proj.bias", cfg.q_size), get(attn + "k_proj.bias", cfg.kv_size),
                                       get(attn + "v_proj.bias", cfg.kv_size)])
        if cfg.o_bias:
            layer["bo"] = get(attn + "o_proj.bias", hidden)
        if cfg.qk_norm:
            layer["q_norm"] = get(attn + "q_norm.weight", cfg.head_dim)
            layer["k_norm"] = get(attn + "k_norm.weight", cfg.head_dim)
        layers.append(layer)
    embed = get("model.embed_tokens.weight", cfg.vocab_size, hidden)
    return {
        "embed": embed,
        "layers": tuple(layers),
        "final_norm": get("model.norm.weight", hidden),
        "lm_head": embed if cfg.tie_word_embeddings else get("lm_head.weight", cfg.vocab_size, hidden),
    }
