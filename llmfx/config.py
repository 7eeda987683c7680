"""ModelConfig: the frozen description of a decoder-only model, built from a Hugging Face config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

# Hugging Face architecture name -> llmfx family. Every family runs the one decoder in
# models/transformer.py; they differ only in the flags below and in checkpoint names.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}

ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True, slots=True, kw_only=True)
class RopeScaling:
    """Rotary scaling: 'linear' divides positions by factor; 'llama3' rescales low frequencies."""

    rope_type: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelConfig:
    """Shapes and options of one model; everything the pure forward needs besides weights."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q, k and v
    o_bias: bool = False  # bias on the attention output projection
    qk_norm: bool = False
    sliding_window: int | None = None
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.family not in ARCHITECTURES.values():
            raise ValueError(f"ModelConfig.family must be one of {sorted(set(ARCHITECTURES.values()))}, got {self.family!r}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"ModelConfig.sliding_window must be None or >= 1, got {self.sliding_window}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V one token occupies across all layers, at the model dtype."""
        from llmfx.dtypes import parse_dtype

        itemsize = parse_dtype(self.dtype).itemsize
        return 2 * self.num_layers * self.kv_size * itemsize

    @staticmethod
    def from_hf(hf: Mapping[str, Any]) -> ModelConfig:
        """Translate a Hugging Face config dict (transformers 4.x or 5.x layout)."""
        architectures = hf.get("architectures") or []
        arch = next((a for a in architectures if a in ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"unsupported architecture {architectures or hf.get('model_type')!r}: llmfx supports "
                f"{', '.join(ARCHITECTURES)}"
            )
        family = ARCHITECTURES[arch]
        if hf.get("mlp_bias"):
            raise ValueError("config.json sets mlp_bias=True: llmfx supports MLPs without bias only")
        num_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        theta, scaling = _rope_from_hf(hf)
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return ModelConfig(
            family=family,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            intermediate_size=hf["intermediate_size"],
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v bias and never an output bias; the others say so in attention_bias.
            attention_bias=family == "qwen2" or bool(hf.get("attention_bias", False)),
            o_bias=family != "qwen2" and bool(hf.get("attention_bias", False)),
            qk_norm=family == "qwen3",
            sliding_window=_sliding_window_from_hf(family, hf),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            dtype=str(hf.get("dtype") or hf.get("torch_dtype") or "float32").removeprefix("torch."),
        )

    @staticmethod
    def from_pretrained(path: str | Path) -> ModelConfig:
        """Read `config.json` from a checkpoint directory."""
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"no config.json in {path}: a model directory needs a Hugging Face config.json")
        return ModelConfig.from_hf(json.loads(config_file.read_text()))


def _rope_from_hf(hf: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    # transformers 5 nests theta and scaling in rope_parameters; 4.x and most hub configs use
    # top-level rope_theta and rope_scaling.
    params = dict(hf.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = dict(hf.get("rope_scaling") or params)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope scaling type {rope_type!r} is not supported: llmfx supports {', '.join(ROPE_TYPES)}")
    fields = {k: scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                      "original_max_position_embeddings") if k in scaling}
    return theta, RopeScaling(rope_type=rope_type, **fields)


def _sliding_window_from_hf(family: str, hf: Mapping[str, Any]) -> int | None:
    window = hf.get("sliding_window")
    if family in ("qwen2", "qwen3"):
        if not hf.get("use_sliding_window", False):
            return None
        if hf.get("max_window_layers", hf["num_hidden_layers"]) < hf["num_hidden_layers"]:
            raise ValueError("Qwen sliding window on only some layers (max_window_layers) is not supported")
    return window
