"""Named model shapes: the embedded default `tiny`, and real shapes for benchmarks with dummy weights."""

from __future__ import annotations

from llmfx.config import ModelConfig, RopeScaling

# Byte-level tokenizer ids: 256 bytes, then <s>, </s>, <pad> (see tokenizer.ByteTokenizer).
_BYTE_VOCAB = 320
_BYTE_BOS, _BYTE_EOS = 256, 257

PRESETS: dict[str, ModelConfig] = {
    # A small Llama with random weights from a fixed seed: runs anywhere, offline; its text is noise.
    "tiny": ModelConfig(
        family="llama", vocab_size=_BYTE_VOCAB, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=32, intermediate_size=256, rms_norm_eps=1e-5, max_position_embeddings=2048,
        bos_token_id=_BYTE_BOS, eos_token_ids=(_BYTE_EOS,), dtype="float32",
    ),
    "tinyllama-1.1b": ModelConfig(
        family="llama", vocab_size=32000, hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=4,
        head_dim=64, intermediate_size=5632, rms_norm_eps=1e-5, max_position_embeddings=2048,
        bos_token_id=1, eos_token_ids=(2,), dtype="bfloat16",
    ),
    "llama-3.2-1b": ModelConfig(
        family="llama", vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8,
        head_dim=64, intermediate_size=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=RopeScaling(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192),
        tie_word_embeddings=True, max_position_embeddings=131072, bos_token_id=128000,
        eos_token_ids=(128001,), dtype="bfloat16",
    ),
    "qwen3-0.6b": ModelConfig(
        family="qwen3", vocab_size=151936, hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8,
        head_dim=128, intermediate_size=3072, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=True, qk_norm=True, max_position_embeddings=40960, bos_token_id=151643,
        eos_token_ids=(151645,), dtype="bfloat16",
    ),
    "llama-3-8b": ModelConfig(
        family="llama", vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
        head_dim=128, intermediate_size=14336, rms_norm_eps=1e-5, rope_theta=500000.0,
        max_position_embeddings=8192, bos_token_id=128000, eos_token_ids=(128001,), dtype="bfloat16",
    ),
}


def preset(name: str) -> ModelConfig:
    """The ModelConfig of a named preset."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}") from None
