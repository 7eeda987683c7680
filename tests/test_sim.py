"""llmfx.sim: the simulator makes the engine's scheduling decisions; cost model, arrivals, metrics, CLI."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmfx.scheduler import Plan, ScheduledBatch, ScheduledSeq, SchedulerConfig
from llmfx.sim import (
    BatchShape,
    CostModel,
    SimConfig,
    SimRequest,
    all_at_once,
    bursty,
    default_cost_model,
    fit_cost_model,
    load_cost_model,
    load_trace,
    poisson,
    save_cost_model,
    save_trace,
    simulate,
)
from llmfx.sim.cost_model import StepSample, fit_overlap_cost_model
from llmfx.sim.cli import add_profile_parser, add_simulate_parser

UNIT = CostModel.constant(1.0)


def seq(rid, n, start, sample=True):
    return ScheduledSeq(request_id=rid, token_ids=(1,) * n, start_pos=start, pages=(1,), sample=sample)


# --- the simulator and the engine agree ---


def _engine_batches(policy, arrivals, *, kv_tokens, overlap, page_size=4, stops=None):
    """Drive executor.step by hand with the tiny model; arrivals maps step index -> [(rid, prompt, max_tokens)].

    stops maps request id -> stop token ids. Returns every step's batch (empty ones included), the
    limits, the pool size and each request's output tokens.
    """
    from llmfx.executor import AddRequest
    from llmfx.sampling_params import SamplingParams
    from llmfx.scheduler import Request
    from llmfx.sim.profile import build_engine

    e = build_engine("tiny", device="cpu", kv_tokens=kv_tokens, page_size=page_size, max_batch_size=4,
                     max_num_tokens=16, max_seq_len=128, scheduler=SchedulerConfig(capacity_scheduler_policy=policy),
                     overlap=overlap)
    batches, k, last, tokens = [], 0, max(arrivals), {}
    while True:
        inbox = [AddRequest(Request(request_id=rid, prompt_token_ids=prompt, eos_token_ids=frozenset({257}),
                                    params=SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True,
                                                          stop_token_ids=(stops or {}).get(rid, ()),
                                                          detokenize=False)))
                 for rid, prompt, n in arrivals.get(k, ())]
        out = e.step(inbox)
        assert not out.errors
        batches.append(out.batch)
        for event in out.events:
            tokens.setdefault(event.request_id, []).extend(event.new_token_ids)
        k += 1
        if k > last and not e.has_pending_work:
            return batches, e.cfg.limits, e.state.sched.pool.num_pages, tokens


def _key(batch):
    return ([(s.request_id, len(s.token_ids), s.start_pos, s.pages, s.sample) for s in batch.seqs], batch.preempted)


def _sim_time_of_step(batches, k, overlap):
    """When the simulator with unit step costs starts engine step k: one unit per batch collected before it."""
    collected = batches[: max(k - 1, 0)] if overlap else batches[:k]  # with overlap step j collects batch j-1
    return float(sum(1 for b in collected if b.seqs))


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("policy,kv_tokens", [("guaranteed_no_evict", 64), ("max_utilization", 64)])
def test_simulator_schedules_exactly_like_the_engine(policy, kv_tokens, overlap):
    shared = tuple(range(40, 52))  # a shared prefix: prefix-cache hits must match too
    arrivals = {0: [(0, tuple(range(1, 22)), 9), (1, shared + (5, 6), 12), (2, (7,) * 5, 14)],
                3: [(3, shared + (8,), 6)], 6: [(4, tuple(range(60, 90)), 5), (5, (9, 9, 9), 10)]}
    engine, limits, num_pages, _ = _engine_batches(policy, arrivals, kv_tokens=kv_tokens, overlap=overlap)
    times = {k: _sim_time_of_step(engine, k, overlap) for k in arrivals}
    # Each arrival must enter at its own step, not one that starts at the same simulated time.
    assert all(k == 0 or _sim_time_of_step(engine, k - 1, overlap) < times[k] for k in arrivals)
    sim_requests = [SimRequest(request_id=rid, arrival_time=times[k], prompt_len=len(p), output_len=n,
                               prompt_token_ids=p) for k, rs in arrivals.items() for rid, p, n in rs]
    cfg = SimConfig(limits=limits, scheduler=SchedulerConfig(capacity_scheduler_policy=policy), num_pages=num_pages,
                    overlap=overlap)
    result = simulate(sim_requests, cfg, UNIT, keep_batches=True)
    sim = [b for b in result.batches if b.seqs or b.preempted]
    engine = [b for b in engine if b.seqs or b.preempted]
    assert [_key(b) for b in sim] == [_key(b) for b in engine]
    assert any(s.start_pos > 0 and len(s.token_ids) > 1 for b in engine for s in b.seqs)  # a prefix hit happened
    if policy == "max_utilization":
        assert any(b.preempted for b in engine)  # the pool is small enough to force preemption


@pytest.mark.parametrize("overlap", [False, True])
def test_a_request_ended_by_a_stop_token_is_simulated_with_the_engines_extra_step(overlap):
    prompts = {0: tuple(range(1, 22)), 1: tuple(range(30, 39))}
    free = _engine_batches("guaranteed_no_evict", {0: [(0, prompts[0], 12), (1, prompts[1], 12)]}, kv_tokens=256,
                           overlap=overlap)[3][0]
    k = next(i for i in range(3, 12) if free[i] not in free[:i])  # stop on a token seen first at output k
    arrivals = {0: [(0, prompts[0], 12), (1, prompts[1], 12)]}
    engine, limits, num_pages, tokens = _engine_batches("guaranteed_no_evict", arrivals, kv_tokens=256,
                                                        overlap=overlap, stops={0: (free[k],)})
    assert tokens[0] == free[: k + 1]
    cfg = SimConfig(limits=limits, num_pages=num_pages, overlap=overlap)
    sim_requests = [SimRequest(request_id=0, arrival_time=0.0, prompt_len=21, output_len=k + 1, max_tokens=12,
                               prompt_token_ids=prompts[0]),
                    SimRequest(request_id=1, arrival_time=0.0, prompt_len=9, output_len=12,
                               prompt_token_ids=prompts[1])]
    result = simulate(sim_requests, cfg, UNIT, keep_batches=True)
    assert [_key(b) for b in result.batches if b.seqs] == [_key(b) for b in engine if b.seqs]
    steps_with_0 = sum(1 for b in engine if any(s.request_id == 0 for s in b.seqs))
    # Two prefill chunks (16 + 5 tokens), k decodes and, with overlap, one more whose token is dropped.
    assert steps_with_0 == 2 + k + overlap
    assert [(r.finish_reason, r.num_output_tokens) for r in result.requests] == [("stop", k + 1), ("length", 12)]


# --- timeline and metrics ---


def test_single_request_timeline_worked_by_hand():
    # prompt 8 in chunks of 4: steps [0,1) and [1,2) (first token at 2), then decodes end at 3 and 4.
    cfg = SimConfig.build(max_num_tokens=4, max_seq_len=64, kv_tokens=64, page_size=4)
    (r,) = simulate([SimRequest(request_id=7, arrival_time=0.0, prompt_len=8, output_len=3)], cfg, UNIT).requests
    assert (r.ttft, r.tpot, r.e2e, r.num_output_tokens, r.finish_reason) == (2.0, 1.0, 4.0, 3, "length")


def test_with_overlap_a_request_arriving_mid_step_gets_its_first_token_one_step_later():
    # Unit steps. A decodes from t=0; C arrives at 0.5 and enters the step scheduled at t=1. Without
    # overlap that step runs [1, 2). With overlap it is launched at t=1 but runs after the batch
    # in flight, [2, 3), exactly as the device would run it.
    reqs = [SimRequest(request_id=0, arrival_time=0.0, prompt_len=4, output_len=6),
            SimRequest(request_id=1, arrival_time=0.5, prompt_len=4, output_len=2)]
    ttft = {}
    for overlap in (False, True):
        cfg = SimConfig.build(max_seq_len=64, kv_tokens=256, page_size=4, disable_overlap_scheduler=not overlap)
        a, c = simulate(reqs, cfg, UNIT).requests
        ttft[overlap] = c.ttft
        assert (a.ttft, a.e2e) == (1.0, 6.0)  # alone on the device, A's tokens come at the same times
    assert ttft == {False: 1.5, True: 2.5}


def test_with_overlap_a_launch_after_idling_takes_no_time_until_collected():
    cfg = SimConfig.build(max_seq_len=64, kv_tokens=256, page_size=4)
    assert cfg.overlap  # the engine's default
    result = simulate([SimRequest(request_id=0, arrival_time=3.0, prompt_len=8, output_len=3)], cfg, UNIT)
    (r,) = result.requests
    assert (r.first_token_time, r.finish_time) == (4.0, 6.0)
    assert [(s.start_time, s.duration, s.prefill_tokens, s.decode_seqs) for s in result.steps] == [
        (3.0, 1.0, 8, 0), (4.0, 1.0, 0, 1), (5.0, 1.0, 0, 1)]  # one record per batch, when the device runs it


def test_idle_time_is_skipped_and_latency_counts_from_arrival():
    cfg = SimConfig.build(max_seq_len=64, kv_tokens=256, page_size=4)
    reqs = [SimRequest(request_id=0, arrival_time=0.0, prompt_len=4, output_len=2),
            SimRequest(request_id=1, arrival_time=100.0, prompt_len=4, output_len=2)]
    result = simulate(reqs, cfg, UNIT)
    assert [(r.ttft, r.e2e) for r in result.requests] == [(1.0, 2.0), (1.0, 2.0)]
    assert result.requests[1].finish_time == 102.0 and len(result.steps) == 4


def test_guaranteed_no_evict_never_preempts_and_max_utilization_does_under_pressure():
    reqs = all_at_once(24, prompt_len=(8, 40), output_len=(20, 60), seed=1)
    runs = {p: simulate(reqs, SimConfig.build(policy=p, max_seq_len=128, kv_tokens=512, page_size=8), UNIT)
            for p in ("guaranteed_no_evict", "max_utilization")}
    for result in runs.values():
        assert all(r.finish_reason == "length" and r.num_output_tokens == r.output_len for r in result.requests)
        assert all(0.0 <= s.kv_usage <= 1.0 for s in result.steps)
    assert runs["guaranteed_no_evict"].summary()["preemptions"] == 0
    assert runs["max_utilization"].summary()["preemptions"] > 0
    assert sum(r.num_preemptions for r in runs["max_utilization"].requests) == runs["max_utilization"].summary()["preemptions"]


def test_abort_time_ends_a_request_through_the_scheduler():
    cfg = SimConfig.build(max_seq_len=256, kv_tokens=1024, page_size=4)
    reqs = [SimRequest(request_id=0, arrival_time=0.0, prompt_len=4, output_len=100, abort_time=5.5),
            SimRequest(request_id=1, arrival_time=0.0, prompt_len=4, output_len=10)]
    a, b = simulate(reqs, cfg, UNIT).requests
    assert (a.finish_reason, a.finish_time, a.num_output_tokens) == ("abort", 6.0, 6)
    assert (b.finish_reason, b.num_output_tokens) == ("length", 10)


def test_summary_throughput_and_tables():
    reqs = poisson(30, 50.0, prompt_len=16, output_len=(4, 12), seed=3)
    result = simulate(reqs, SimConfig.build(max_seq_len=64, kv_tokens=4096), default_cost_model())
    s = result.summary()
    assert s["num_finished"] == 30 and s["output_tokens"] == sum(r.output_len for r in reqs)
    assert math.isclose(s["output_tok_per_s"], s["output_tokens"] / s["duration_s"])
    assert {"ttft", "tpot", "e2e", "queue_time"} <= set(result.request_rows()[0])
    assert {"kv_usage", "num_waiting", "preempted"} <= set(result.step_rows()[0])
    pd = pytest.importorskip("pandas")
    df = result.to_pandas("steps")
    assert isinstance(df, pd.DataFrame) and len(df) == len(result.steps)


def test_custom_policy_runs_in_the_simulator():
    def newest_first(state, limits):
        return Plan(admit=tuple(s.request_id for s in reversed(state.waiting)))

    cfg = SimConfig.build(policy=newest_first, max_batch_size=1, max_seq_len=64, kv_tokens=256, page_size=4)
    result = simulate(all_at_once(4, prompt_len=4, output_len=2), cfg, UNIT)
    order = sorted(result.requests, key=lambda r: r.first_scheduled_time)
    assert [r.request_id for r in order] == [3, 2, 1, 0] and result.policy == "newest_first"


def test_a_request_that_can_never_run_is_rejected_before_simulating():
    cfg = SimConfig.build(max_seq_len=16, kv_tokens=256)
    with pytest.raises(ValueError, match="request 0.*max_seq_len"):
        simulate([SimRequest(request_id=0, arrival_time=0.0, prompt_len=20, output_len=1)], cfg, UNIT)


# --- cost model ---


def test_step_time_is_the_documented_formula():
    model = CostModel(c0=1.0, c_tok=0.1, c_seq=0.01, c_ctx=0.001)
    batch = ScheduledBatch(seqs=(seq(1, 10, 0), seq(2, 1, 99), seq(3, 1, 49)))
    assert BatchShape.of(batch) == BatchShape(prefill_tokens=10, decode_seqs=2, context_tokens=10 + 100 + 50)
    assert math.isclose(model.step_time(batch), 1.0 + 0.1 * 10 + 0.01 * 2 + 0.001 * 160)
    assert model.step_time(ScheduledBatch()) == 0.0


shapes = st.builds(BatchShape, prefill_tokens=st.integers(0, 9000), decode_seqs=st.integers(0, 300),
                   context_tokens=st.integers(0, 600_000))
bucket_lists = st.lists(st.integers(1, 9000), max_size=8, unique=True).map(lambda xs: tuple(sorted(xs)))


@given(shapes, bucket_lists, bucket_lists)
def test_padding_rounds_the_rows_up_to_the_first_bucket_that_holds_them(shape, decode_buckets, token_buckets):
    padded = shape.padded(decode_buckets, token_buckets)
    assert padded.context_tokens == shape.context_tokens and padded.padded(decode_buckets, token_buckets) == padded
    if shape.prefill_tokens == 0:
        assert padded.prefill_tokens == 0
        fits = [b for b in decode_buckets if b >= shape.decode_seqs]
        assert padded.decode_seqs == (min(fits) if fits and shape.decode_seqs else shape.decode_seqs)
    else:
        rows = shape.prefill_tokens + shape.decode_seqs
        fits = [b for b in token_buckets if b >= rows]
        assert padded.decode_seqs == shape.decode_seqs
        assert padded.prefill_tokens + padded.decode_seqs == (min(fits) if fits else rows)


coefficients = st.floats(0.0, 1e-3, allow_nan=False)


@given(shapes, st.tuples(*[coefficients] * 8).filter(lambda c: sum(c) > 0), bucket_lists, bucket_lists)
def test_step_time_is_the_longer_of_device_and_host(shape, c, decode_buckets, token_buckets):
    model = CostModel(**dict(zip(("c0", "c_tok", "c_seq", "c_ctx", "h0", "h_tok", "h_seq", "h_ctx"), c)),
                      decode_buckets=decode_buckets, token_buckets=token_buckets)
    padded = shape.padded(decode_buckets, token_buckets)
    device = c[0] + c[1] * padded.prefill_tokens + c[2] * padded.decode_seqs + c[3] * padded.context_tokens
    host = c[4] + c[5] * shape.prefill_tokens + c[6] * shape.decode_seqs + c[7] * shape.context_tokens
    expected = 0.0 if shape.prefill_tokens == shape.decode_seqs == 0 else max(device, host)
    assert math.isclose(model.step_time(shape), expected, rel_tol=1e-12, abs_tol=1e-15)


def test_a_mixed_step_is_charged_for_its_padded_token_bucket():
    model = CostModel(c0=1.0, c_tok=0.01, c_seq=0.001, token_buckets=(16, 32, 64), decode_buckets=(1, 2, 4, 8))
    assert math.isclose(model.step_time(BatchShape(prefill_tokens=20, decode_seqs=3)), 1.0 + 0.01 * 29 + 0.001 * 3)
    assert math.isclose(model.step_time(BatchShape(decode_seqs=5)), 1.0 + 0.001 * 8)


def _true_overlap_samples(true, shapes):
    """What the serving loop would measure: max(device, host), waiting in collect for the difference."""
    out = []
    for shape in shapes:
        device, host = true.device_time(shape), true.host_time(shape)
        out.append(StepSample(shape=shape, seconds=max(device, host), collect_s=max(device - host, 0.0)))
    return out


def test_overlap_fit_recovers_host_and_device_terms():
    true = CostModel(c0=1.4e-3, c_tok=3e-6, c_seq=1e-6, c_ctx=4e-9, h0=3e-4, h_tok=1e-7, h_seq=1.5e-5, h_ctx=2e-9,
                     decode_buckets=(1, 2, 4, 8, 16, 64, 128, 256), token_buckets=(128, 512, 2048, 8192))
    grid = [BatchShape(decode_seqs=b, context_tokens=b * c) for b in (1, 8, 64, 256) for c in (128, 1024, 2000)]
    grid += [BatchShape(prefill_tokens=t, context_tokens=t) for t in (128, 512, 2048, 8192)]
    grid += [BatchShape(prefill_tokens=t - 100, decode_seqs=100, context_tokens=t + 90_000) for t in (512, 2048)]
    samples = _true_overlap_samples(true, grid)
    assert any(s.collect_s == 0 for s in samples) and any(s.collect_s > 0 for s in samples)  # both regimes
    fitted = fit_overlap_cost_model(samples, decode_buckets=true.decode_buckets, token_buckets=true.token_buckets)
    for k in ("h0", "h_tok", "h_seq", "h_ctx"):
        assert math.isclose(getattr(fitted, k), getattr(true, k), rel_tol=1e-6), k
    for s in samples:
        assert math.isclose(fitted.step_time(s.shape), s.seconds, rel_tol=1e-6)
    assert fitted.meta["max_relative_error"] < 1e-6 and fitted.meta["device_bound_points"] > 4


def test_overlap_fit_without_device_waits_is_a_host_model():
    samples = [StepSample(shape=BatchShape(decode_seqs=b, context_tokens=64 * b), seconds=1e-3 + 2e-5 * b)
               for b in (1, 2, 4, 8)]
    fitted = fit_overlap_cost_model(samples)
    assert (fitted.c0, fitted.c_tok, fitted.c_seq, fitted.c_ctx) == (0.0, 0.0, 0.0, 0.0)
    assert math.isclose(fitted.step_time(BatchShape(decode_seqs=16, context_tokens=1024)), 1e-3 + 2e-5 * 16,
                        rel_tol=1e-6)


def test_a_short_wait_after_a_synchronous_launch_is_not_a_device_bound_step():
    # CPU: the step's work ran in its launch (host_s), charged to the iteration before; its own
    # iteration only collected, so its charged time is short and its collect a large share of it.
    samples = [StepSample(shape=BatchShape(decode_seqs=b, context_tokens=64 * b), seconds=1e-3 + 2e-5 * b,
                          host_s=1e-3 + 2e-5 * b) for b in (1, 2, 4, 8)]
    samples.append(StepSample(shape=BatchShape(decode_seqs=8, context_tokens=512), seconds=2e-4, collect_s=1e-4,
                              host_s=1.16e-3))
    fitted = fit_overlap_cost_model(samples)
    assert fitted.meta["device_bound_points"] == 0 and fitted.c0 == 0.0


@pytest.mark.parametrize("kwargs,match", [
    (dict(seconds=0.0), "StepSample.seconds"),
    (dict(seconds=1.0, collect_s=2.0), "StepSample.collect_s"),
    (dict(seconds=1.0, collect_s=-0.1), "StepSample.collect_s"),
])
def test_bad_step_samples_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StepSample(shape=BatchShape(decode_seqs=1), **kwargs)


@pytest.mark.parametrize("buckets", [(4, 2), (0, 8), (2, 2), ("8",)])
def test_cost_model_buckets_must_ascend(buckets):
    with pytest.raises(ValueError, match="CostModel.token_buckets must be strictly ascending"):
        CostModel(c0=1.0, token_buckets=buckets)


def test_fit_recovers_known_coefficients():
    true = CostModel(c0=5e-4, c_tok=3e-6, c_seq=2e-6, c_ctx=5e-9)
    shapes = [BatchShape(prefill_tokens=p, decode_seqs=d, context_tokens=c)
              for p, d, c in [(0, 1, 128), (0, 8, 8192), (0, 64, 65536), (0, 256, 262144), (128, 0, 128),
                              (2048, 0, 2048), (512, 16, 20000)]]
    fitted = fit_cost_model([(s, true.step_time(s)) for s in shapes])
    for k in ("c0", "c_tok", "c_seq", "c_ctx"):
        assert math.isclose(getattr(fitted, k), getattr(true, k), rel_tol=1e-6), k


def test_fit_never_returns_negative_coefficients():
    pts = [(BatchShape(decode_seqs=d, context_tokens=100 * d), 1.0 - 0.001 * d) for d in (1, 2, 4, 8)]
    fitted = fit_cost_model(pts)
    assert min(fitted.c0, fitted.c_tok, fitted.c_seq, fitted.c_ctx) >= 0


@pytest.mark.parametrize("model", [
    CostModel(c0=1e-3, c_tok=2e-6, c_seq=0.0, c_ctx=1e-9, meta={"source": "test"}),
    CostModel(c0=1e-3, h0=2e-4, h_seq=1e-5, decode_buckets=(1, 2, 4), token_buckets=(16, 64), meta={"kv_tokens": 9}),
])
def test_cost_model_round_trips_through_json(tmp_path, model):
    save_cost_model(model, tmp_path / "m.json")
    assert load_cost_model(tmp_path / "m.json") == model


def test_shipped_profile_is_the_h200_measurement_that_passed_validation():
    model = default_cost_model()
    assert (model.meta["source"], model.meta["gpu"], model.meta["model"]) == (
        "measured by llmfx profile", "NVIDIA H200", "tinyllama-1.1b")
    # The same fit as benchmarks/results/2026-11-29-nvidia-h200-sim-validation-40dc510.json, which passed.
    report = json.loads((Path(__file__).parents[1] / "benchmarks/results/"
                         "2026-11-29-nvidia-h200-sim-validation-40dc510.json").read_text())
    assert report["passed"] and report["cost_model"]["c0"] == model.c0 and report["cost_model"]["h_seq"] == model.h_seq
    # The profile grid measured 4.61 ms at decode batch 256, context 1024: the fit is in that range.
    decode_256 = BatchShape(decode_seqs=256, context_tokens=256 * 1024)
    assert 3e-3 < model.step_time(decode_256) < 9e-3


@pytest.mark.parametrize("text,match", [
    ("{not json", "not valid JSON.*line 1"),
    ('{"c0": 1e-3, "c_tok": 0, "c_seq": 0}', "missing key.*c_ctx"),
    ('{"c0": -1, "c_tok": 0, "c_seq": 0, "c_ctx": 0}', "'c0' must be a finite number >= 0"),
    ('{"c0": "fast", "c_tok": 0, "c_seq": 0, "c_ctx": 0}', "'c0'"),
    ('{"c0": 0, "c_tok": 0, "c_seq": 0, "c_ctx": 0, "h_seq": -2}', "'h_seq' must be a finite number >= 0"),
    ('{"c0": 1, "c_tok": 0, "c_seq": 0, "c_ctx": 0, "decode_buckets": [8, 4]}', "decode_buckets must be strictly"),
    ("[1, 2]", "expected a JSON object"),
])
def test_malformed_cost_model_file_names_the_problem(tmp_path, text, match):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_cost_model(path)


# --- arrivals ---


def test_poisson_and_bursty_have_the_requested_rate_and_burstiness():
    def gaps(rs):
        ts = [r.arrival_time for r in rs]
        return [b - a for a, b in zip(ts, ts[1:])]

    def cv(xs):
        m = sum(xs) / len(xs)
        return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs)) / m

    p, b = gaps(poisson(4000, 10.0, seed=1)), gaps(bursty(4000, 10.0, cv=3.0, seed=1))
    assert math.isclose(sum(p) / len(p), 0.1, rel_tol=0.1) and math.isclose(sum(b) / len(b), 0.1, rel_tol=0.25)
    assert 0.9 < cv(p) < 1.1 and cv(b) > 2.0
    assert all(100 <= r.prompt_len <= 1024 for r in poisson(50, 1.0))


@pytest.mark.parametrize("rate", [-1.0, 0.0, float("nan")])
def test_non_positive_rate_is_rejected(rate):
    with pytest.raises(ValueError, match="rate"):
        poisson(10, rate)


def test_trace_round_trips_and_reads_csv(tmp_path):
    reqs = bursty(5, 2.0, prompt_len=(1, 9), output_len=3)
    reqs[2] = SimRequest(request_id=2, arrival_time=reqs[2].arrival_time, prompt_len=4, output_len=3, max_tokens=9)
    save_trace(reqs, tmp_path / "t.jsonl")
    assert load_trace(tmp_path / "t.jsonl") == reqs
    (tmp_path / "t.csv").write_text("arrival_time,prompt_len,output_len\n0.5,10,4\n0.0,3,2\n")
    assert [(r.request_id, r.arrival_time, r.prompt_len) for r in load_trace(tmp_path / "t.csv")] == [
        (1, 0.0, 3), (0, 0.5, 10)]


@pytest.mark.parametrize("name,text,match", [
    ("a.jsonl", '{"arrival_time": 0, "prompt_len": 4, "output_len": 2}\n{"arrival_time": 1, "prompt_len": 4}\n',
     "line 2: missing field 'output_len'"),
    ("b.jsonl", '{"arrival_time": 0, "prompt_len": 4, "output_len": 2}\n{oops\n', "line 2: not valid JSON"),
    ("c.jsonl", '{"arrival_time": -3, "prompt_len": 4, "output_len": 2}\n', "line 1: field 'arrival_time'"),
    ("d.csv", "arrival_time,prompt_len,output_len\n0,4,2\n1,four,2\n", "line 3: field 'prompt_len'.*'four'"),
    ("e.csv", "arrival_time,prompt_len\n0,4\n", "line 1: CSV header lacks field.*output_len"),
    ("g.jsonl", '{"arrival_time": 0, "prompt_len": 4, "output_len": 5, "max_tokens": 3}\n',
     "line 1: SimRequest 0: max_tokens must be.*>= output_len=5"),
    ("f.jsonl", "\n", "no requests"),
])
def test_malformed_trace_names_the_line_and_field(tmp_path, name, text, match):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=match):
        load_trace(tmp_path / name)


# --- CLI ---


def _cli(*argv):
    parser = argparse.ArgumentParser(prog="llmfx")
    commands = parser.add_subparsers(dest="command", required=True)
    add_simulate_parser(commands)
    add_profile_parser(commands)
    args = parser.parse_args(list(argv))
    return args.run(args)


def test_simulate_cli_prints_a_json_summary(capsys):
    assert _cli("simulate", "--policy", "max_utilization", "--arrivals", "poisson", "--rate", "100",
                "--num-requests", "20", "--prompt-len", "8:64", "--output-len", "16", "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["policy"] == "max_utilization" and summary["num_finished"] == 20


def test_simulate_cli_models_the_overlap_scheduler_unless_disabled(capsys):
    ttft = []
    for flag in ((), ("--disable-overlap-scheduler",)):
        assert _cli("simulate", "--arrivals", "poisson", "--rate", "300", "--num-requests", "40",
                    "--prompt-len", "64:256", "--output-len", "32", "--json", *flag) == 0
        ttft.append(json.loads(capsys.readouterr().out)["ttft_s_mean"])
    assert ttft[0] > ttft[1]  # with overlap a new prompt runs after the batch already in flight


def test_simulate_cli_replays_a_trace_with_a_cost_model(tmp_path, capsys):
    save_trace(all_at_once(6, prompt_len=8, output_len=4), tmp_path / "t.jsonl")
    save_cost_model(CostModel.constant(0.01), tmp_path / "c.json")
    assert _cli("simulate", "--arrivals", "trace", "--trace", str(tmp_path / "t.jsonl"),
                "--cost-model", str(tmp_path / "c.json")) == 0
    assert "output_tok_per_s" in capsys.readouterr().out


@pytest.mark.parametrize("argv,match", [
    (["--policy", "fastest"], "unknown policy 'fastest'.*guaranteed_no_evict"),
    (["--arrivals", "poisson", "--rate", "-2"], "--rate must be.*> 0"),
    (["--arrivals", "bursty"], "needs --rate"),
    (["--arrivals", "trace"], "needs --trace"),
    (["--prompt-len", "9:3"], "--prompt-len"),
])
def test_simulate_cli_rejects_bad_arguments_by_name(argv, match):
    with pytest.raises(ValueError, match=match):
        _cli("simulate", *argv)


def test_simulate_cli_rejects_a_malformed_cost_model(tmp_path):
    (tmp_path / "c.json").write_text('{"c0": 1}')
    with pytest.raises(ValueError, match="missing key"):
        _cli("simulate", "--cost-model", str(tmp_path / "c.json"), "--num-requests", "2")


def test_profile_cli_measures_the_tiny_model_on_cpu_and_writes_a_loadable_cost_model(tmp_path, capsys):
    out = tmp_path / "profile.json"
    assert _cli("profile", "--model", "tiny", "--device", "cpu", "--out", str(out), "--batch-sizes", "1,2",
                "--context-lens", "8", "--prefill-lens", "8,24", "--decode-steps", "2") == 0
    model = load_cost_model(out)
    assert model.meta["source"] == "measured by llmfx profile" and model.meta["overlap"] is True
    assert model.meta["kv_tokens"] == 65536  # the CPU pool's default size, recorded for the simulator
    points = model.meta["points"]  # every step the serving loop took, each timed
    assert {(p["prefill_tokens"], p["decode_seqs"]) for p in points} >= {(8, 0), (24, 0), (0, 1), (0, 2)}
    assert all(p["seconds"] > 0 and 0 <= p["collect_s"] <= p["seconds"] for p in points)
    assert model.step_time(BatchShape(decode_seqs=1, context_tokens=8)) > 0

