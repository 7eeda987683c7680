"""Benchmark helpers and scripts: the offline warm-up leaves the timed run nothing to hit in the prefix cache;
benchmarks/rope_kv_write.py runs its whole path on CPU and refuses CUDA without a device; step_profile.py
fills batches whose prefill outlasts the first requests' default outputs."""

from __future__ import annotations

import ast
import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from llmfx import bench
from llmfx.bench import offline_workload, save_rows, shifted_prompts


@given(st.data())
def test_shifted_prompts_keep_shapes_and_change_every_token(data):
    vocab = data.draw(st.integers(2, 300))
    shift = data.draw(st.integers(1, vocab - 1))
    prompts = [[t % vocab for t in p] for p, _ in offline_workload(vocab, num_requests=8)]
    warm = shifted_prompts(prompts, vocab, shift)
    assert [len(p) for p in warm] == [len(p) for p in prompts]
    assert all(a != b for p, w in zip(prompts, warm) for a, b in zip(p, w))
    assert all(0 <= t < vocab for p in warm for t in p)


ROPE_KV_SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "rope_kv_write.py"


def test_rope_kv_write_benchmark_runs_its_whole_path_on_cpu(tmp_path):
    main = runpy.run_path(str(ROPE_KV_SCRIPT))["main"]
    main(["--device", "cpu", "--tokens", "1,3", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
          "--context", "20", "--iters", "2", "--save", str(tmp_path)])
    (saved,) = tmp_path.glob("*-rope-kv-write-smoke.json")
    report = json.loads(saved.read_text())
    assert report["device"] == "cpu" and report["shape"]["layers"] == 2
    timed = {(r["system"], r["batch"]) for r in report["runs"] if r["metric"] == "us_per_step" and r["value"] > 0}
    assert timed == {(s, t) for s in ("apply_rope + write_kv (compiled)", "rope_write_kv (compiled)") for t in (1, 3)}
    diffs = [r["value"] for r in report["runs"] if r["metric"] == "max_diff_of_input_scale"]
    assert diffs == [0.0, 0.0]  # on CPU the op is the reference


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_rope_kv_write_benchmark_refuses_cuda_without_a_device():
    main = runpy.run_path(str(ROPE_KV_SCRIPT))["main"]
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        main([])


STEP_PROFILE_SCRIPT = ROPE_KV_SCRIPT.parent / "step_profile.py"


def run_step_profile(*args: str) -> subprocess.CompletedProcess:
    # A process of its own: the script wraps llmfx.executor's functions in timers for its whole life.
    return subprocess.run([sys.executable, str(STEP_PROFILE_SCRIPT), "--model", "tiny", *args], capture_output=True,
                          text=True, timeout=240)


def test_step_profile_fills_a_batch_whose_prefill_takes_longer_than_the_timed_steps(tmp_path):
    # 32 prompts of 32 tokens at 64 tokens a step, shared with the decodes: ~64 steps to fill. It used
    # to give each request steps + 16 output tokens, so the first ones finished and the loop never ended.
    done = run_step_profile("--batches", "32", "--context", "32", "--steps", "4", "--max-num-tokens", "64",
                            "--compile-dynamic", "false", "--save", str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = json.loads((tmp_path / "step_profile.json").read_text())["rows"]
    assert row["batch"] == 32 and row["wall_ms_per_step"] > 0


def test_step_profile_runs_without_the_overlap_scheduler(tmp_path):
    done = run_step_profile("--batches", "4", "--context", "16", "--steps", "4", "--max-num-tokens", "32",
                            "--compile-dynamic", "false", "--disable-overlap-scheduler", "--save", str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "step_profile.json").read_text())
    assert report["overlap"] is False and [r["batch"] for r in report["rows"]] == [4]


def test_step_profile_refuses_a_token_budget_the_decodes_would_use_up():
    done = run_step_profile("--batches", "8", "--max-num-tokens", "8")
    assert done.returncode == 2 and "--max-num-tokens must exceed the largest batch (8)" in done.stderr


