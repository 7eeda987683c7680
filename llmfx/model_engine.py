"""ModelEngine: the host/device boundary. Packs a scheduled batch, runs the model and the sampler."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from llmfx.batch import pack
from llmfx.config import ModelConfig
from llmfx.kv_pool import KVPool
from llmfx.models import Params, forward
from llmfx.sampler import SamplingTensors, request_seed, sample
from llmfx.scheduler import Request, ScheduledBatch


class StepFailed(RuntimeError):
    """A step raised; `kv` is the live pool handle to continue with, `__cause__` the original error."""

    def __init__(self, kv: KVPool, cause: Exception) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.kv = kv


class ModelEngine:
    """Runs one step: ScheduledBatch in, sampled token per sampling sequence out."""

    def __init__(self, params: Params, cfg: ModelConfig, *, page_size: int, seed: int) -> None:
        self.params = params
        self.cfg = cfg
        self.page_size = page_size
        self.seed = seed
        self.device = params["embed"].device

    def execute(self, kv: KVPool, batch: ScheduledBatch,
                requests: Mapping[int, Request]) -> tuple[KVPool, dict[int, int]]:
        """Run the batch; kv is DONATED. On failure raises StepFailed holding the live handle."""
        layers = kv.take()
        try:
            with torch.inference_mode():
                inputs = pack(batch.seqs, self.page_size, self.device)
                logits = forward(self.params, self.cfg, inputs, layers)  # [B, V]
                params = [requests[s.request_id].params for s in batch.seqs]
                seeds = [request_seed(p.seed, self.seed, s.request_id) for p, s in zip(params, batch.seqs)]
                positions = [s.start_pos + len(s.token_ids) for s in batch.seqs]
                tokens_gpu = sample(logits, SamplingTensors.build(params, seeds, positions, self.device))
                tokens_host = tokens_gpu.cpu()  # the step's one synchronization point
        except Exception as err:
            # The pool is intact apart from this batch's rows, whose requests the caller fails.
            raise StepFailed(KVPool(layers), err) from err
        return KVPool(layers), {s.request_id: int(t) for s, t in zip(batch.seqs, tokens_host) if s.sample}
