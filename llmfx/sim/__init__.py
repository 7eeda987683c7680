"""llmfx.sim: a discrete-event simulator that runs the engine's own scheduler with a step-time cost model.

    from llmfx.sim import SimConfig, poisson, simulate
    result = simulate(poisson(200, rate=20.0), SimConfig.build(policy="max_utilization", kv_tokens=65536))
    result.summary(); result.to_pandas("requests"); result.to_pandas("steps")

Nothing here needs a GPU or pandas; `llmfx.sim.profile` (which imports torch and the engine) measures
a cost model on real hardware, and `llmfx.sim.validate` compares the simulator with the engine.
"""

from llmfx.sim.arrivals import SimRequest, all_at_once, bursty, load_trace, poisson, save_trace
from llmfx.sim.cost_model import (
    BatchShape,
    CostModel,
    StepSample,
    cost_model_from_json,
    default_cost_model,
    fit_cost_model,
    fit_overlap_cost_model,
    load_cost_model,
    save_cost_model,
)
from llmfx.sim.metrics import RequestRecord, SimResult, StepRecord, percentile
from llmfx.sim.simulator import SimConfig, fake_token, simulate, to_request

__all__ = [
    "BatchShape", "CostModel", "RequestRecord", "SimConfig", "SimRequest", "SimResult", "StepRecord", "StepSample",
    "all_at_once", "bursty", "cost_model_from_json", "default_cost_model", "fake_token", "fit_cost_model",
    "fit_overlap_cost_model",
    "load_cost_model", "load_trace", "percentile", "poisson", "save_cost_model", "save_trace", "simulate",
    "to_request",
]