def test_decode_batch_gives_each_row_one_token_at_the_context_and_pages_of_its_own():
    from llmfx.models import forward
    from llmfx.weights import load_params, resolve_model

    source = resolve_model("tiny")
    cfg = source.config
    kv, batch = bench.decode_batch(cfg, 3, 40, torch.float32, "cpu", page_size=8)
    assert batch.positions.tolist() == [40] * 3 and batch.seq_lens.tolist() == [41] * 3
    pages = batch.page_table.tolist()
    assert all(len(row) == 6 for row in pages)  # 41 tokens in pages of 8
    assert len({p for row in pages for p in row}) == 18 and 0 not in {p for row in pages for p in row}
    assert len(kv) == cfg.num_layers and kv[0][0].shape[0] == 3 * 6 + 1
    params = load_params(source, dtype="float32", load_format="dummy", seed=0)
    assert forward(params, cfg, batch, kv).shape == (3, cfg.vocab_size)


@given(st.integers(1, 3000))
def test_offline_prefill_lengths_are_the_workloads_first_prompts_cut_to_the_step(tokens):
    lengths = bench.offline_prefill_lengths(tokens)
    prompts = [len(p) for p, _ in offline_workload(vocab_size=2)]
    assert sum(lengths) == tokens and all(n > 0 for n in lengths)
    assert lengths[:-1] == prompts[:len(lengths) - 1] and lengths[-1] <= prompts[len(lengths) - 1]


def test_prefill_batch_starts_every_prompt_at_zero_on_pages_of_its_own():
    from llmfx.models import forward
    from llmfx.weights import load_params, resolve_model

    source = resolve_model("tiny")
    cfg = source.config
    kv, batch = bench.prefill_batch(cfg, [5, 17, 8], torch.float32, "cpu", page_size=8)
    assert batch.positions.tolist() == [*range(5), *range(17), *range(8)]
    assert batch.seq_lens.tolist() == [5, 17, 8] and batch.query_start_loc.tolist() == [0, 5, 22, 30]
    pages = [p for row in batch.page_table.tolist() for p in row if p]
    assert sorted(pages) == list(range(1, 6)) and kv[0][0].shape[0] == 6  # 1 + 3 + 1 pages and the null page
    params = load_params(source, dtype="float32", load_format="dummy", seed=0)
    assert forward(params, cfg, batch, kv).shape == (3, cfg.vocab_size)
    linear_weights = sum(w.numel() for name, w in params["layers"][0].items() if name.startswith("w"))
    assert bench.decoder_weight_params(cfg) == cfg.num_layers * linear_weights  # graph_parts' TFLOP/s count


