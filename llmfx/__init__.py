"""llmfx: an LLM inference runtime for researchers."""

from llmfx.kv_cache import KvCacheConfig
from llmfx.llm import LLM, RequestHandle
from llmfx.outputs import CompletionOutput, RequestOutput
from llmfx.sampling_params import SamplingParams
from llmfx.scheduler import SchedulerConfig

__all__ = ["LLM", "CompletionOutput", "KvCacheConfig", "RequestHandle", "RequestOutput", "SamplingParams",
           "SchedulerConfig"]
