"""Names of the dtypes llmfx runs in."""

from __future__ import annotations

import torch

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """A dtype from its name ('bf16', 'float16', ...) or a torch.dtype we support."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise ValueError(f"dtype {name} is not supported: use one of float32, float16, bfloat16")
        return name
    try:
        return DTYPES[str(name).removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}: use 'auto' or one of {', '.join(DTYPES)}") from None


def resolve_dtype(requested: str | torch.dtype, config_dtype: str) -> torch.dtype:
    """'auto' takes the checkpoint's dtype; anything else must name a supported dtype."""
    if requested == "auto":
        return parse_dtype(config_dtype) if config_dtype in DTYPES else torch.float32
    return parse_dtype(requested)