def test_kernel_benchmark_rows_are_saved_with_where_they_ran(tmp_path):
    rows = [{"batch": 1, "us": 2.5}]
    path = save_rows(tmp_path / "out", "sweep.json", rows, context=1024)
    saved = json.loads(path.read_text())
    assert saved["rows"] == rows and saved["context"] == 1024 and saved["torch"] == torch.__version__
    assert saved["gpu"] == (torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu") and saved["commit"]


def test_sampler_variants_benchmark_runs_on_cpu(tmp_path):
    main = runpy.run_path(str(Path(__file__).resolve().parent.parent / "benchmarks" / "sampler_variants.py"))["main"]
    main(["--device", "cpu", "--batches", "1,3", "--vocab", "50", "--rounds", "2", "--iters", "2", "--save",
          str(tmp_path)])
    rows = json.loads((tmp_path / "sampler-variants-cpu.json").read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 3]
    assert all(r[f"{v}_ms"] > 0 and len(r[f"{v}_round_ms"]) == 2 for r in rows for v in ("sorting", "sort_free", "greedy", "lean"))


def test_gc_timer_counts_collections_per_generation():
    import gc

    from llmfx.bench import GcTimer

    timer = GcTimer()
    gc.callbacks.append(timer)
    try:
        gc.collect(0)
        gc.collect(2)
    finally:
        gc.callbacks.remove(timer)
    assert timer.collections[0] >= 1 and timer.collections[2] >= 1 and all(s >= 0 for s in timer.seconds)
    assert timer.per_step(2)["gc_gen2_per_step"] == timer.collections[2] / 2


@pytest.mark.parametrize("gc_freeze", [False, True])
def test_offline_reports_gc_and_leaves_nothing_frozen(monkeypatch, tmp_path, gc_freeze):
    import gc


    from llmfx.llm import LLM

    frozen_during = []  # the GC's permanent generation size at each generate call: warm-up, then timed
    generate = LLM.generate
    monkeypatch.setattr(LLM, "generate", lambda self, *a, **k: frozen_during.append(gc.get_freeze_count())
                        or generate(self, *a, **k))
    monkeypatch.setattr(bench, "offline_workload", lambda vocab, n: [([3, 1, 4, 1, 5], 3)] * n)
    before = gc.get_freeze_count()
    rows = {r.metric: r.value for r in bench.offline("tiny", 2, peers=False, workdir=tmp_path, gc_freeze=gc_freeze)}
    assert rows["output_tokens_per_s"] > 0 and rows["gc_s"] >= 0 and rows["gc_full_collections"] >= 0
    assert rows["gc_young_collections"] >= 0 and rows["gc_s"] * 1e3 >= rows["gc_longest_pause_ms"] >= 0
    assert frozen_during[0] == before and (frozen_during[1] > before) == gc_freeze
    assert gc.get_freeze_count() == before  # unfrozen after the timed run


@pytest.mark.parametrize("flag, passed", [([], set()), (["--gc-gen0-threshold", "python"], {None}),
                                          (["--gc-gen0-threshold", "5000"], {5000})])
def test_offline_cli_passes_the_gc_threshold_to_the_llm(monkeypatch, flag, passed):
    from llmfx.cli import main

    seen = []
    monkeypatch.setattr(bench, "offline", lambda *a, **k: seen.append(k) or [])
    assert main(["bench", "offline", "--no-peers", *flag]) == 0
    assert {k["garbage_collection_gen0_threshold"] for k in seen if "garbage_collection_gen0_threshold" in k} == passed


@pytest.mark.parametrize("text", ["0", "-3", "2.5", "Python", ""])
def test_offline_cli_refuses_a_bad_gc_threshold_before_running(monkeypatch, capsys, text):
    from llmfx.cli import main

    monkeypatch.setattr(bench, "offline", lambda *a, **k: pytest.fail("the benchmark ran"))
    assert main(["bench", "offline", "--gc-gen0-threshold", text]) == 2
    assert "--gc-gen0-threshold must be an integer >= 1 or 'python'" in capsys.readouterr().err


def test_offline_repeats_time_each_run_on_tokens_of_its_own(monkeypatch, tmp_path):
    from llmfx.llm import LLM

    prompts_seen = []
    generate = LLM.generate
    monkeypatch.setattr(LLM, "generate", lambda self, prompts, *a, **k: prompts_seen.append(prompts)
                        or generate(self, prompts, *a, **k))
    monkeypatch.setattr(bench, "offline_workload", lambda vocab, n: [([3, 1, 4, 1, 5], 3)] * n)
    rows = {r.metric: r.value for r in bench.offline("tiny", 2, peers=False, workdir=tmp_path, repeats=3)}
    runs = [rows[f"output_tokens_per_s_run{k}"] for k in (1, 2, 3)]
    assert rows["output_tokens_per_s"] == pytest.approx(sorted(runs)[1])  # the median run
    firsts = [p[0] for p in prompts_seen]  # warm-up (shift 3), then the three timed runs (shifts 0, 1, 2)
    assert firsts == [[6, 4, 7, 4, 8], [3, 1, 4, 1, 5], [4, 2, 5, 2, 6], [5, 3, 6, 3, 7]]


@pytest.mark.parametrize("repeats", [0, -1, 2.0, True])
def test_offline_refuses_a_bad_repeat_count_before_building_anything(repeats, monkeypatch):
    monkeypatch.setattr(bench, "hf_checkpoint", lambda *a: pytest.fail("a checkpoint was built"))
    with pytest.raises(ValueError, match="repeats must be an integer in"):
        bench.offline("tiny", 2, peers=False, repeats=repeats)


def test_startup_runs_cold_then_warm_with_both_compile_caches_under_its_workdir(tmp_path):
    env = bench.startup_env(tmp_path)
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor-cache")
    assert env["TRITON_CACHE_DIR"] == str(tmp_path / "triton-cache")  # not ~/.triton, which other runs warm
    rows = {r.metric: r.value for r in bench.startup("tiny", tmp_path)}
    for kind in ("cold", "warm"):
        assert rows[f"{kind}_s"] >= rows[f"{kind}_total_s"] > rows[f"{kind}_load_s"] > 0
        assert f"{kind}_compile_and_capture_s" in rows


def test_columnar_floor_sketch_runs(capsys):
    runpy.run_path(str(Path(__file__).parent.parent / "benchmarks" / "columnar_floor.py"), run_name="not_main")[
        "main"](["--batch", "8", "--steps", "40", "--context", "64"])
    assert capsys.readouterr().out.startswith("batch 8: median ")


def test_compile_count_counts_the_warmup_graphs(capsys):
    runpy.run_path(str(Path(__file__).parent.parent / "benchmarks" / "compile_count.py"), run_name="not_main")[
        "main"](["--batch-sizes", "1,2"])
    row = ast.literal_eval(capsys.readouterr().out.strip().splitlines()[-1])  # the printed dict
    assert row["unique_graphs"] >= 2  # the model half and at least one sampler variant


OFFLINE_TIMELINE = runpy.run_path(str(Path(__file__).parent.parent / "benchmarks" / "offline_timeline.py"),
                                  run_name="not_main")


def _traced(seqs: int, prefill: int, start: float, wall: float, wait: float):
    from llmfx.executor import StepTiming, TracedBatch

    # With prefill, one of the sequences is a chunk of `prefill` tokens; the others decode one token each.
    decode = seqs - 1 if prefill else seqs
    batch = TracedBatch(num_seqs=seqs, num_tokens=decode + prefill, num_decode=decode, context_tokens=0, launch_s=0.0)
    return StepTiming(start=start, end=start + wall, waited_for_work=False, launched=batch, collected=batch,
                      collect_s=wait)


@given(st.lists(st.tuples(st.integers(1, 256), st.sampled_from([0, 0, 37]), st.floats(1e-4, 1e-2),
                          st.floats(0, 1), st.floats(1e-5, 1e-2)), min_size=1, max_size=40))
def test_offline_timeline_splits_every_launched_step_into_exactly_one_bucket(steps):
    trace, t = [], 0.0
    for seqs, prefill, wall, wait_share, _ in steps:
        trace.append(_traced(seqs, prefill, t, wall, wall * wait_share))
        t += wall
    device = [d for *_, d in steps]
    its = OFFLINE_TIMELINE["iterations"](trace, device)
    assert [i.device_s for i in its] == device
    assert all(0 <= i.host_s <= i.wall_s for i in its)
    rows = {r["batch"]: r for r in OFFLINE_TIMELINE["summarize"](its)}
    total = rows.pop("all")
    assert total["steps"] == len(steps) == sum(r["steps"] for r in rows.values())
    assert total["wall_s"] == pytest.approx(sum(w for _, _, w, _, _ in steps), abs=1e-3)
    assert total["host_bound_steps"] == sum(i.host_s > i.device_s for i in its)
    assert 0 <= total["host_excess_s"] <= total["host_s"] + 1e-4
    assert total["max_wall_ms"] == pytest.approx(max(w for _, _, w, _, _ in steps) * 1e3, abs=1e-3)
    assert ("prefill" in rows) == any(p for _, p, *_ in steps)


@given(st.lists(st.tuples(st.integers(1, 256), st.booleans()), max_size=30))
def test_finished_before_counts_the_sequences_a_decode_launch_has_fewer_than_the_one_before(launches):
    from llmfx.bench import finished_before

    out = finished_before(launches)
    assert len(out) == len(launches) and (not out or out[0] is None)
    for k in range(1, len(launches)):
        both_decode = launches[k - 1][1] and launches[k][1]
        assert out[k] == (launches[k - 1][0] - launches[k][0] if both_decode else None)


def test_offline_timeline_groups_decode_steps_by_the_finishes_before_them():
    Iteration = OFFLINE_TIMELINE["Iteration"]
    # 4 decode, 3 (1 finished), 3, prefill, 2 (after a prefill: not grouped), 1 (1 finished)
    its = [Iteration(seqs, prefill, 2e-3, host, 1e-3) for seqs, prefill, host in
           [(4, 0, 5e-4), (3, 0, 2e-3), (3, 0, 4e-4), (3, 16, 1e-3), (2, 0, 3e-4), (1, 0, 1.5e-3)]]
    rows = {r["finished_before"]: r for r in OFFLINE_TIMELINE["by_finishes"](its)}
    assert sorted(rows) == [0, 1]
    assert rows[0] == {"finished_before": 0, "steps": 1, "median_host_ms": 0.4, "median_device_ms": 1.0,
                       "host_bound_steps": 0}
    assert rows[1]["steps"] == 2 and rows[1]["median_host_ms"] == 1.75 and rows[1]["host_bound_steps"] == 2

HOST_LOOP = runpy.run_path(str(Path(__file__).parent.parent / "benchmarks" / "host_loop.py"), run_name="not_main")


def test_host_loop_keys_each_decode_step_by_the_sequences_that_finished_before_it():
    # batch sizes 5, 5, 3 (2 finished), 3, 2 (1 finished), a prefill step, 4 (after a prefill: not keyed), 4
    shape = [(5, 0), (5, 0), (3, 0), (3, 0), (2, 0), (3, 37), (4, 0), (4, 0)]
    trace, t = [], 0.0
    for k, (seqs, prefill) in enumerate(shape):
        trace.append(_traced(seqs, prefill, t, 1e-3 * (k + 1), 0.0))
        t += 1e-3 * (k + 1)
    periods = HOST_LOOP["periods_by_finishes"](trace)
    # iteration k's period is trace[k + 1].start - trace[k].start = (k + 1) ms; the last launch has none
    assert {n: [round(x * 1e3, 6) for x in v] for n, v in periods.items()} == {0: [2.0, 4.0], 2: [3.0], 1: [5.0]}

def test_offline_timeline_refuses_device_times_that_do_not_match_the_launches():
    trace = [_traced(4, 0, 0.0, 1e-3, 5e-4)]
    with pytest.raises(ValueError, match="2 device timings for 1 launched steps"):
        OFFLINE_TIMELINE["iterations"](trace, [1e-3, 1e-3])


def test_offline_timeline_runs_the_workload_on_cpu(tmp_path, capsys):
    OFFLINE_TIMELINE["main"](["--model", "tiny", "--num-requests", "3", "--lengths", "4,12", "--gc-gen0-threshold", "python",
                              "--workdir", str(tmp_path), "--save", str(tmp_path)])
    assert "3 requests" in capsys.readouterr().out
    report = json.loads((tmp_path / "offline_timeline.json").read_text())
    total = report["rows"][-1]
    assert total["batch"] == "all" and total["steps"] >= 4 and "device_s" not in total  # no device column on CPU
    assert report["lengths"] == [4, 12] and report["output_tokens_per_s"] > 0 and report["gc_gen0_threshold"] is None
    assert all(r["steps"] >= 1 for r in report["by_finishes"])
    steps = report["steps"]  # every launching iteration: the buckets' counts add up to it
    assert len(steps) == total["steps"] and all(len(s) == 5 and s[4] is None for s in steps)
    assert sum(s[0] for s in steps) >= 3 and all(s[2] >= s[3] >= 0 for s in steps)


def test_penalty_step_benchmark_checks_both_ways_agree_and_saves(tmp_path, capsys):
    runpy.run_path(str(Path(__file__).parent.parent / "benchmarks" / "penalty_step.py"), run_name="not_main")[
        "main"](["--rows", "3", "--steps", "4", "--rounds", "1", "--save", str(tmp_path)])
    row = json.loads((tmp_path / "penalty_step-3rows.json").read_text())["rows"][0]
    assert row["from_scratch"] > 0 and row["kept_histories"] > 0


def test_startup_profile_samples_every_thread_of_a_warm_start_on_cpu(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["startup_profile.py", "--model", "tiny", "--workdir", str(tmp_path / "w"),
                                      "--save", str(tmp_path / "out")])
    runpy.run_path(str(Path(__file__).parent.parent / "benchmarks" / "startup_profile.py"), run_name="__main__")
    report = json.loads((tmp_path / "out" / "startup-profile.json").read_text())
    marks = report["marks_s"]
    assert 0 < marks["imported"] < marks["constructed"] <= marks["first_token"]
    assert set(report["phases_s"]) == {"load", "profile", "kv_allocation", "compile_and_capture"}
    assert isinstance(report["dynamo_compile_times_s"], dict)  # per graph on the GPU; the CPU engine compiles none
    assert report["new_cache_files"] == []  # nothing compiles on the CPU engine, so nothing is written again
    executor = report["threads"]["llmfx-executor"]  # the warm-up runs there, so it must be sampled too
    assert executor["samples"] > 0 and any("warmup" in where for where, _ in executor["top"])


def test_startup_profile_lists_the_files_in_both_compile_caches(tmp_path):
    cache_files = runpy.run_path(str(Path(__file__).parent.parent / "benchmarks" / "startup_profile.py"),
                                 run_name="not_main")["cache_files"]
    (tmp_path / "inductor-cache" / "ab").mkdir(parents=True)
    (tmp_path / "inductor-cache" / "ab" / "graph.py").write_text("")
    (tmp_path / "triton-cache" / "HASH").mkdir(parents=True)
    (tmp_path / "triton-cache" / "HASH" / "_gemv_kernel.cubin").write_bytes(b"")
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor-cache"),
           "TRITON_CACHE_DIR": str(tmp_path / "triton-cache")}
    assert cache_files(env) == {"inductor-cache/ab/graph.py", "triton-cache/HASH/_gemv_kernel.cubin"}


