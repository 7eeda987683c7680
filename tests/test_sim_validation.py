"""The simulator's validation against the engine (llmfx.sim.validate, benchmarks/sim_validation.py), on CPU."""

from __future__ import annotations

import json
import runpy
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import llmfx.llm
from llmfx.executor import ExecutorConfig, ExecutorState
from llmfx.kv_cache import KvCacheConfig, new_page_pool
from llmfx.kv_pool import KVPool
from llmfx.model_engine import Collected, SampledToken
from llmfx.scheduler import SchedulerConfig, SchedulerLimits, new_scheduler_state
from llmfx.sim import BatchShape, load_cost_model
from llmfx.sim.validate import Figures, summary_lines, validate
from llmfx.startup import EngineParts

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "sim_validation.py"


def test_figures_worked_by_hand():
    f = Figures.of([(10.0, 12.0, 30), (11.0, 14.0, 10)])
    assert (f.num_requests, f.output_tokens, f.duration_s) == (2, 40, 4.0)
    assert (f.output_tok_per_s, f.mean_latency_s, f.requests_per_s) == (10.0, 2.5, 0.5)


def test_the_script_runs_the_whole_pipeline_on_the_tiny_model(tmp_path, monkeypatch, capsys):
    argv = ["sim_validation.py", "--model", "tiny", "--device", "cpu", "--out", str(tmp_path), "--num-requests", "6",
            "--lengths", "8:24", "--no-warmup", "--batch-sizes", "1,3", "--context-lens", "16",
            "--prefill-lens", "16,40", "--decode-steps", "2"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert done.value.code in (0, 1)  # 1: a figure missed the tolerance (CPU timings are noisy)
    report = json.loads((tmp_path / "sim_validation.json").read_text())
    assert report["format"] == "llmfx-sim-validation" and report["model"] == "tiny"
    assert {"machine", "torch", "engine", "cost_model", "workloads", "passed", "timings_s"} <= set(report)
    assert report["engine"]["overlap"] is True and report["engine"]["prefix_cache"] is False
    assert set(report["workloads"]) == {"offline", "poisson"}
    for w in report["workloads"].values():
        assert w["engine"]["num_requests"] == w["sim"]["num_requests"] == w["definition"]["num_requests"] == 6
        assert w["engine"]["output_tokens"] == w["sim"]["output_tokens"]  # every request ran to its length
        for side in ("engine", "sim"):
            assert w[side]["output_tok_per_s"] > 0 and w[side]["mean_latency_s"] > 0
        assert set(w["relative_error"]) == set(w["pass"]) == {"output_tok_per_s", "mean_latency_s"}
        assert w["diagnostics"]["engine_steps"] > 0 and w["diagnostics"]["sim_steps"] > 0
    assert report["workloads"]["poisson"]["definition"]["rate_per_s"] == pytest.approx(
        0.7 * report["workloads"]["offline"]["engine"]["requests_per_s"])
    cost = load_cost_model(tmp_path / "profile.json")  # a drop-in for llmfx/sim/profile_default.json
    assert cost.meta["source"] == "measured by llmfx profile"
    assert cost.meta["kv_tokens"] == report["engine"]["kv_tokens"]
    steps = json.loads((tmp_path / "served_steps.json").read_text())
    assert len(steps["offline"]) == report["workloads"]["offline"]["diagnostics"]["engine_steps"]
    out = capsys.readouterr().out
    assert "offline   output_tok_per_s" in out and "poisson   mean_latency_s" in out


# --- a device with known step times: the pipeline must reproduce it ---


@dataclass(frozen=True)
class _InFlight:
    batch: object
    ready_at: float


class _AsyncDevice:
    """A ModelEngine stand-in: launch sleeps its host time and queues the step; collect waits until it is done.

    Steps run one after another on the 'device', each device_s long, from when it is launched or the
    previous one ends, as on a GPU stream.
    """

    def __init__(self, device_s, launch_s):
        self.device_s, self.launch_s = device_s, launch_s
        self.engine_cfg = SimpleNamespace(buckets=None)
        self.device = torch.device("cpu")
        self._free = 0.0

    def warmup(self, kv):
        return kv

    def launch(self, kv, batch, sequences):
        time.sleep(self.launch_s(BatchShape.of(batch)))
        start = max(time.perf_counter(), self._free)
        self._free = start + self.device_s(BatchShape.of(batch))
        return kv, _InFlight(batch=batch, ready_at=self._free)

    def collect(self, inflight):
        time.sleep(max(inflight.ready_at - time.perf_counter(), 0.0))
        ids = [s.request_id for s in inflight.batch.seqs if s.sample]
        return Collected(sampled={rid: SampledToken(token=5, logprob=0.0, rank=1) for rid in ids},
                         tokens=dict.fromkeys(ids, 5), candidates={})


def test_the_pipeline_reproduces_an_asynchronous_device_with_known_step_times(monkeypatch):
    # Device-bound, as the compiled engine is on a GPU: 20 ms a step plus some per token and sequence,
    # long enough that the loop's own Python stays hidden on a busy 2-core machine.
    device = _AsyncDevice(lambda s: 2e-2 + 2e-5 * s.prefill_tokens + 2e-4 * s.decode_seqs,
                          lambda s: 2e-4 + 1e-5 * s.decode_seqs + 1e-7 * s.prefill_tokens)

    def build(source, *, max_batch_size, max_num_tokens, max_seq_len, kv_cache_config,
              scheduler_config, overlap, **_):
        kv = kv_cache_config or KvCacheConfig()
        limits = SchedulerLimits(max_batch_size=max_batch_size, max_num_tokens=max_num_tokens,
                                 max_seq_len=max_seq_len, page_size=kv.page_size)
        state = ExecutorState(sched=new_scheduler_state(new_page_pool(2049, kv.page_size, kv.enable_block_reuse)),
                              kv=KVPool.allocate(source.config, 2, kv.page_size, torch.float32, "cpu"))
        cfg = ExecutorConfig(limits=limits, scheduler=scheduler_config or SchedulerConfig(), overlap=overlap)
        return EngineParts(state=state, engine=device, cfg=cfg, num_pages=2049, timings={})

    monkeypatch.setattr(llmfx.llm, "build_engine", build)
    with llmfx.llm.LLM("tiny", skip_tokenizer_init=True, max_seq_len=128, max_batch_size=16,
                       kv_cache_config=KvCacheConfig(enable_block_reuse=False)) as llm:
        report, cost, _ = validate(llm, model="fake", num_requests=16, lengths=(8, 40), poisson_requests=16,
                                   warmup=False, grid=dict(batch_sizes=(1, 4, 16), context_lens=(16, 64),
                                                           prefill_lens=(16, 128), decode_steps=4))
    assert cost.meta["device_bound_points"] > 0 and cost.c0 == pytest.approx(2e-2, rel=0.1)
    # Within 1% on a loaded 2-core machine; simulating without overlap is 4% off the Poisson latency.
    for name, w in report["workloads"].items():
        for metric, error in w["relative_error"].items():
            assert abs(error) < 0.03, (name, metric, summary_lines(report))
