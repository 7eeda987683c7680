"""llmfx.testing.strategies: the strategies generate valid inputs, and the state machine tests a user's policy."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmfx.kv_cache import match_prefix, num_available, pages_for_tokens
from llmfx.scheduler import Plan, has_work, new_scheduler_state, postprocess, schedule, token_slice, validate_request
from llmfx.kv_cache import new_page_pool
from llmfx.testing.strategies import (
    SchedulerMachine,
    arrival_traces,
    check_batch,
    check_pool,
    fake_token,
    kv_cache_configs,
    reference_output,
    request_lists,
    sampling_params,
    scheduler_limits,
    workloads,
)


def shortest_prompt_first(state, limits):
    """A user's policy: admit the shortest waiting prompt first, while its first chunk's pages fit; never preempt."""
    pool, available, seats = state.pool, num_available(state.pool), limits.max_batch_size - len(state.running)
    available -= sum(pages_for_tokens(s.num_computed_tokens + 1, limits.page_size) - len(s.pages)
                     for s in state.running)
    admit = []
    for seq in sorted(state.waiting, key=lambda s: s.num_tokens)[:max(seats, 0)]:
        hit_pool, hit, cached = match_prefix(pool, token_slice(seq, 0, seq.num_tokens))
        need = pages_for_tokens(cached + min(seq.num_tokens - cached, limits.max_num_tokens), limits.page_size)
        if need - len(hit) > available:
            break
        available -= need - len(hit)
        admit.append(seq.request_id)
    return Plan(admit=tuple(admit))


class ShortestPromptFirstMachine(SchedulerMachine):
    policy = shortest_prompt_first


TestShortestPromptFirst = ShortestPromptFirstMachine.TestCase
TestShortestPromptFirst.settings = settings(max_examples=25, stateful_step_count=20, deadline=None)


class MaxUtilizationMachine(SchedulerMachine):
    policy = "max_utilization"


TestMaxUtilization = MaxUtilizationMachine.TestCase
TestMaxUtilization.settings = settings(max_examples=15, stateful_step_count=20, deadline=None)


def test_shortest_prompt_first_admits_the_short_prompt_ahead_of_the_long_one():
    lim_state = new_scheduler_state(new_page_pool(64, 2))
    from llmfx.sampling_params import SamplingParams
    from llmfx.scheduler import Request, SchedulerConfig, SchedulerLimits

    lim = SchedulerLimits(max_batch_size=1, max_num_tokens=32, max_seq_len=32, page_size=2)
    reqs = [Request(request_id=i, prompt_token_ids=(i + 1,) * n, params=SamplingParams(max_tokens=1))
            for i, n in enumerate((9, 3))]
    _, batch = schedule(lim_state, reqs, lim, SchedulerConfig(capacity_scheduler_policy=shortest_prompt_first))
    assert [s.request_id for s in batch.seqs] == [1]


@given(sampling_params())
def test_sampling_params_strategy_builds_valid_params(params):
    assert 0 <= params.min_tokens <= params.max_tokens


@given(arrival_traces())
def test_arrival_traces_are_ordered_in_time(trace):
    times = [r.arrival_time for r in trace]
    assert times == sorted(times) and len({r.request_id for r in trace}) == len(trace)


@given(st.data())
def test_kv_cache_configs_admit_every_request(data):
    lim = data.draw(scheduler_limits())
    reqs = data.draw(request_lists(max_prompt_len=lim.max_seq_len - 1))
    kv = data.draw(kv_cache_configs(reqs, lim))
    from llmfx.scheduler import SchedulerConfig

    for r in reqs:
        validate_request(r, lim, SchedulerConfig(), kv.max_tokens // kv.page_size)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(policies=("guaranteed_no_evict", "max_utilization", shortest_prompt_first)))
def test_every_workload_runs_to_the_reference_outputs(w):
    state = new_scheduler_state(new_page_pool(w.num_pages, w.limits.page_size, w.enable_prefix_cache))
    tokens = {r.request_id: list(r.prompt_token_ids) for r in w.requests}
    done = {}
    inbox = w.requests
    for _ in range(3000):
        state, batch = schedule(state, inbox, w.limits, w.scheduler)
        inbox = ()
        check_pool(state.pool)
        check_batch(state, batch, w.limits, tokens)
        sampled = {s.request_id: fake_token(s.request_id, s.start_pos + len(s.token_ids)) for s in batch.seqs if s.sample}
        state, events = postprocess(state, batch, sampled, w.limits)
        for e in events:
            tokens[e.request_id] += e.new_token_ids
            if e.finish_reason:
                done[e.request_id] = e.finish_reason
        if not has_work(state):
            break
    assert not has_work(state) and not state.pool.refcounts
    for r in w.requests:
        out, reason = reference_output(r, w.limits)
        assert (tuple(tokens[r.request_id][len(r.prompt_token_ids):]), done[r.request_id]) == (out, reason)