VARLEN_SWEEP = runpy.run_path(str(Path(__file__).parent.parent / "benchmarks" / "varlen_attention_sweep.py"),
                              run_name="not_main")


@given(st.lists(st.integers(1, 40), min_size=1, max_size=4), st.sampled_from([1, 4, 16]), st.integers(0, 100))
def test_varlen_sweep_reference_is_the_paged_reference_op(lengths, page_size, seed):
    from llmfx.ops.attention import paged_attention
    from llmfx.presets import preset

    cfg = preset("tiny")
    args = VARLEN_SWEEP["prefill_problem"](cfg, lengths, page_size, torch.float32, "cpu", seed)
    assert args[0].shape[0] == sum(lengths) and args[5].tolist() == lengths
    scale = cfg.head_dim**-0.5
    torch.testing.assert_close(VARLEN_SWEEP["sdpa_reference"](*args, scale), paged_attention(*args, scale, 0),
                               rtol=1e-5, atol=1e-5)


@given(st.lists(st.integers(1, 30), min_size=1, max_size=3), st.integers(1, 4), st.integers(1, 8))
def test_varlen_sweep_counts_causal_work_pair_by_pair(lengths, heads, head_dim):
    pairs = sum(1 for n in lengths for i in range(n) for _ in range(i + 1))  # (query, key) pairs it may see
    assert VARLEN_SWEEP["causal_flops"](lengths, heads, head_dim) == pairs * heads * head_dim * 4


