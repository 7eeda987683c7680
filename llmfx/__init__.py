"""llmfx: an LLM inference runtime for researchers."""

from llmfx.sampling_params import SamplingParams

__all__ = ["SamplingParams"]