def test_results_name_the_commit_the_device_command_gives(monkeypatch):
    monkeypatch.setenv("LLMFX_COMMIT", "abc1234 (named)")
    assert bench.source_commit() == "abc1234 (named)"
    monkeypatch.delenv("LLMFX_COMMIT")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=Path(bench.__file__).parent).stdout.strip()
    assert bench.source_commit() == head


def test_benchmarks_compile_the_forward_as_the_engine_does_on_dummy_weights(monkeypatch):
    from llmfx import bench, model_engine
    from llmfx.models import forward

    seen = []
    monkeypatch.setattr(model_engine, "inductor_pdl_options", lambda device: seen.append(device) or {})
    cfg, params = bench.preset_dummy_params("tiny", "cpu")
    again = bench.preset_dummy_params("tiny", "cpu")[1]
    assert all(torch.equal(params[k], again[k]) for k in ("embed", "lm_head"))  # seed 0: the same weights each time
    assert params["embed"].dtype == torch.bfloat16 and params["embed"].shape == (cfg.vocab_size, cfg.hidden_size)
    kv, inputs = bench.decode_batch(cfg, 2, 20, torch.bfloat16, "cpu")
    fwd = bench.compile_static(lambda: forward(params, cfg, inputs, kv), "cpu")
    with torch.inference_mode():
        compiled, eager = fwd().float(), forward(params, cfg, inputs, kv).float()
    # Inductor fuses bf16 ops differently from eager: equal to bf16 rounding, and not a different forward.
    torch.testing.assert_close(compiled, eager, rtol=0.02, atol=0.02 * eager.abs().max().item())
    assert seen == [torch.device("cpu")]


def test_sampler_sass_counts_the_instructions_of_the_hash_kernels(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setattr(sys, "argv", ["sampler_sass.py", "--rows", "4", "--vocab", "320", "--save", str(tmp_path)])
    runpy.run_path(str(Path(__file__).parent.parent / "benchmarks" / "sampler_sass.py"), run_name="__main__")
    kernels = json.loads((tmp_path / "sampler_sass.json").read_text())["kernels"]
    assert kernels and all("lshift" in k["kernel"] for k in kernels)
    assert all(k["instructions"] == sum(k["by_opcode"].values()) and k["by_opcode"].get("IMAD") for k in kernels)
