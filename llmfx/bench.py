"""Benchmarks as PERF.md defines them: latency, offline throughput, startup; peers run in the same call.

Scripts in benchmarks/ and `llmfx bench ...` call `run(name, ...)`. Every run prints one table
(system, metric, value, fraction of the physical floor) and can write benchmarks/results/*.json.
"""

from __future__ import annotations

import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from llmfx.batch import SequenceChunk
from llmfx.executor import check_gc_gen0_threshold
from llmfx.kv_pool import KVPool
from llmfx.presets import preset
from llmfx.step_inputs import pack

# Measured on the project's H200 (PERF.md): device-to-device copy, bytes read + written per second.
H200_COPY_BYTES_PER_S = 4.27e12


@dataclass(frozen=True, slots=True, kw_only=True)
class Row:
    """One measured figure."""

    benchmark: str
    system: str
    batch: int | None
    metric: str
    value: float
    floor_fraction: float | None = None  # floor / measured for times, measured / ceiling for rates


def linear_shapes(cfg) -> dict[str, tuple[int, int]]:
    """The [N, K] weight of each of a decoder's matmuls (one layer's four, then lm_head), nn.Linear's layout."""
    return {"qkv": (cfg.q_size + 2 * cfg.kv_size, cfg.hidden_size), "o": (cfg.hidden_size, cfg.q_size),
            "gate_up": (2 * cfg.intermediate_size, cfg.hidden_size), "down": (cfg.hidden_size, cfg.intermediate_size),
            "lm_head": (cfg.vocab_size, cfg.hidden_size)}


def decoder_weight_params(cfg) -> int:
    """Parameters of the decoder layers' matmuls (lm_head not counted): the multiply-adds a token costs in them."""
    return cfg.num_layers * sum(n * k for name, (n, k) in linear_shapes(cfg).items() if name != "lm_head")


def weight_bytes(model: str) -> int:
    """Bytes a decode step reads for linear layers and lm_head at 2 bytes a parameter."""
    cfg = preset(model)
    return 2 * (decoder_weight_params(cfg) + cfg.vocab_size * cfg.hidden_size)


def parse_ints(text: str) -> tuple[int, ...]:
    """A benchmark option's comma-separated integers: '1,8,64' -> (1, 8, 64)."""
    return tuple(int(x) for x in text.split(","))


def decode_step_floor_s(model: str, batch: int, context: int) -> float:
    """Physical floor of one decode step: weights once plus every sequence's KV, at copy bandwidth."""
    cfg = preset(model)
    kv_bytes = 2 * cfg.num_layers * cfg.kv_size * 2  # bf16 K and V per token
    return (weight_bytes(model) + batch * context * kv_bytes) / H200_COPY_BYTES_PER_S


def hf_checkpoint(model: str, directory: Path) -> Path:
    """Random bf16 weights of the preset's shape, saved once so llmfx and transformers read the same values."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = preset(model)
    path = directory / model
    if (path / "config.json").is_file():
        return path
    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                         num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                         intermediate_size=cfg.intermediate_size, rms_norm_eps=cfg.rms_norm_eps,
                         max_position_embeddings=cfg.max_position_embeddings,
                         tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=cfg.bos_token_id,
                         eos_token_id=list(cfg.eos_token_ids))
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model_hf = LlamaForCausalLM(hf_cfg).to(torch.bfloat16)
    model_hf.save_pretrained(path)
    return path


def latency(model: str, batches: tuple[int, ...], prompt_len: int = 128, new_tokens: int = 256,
            peers: bool = True, workdir: Path | None = None, **llm_kwargs) -> list[Row]:
    """ms per output token (decode) and time to first token, batches of identical-length greedy requests."""
    from llmfx.llm import LLM
    from llmfx.sampling_params import SamplingParams

    path = hf_checkpoint(model, workdir or Path(tempfile.mkdtemp()))
    cfg = preset(model)
    rows: list[Row] = []
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, detokenize=False)
    rng = random.Random(0)
    with LLM(path, skip_tokenizer_init=True, dtype="bfloat16", max_batch_size=max(batches),
             max_seq_len=prompt_len + new_tokens + 16, **llm_kwargs) as llm:
        for b in batches:
            prompts = [[rng.randrange(cfg.vocab_size) for _ in range(prompt_len)] for _ in range(b)]
            llm.generate(prompts, params, use_tqdm=False)  # warm: same shapes, graphs replay
            outs = llm.generate(prompts, params, use_tqdm=False)
            first = max(o.metrics.first_token_time for o in outs)
            end = max(o.metrics.finished_time for o in outs)
            arrival = min(o.metrics.arrival_time for o in outs)
            step_s = (end - first) / (new_tokens - 1)
            floor = decode_step_floor_s(model, b, prompt_len + new_tokens // 2)
            rows.append(Row(benchmark="latency", system="llmfx", batch=b, metric="decode_ms_per_step",
                            value=step_s * 1e3, floor_fraction=floor / step_s))
            rows.append(Row(benchmark="latency", system="llmfx", batch=b, metric="output_tokens_per_s",
                            value=b / step_s, floor_fraction=floor / step_s))
            rows.append(Row(benchmark="latency", system="llmfx", batch=b, metric="ttft_ms",
                            value=(first - arrival) * 1e3))
    if peers:
        rows += _hf_latency(path, prompt_len, new_tokens, model)
    return rows


def _hf_latency(path: Path, prompt_len: int, new_tokens: int, model: str) -> list[Row]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    ids = torch.randint(0, preset(model).vocab_size, (1, prompt_len), device="cuda")
    rows = []
    for name, extra in (("transformers eager", {}), ("transformers static cache", {"cache_implementation": "static"})):
        with torch.no_grad():
            hf.generate(ids, max_new_tokens=8, do_sample=False, **extra)
            torch.cuda.synchronize()
            times = []
            for n in (1, new_tokens):  # the difference removes prefill from the per-token figure
                start = time.perf_counter()
                hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **extra)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        step = (times[1] - times[0]) / (new_tokens - 1)
        floor = decode_step_floor_s(model, 1, prompt_len + new_tokens // 2)
        rows.append(Row(benchmark="latency", system=name, batch=1, metric="decode_ms_per_step", value=step * 1e3,
                        floor_fraction=floor / step))
    del hf
    torch.cuda.empty_cache()
    return rows


def offline_workload(vocab_size: int, num_requests: int = 256, lengths: tuple[int, int] = (100, 1024),
                     seed: int = 0) -> list[tuple[list[int], int]]:
    """nano-vllm's bench: seed 0, prompt and output lengths uniform in [100, 1024] (the `lengths` range)."""
    rng = random.Random(seed)  # the same draws as nano-vllm's random.seed(0), without touching the global state
    lo, hi = lengths
    work = []
    for _ in range(num_requests):
        prompt = [rng.randint(0, vocab_size - 1) for _ in range(rng.randint(lo, hi))]
        work.append((prompt, rng.randint(lo, hi)))
    return work


def offline_params(work: list[tuple[list[int], int]], max_tokens: int | None = None) -> list:
    """Each request's SamplingParams: greedy, its drawn output length (capped at max_tokens), no EOS, no text."""
    from llmfx.sampling_params import SamplingParams

    return [SamplingParams(temperature=0.0, max_tokens=n if max_tokens is None else min(n, max_tokens),
                           ignore_eos=True, detokenize=False) for _, n in work]


def shifted_prompts(prompts: list[list[int]], vocab_size: int, shift: int) -> list[list[int]]:
    """The workload's shapes with every token moved by shift: runs with different shifts share no prefix-cache page."""
    return [[(t + shift) % vocab_size for t in p] for p in prompts]


def gc_threshold_arg(text: str) -> int | None:
    """A --gc-gen0-threshold value: an integer >= 1, or 'python' (None: leave Python's own threshold)."""
    if text == "python":
        return None
    try:
        value = int(text)
        check_gc_gen0_threshold(value)  # the range rule LLM applies
    except ValueError:
        raise ValueError(f"--gc-gen0-threshold must be an integer >= 1 or 'python', got {text!r}") from None
    return value


class GcTimer:
    """Time and count the cyclic GC's collections per generation while installed in gc.callbacks."""

    def __init__(self) -> None:
        self.seconds, self.collections, self._start = [0.0] * 3, [0] * 3, 0.0
        self.longest = 0.0  # the longest single collection: the stall one step takes

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            pause = time.perf_counter() - self._start
            self.seconds[info["generation"]] += pause
            self.collections[info["generation"]] += 1
            self.longest = max(self.longest, pause)

    def per_step(self, steps: int) -> dict[str, float]:
        out = {"gc_ms": sum(self.seconds) / steps * 1e3}
        out.update({f"gc_gen{g}_per_step": self.collections[g] / steps for g in range(3)})
        return out


def offline(model: str, num_requests: int = 256, peers: bool = True, peer_requests: int = 32,
            workdir: Path | None = None, gc_freeze: bool = False, repeats: int = 1, **llm_kwargs) -> list[Row]:
    """Output and total tokens/s over wall time for the offline workload, after one untimed warm-up run.

    repeats: timed runs of the workload in the same engine, each on tokens of its own (no prefix-cache hit
    between runs); the rates reported are their median, each run's output rate is reported too. Also
    reports the cyclic GC's time and collections per run and its longest pause (every thread's);
    `garbage_collection_gen0_threshold` among llm_kwargs sets the executor loop's (LLM's default otherwise).
    gc_freeze: before the timed runs, move every live object to the GC's permanent generation
    (gc.freeze, as an application may choose to), so full collections skip torch and the model.
    """
    from llmfx.llm import LLM

    vocab = preset(model).vocab_size
    if not isinstance(repeats, int) or isinstance(repeats, bool) or not 1 <= repeats < vocab:
        raise ValueError(f"offline: repeats must be an integer in [1, {vocab - 1}] (runs need distinct tokens), "
                         f"got {repeats!r}")
    path = hf_checkpoint(model, workdir or Path(tempfile.mkdtemp()))
    work = offline_workload(vocab, num_requests)
    params = offline_params(work)
    prompts = [p for p, _ in work]
    out_tokens = sum(n for _, n in work)
    all_tokens = out_tokens + sum(len(p) for p in prompts)
    floor_s = 1.5 * num_requests / 256  # PERF.md: about 1.5 s for the whole 256-request workload
    elapsed: list[float] = []
    with LLM(path, skip_tokenizer_init=True, dtype="bfloat16", max_seq_len=2048 + 64, **llm_kwargs) as llm:
        llm.generate(shifted_prompts(prompts, vocab, repeats), params, use_tqdm=False)  # a shift no timed run uses
        if gc_freeze:
            gc.collect()
            gc.freeze()
        timer = GcTimer()
        gc.callbacks.append(timer)
        try:
            for run in range(repeats):  # run k on the tokens shifted by k: the first on the workload's own
                start = time.perf_counter()
                llm.generate(shifted_prompts(prompts, vocab, run), params, use_tqdm=False)
                elapsed.append(time.perf_counter() - start)
        finally:
            gc.callbacks.remove(timer)
            if gc_freeze:
                gc.unfreeze()
        preemptions = llm.scheduler_state.num_preemptions
    median_s = statistics.median(elapsed)

    def row(metric: str, value: float, floor_fraction: float | None = None) -> Row:
        return Row(benchmark="offline", system="llmfx", batch=num_requests, metric=metric, value=value,
                   floor_fraction=floor_fraction)

    rows = [row("output_tokens_per_s", out_tokens / median_s, floor_s / median_s),
            row("total_tokens_per_s", all_tokens / median_s)]
    if repeats > 1:
        rows += [row(f"output_tokens_per_s_run{k + 1}", out_tokens / s) for k, s in enumerate(elapsed)]
    rows += [row("preemptions", preemptions),
             row("gc_s", sum(timer.seconds) / repeats),
             row("gc_young_collections", (timer.collections[0] + timer.collections[1]) / repeats),
             row("gc_full_collections", timer.collections[2] / repeats),
             row("gc_longest_pause_ms", timer.longest * 1e3)]
    if peers:
        rows += _hf_offline(path, work[:peer_requests])
    return rows


def _hf_offline(path: Path, work: list[tuple[list[int], int]]) -> list[Row]:
    from transformers import AutoModelForCausalLM, GenerationConfig

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="paged|sdpa").cuda()
    config = GenerationConfig(max_new_tokens=max(n for _, n in work), do_sample=False, eos_token_id=None,
                              pad_token_id=0)
    # generate_batch takes one max_new_tokens: every request runs to the longest, counted as such.
    start = time.perf_counter()
    hf.generate_batch(inputs=[p for p, _ in work], generation_config=config)
    elapsed = time.perf_counter() - start
    tokens = config.max_new_tokens * len(work)
    del hf
    torch.cuda.empty_cache()
    return [Row(benchmark="offline", system=f"transformers paged|sdpa ({len(work)} requests)", batch=len(work),
                metric="output_tokens_per_s", value=tokens / elapsed)]


def startup_env(workdir: Path) -> dict[str, str]:
    """The environment of the startup runs: compile caches under workdir, empty for the cold run.

    Both caches: inductor's, and Triton's for llmfx's own kernels (by default ~/.triton/cache, shared
    by every run on the machine, so an earlier run would warm a "cold" one, e.g. the second tree of an A/B).
    """
    return {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(workdir / "inductor-cache"),
            "TRITON_CACHE_DIR": str(workdir / "triton-cache")}


def startup_script(path: Path) -> str:
    """The program `startup` times in a fresh process: build the LLM, serve one token, print its phases as JSON."""
    return ("import time, json; t0 = time.perf_counter(); from llmfx.llm import LLM; "
            "from llmfx.sampling_params import SamplingParams as S; "
            f"llm = LLM({str(path)!r}, skip_tokenizer_init=True, dtype='bfloat16', max_batch_size=256); "
            "llm.generate([[1, 2, 3]], S(max_tokens=1, detokenize=False), use_tqdm=False); "
            "print(json.dumps({'total': time.perf_counter() - t0, **llm.startup_seconds})); llm.shutdown()")


def startup(model: str, workdir: Path | None = None) -> list[Row]:
    """Process start to first token, with an empty compile cache and then with that cache warm."""
    workdir = workdir or Path(tempfile.mkdtemp())
    script = startup_script(hf_checkpoint(model, workdir))
    rows = []
    env = startup_env(workdir)
    for kind in ("cold", "warm"):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        wall = time.perf_counter() - start
        phases = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(Row(benchmark="startup", system="llmfx", batch=None, metric=f"{kind}_s", value=wall))
        rows += [Row(benchmark="startup", system="llmfx", batch=None, metric=f"{kind}_{k}_s", value=v)
                 for k, v in phases.items()]
    return rows


def graph_replay_us(fn, iters: int = 200) -> tuple[float, torch.cuda.CUDAGraph]:
    """Microseconds per replay of fn captured as one CUDA graph (after 3 eager warm-up calls), and the graph.

    Replays are timed by CUDA events, so launch overhead is out of the figure, as when serving.
    """
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / iters, graph


def decode_batch(cfg, batch: int, context: int, dtype: torch.dtype, device, page_size: int = 16):
    """(KV layers, ForwardBatch) of `batch` decode rows, each one token at position `context` with pages of its own."""
    per_seq = -(-(context + 1) // page_size)
    kv = KVPool.allocate(cfg, batch * per_seq + 1, page_size, dtype, device).take()
    chunks = [SequenceChunk((5,), context, tuple(range(1 + b * per_seq, 1 + (b + 1) * per_seq))) for b in range(batch)]
    return kv, pack(chunks, page_size, device, max_pages=per_seq)


def prefill_batch(cfg, lengths: list[int], dtype: torch.dtype, device, page_size: int = 16):
    """(KV layers, ForwardBatch) of whole prompts of these lengths, each from position 0 with pages of its own."""
    per_seq = [-(-n // page_size) for n in lengths]
    kv = KVPool.allocate(cfg, sum(per_seq) + 1, page_size, dtype, device).take()
    starts = [1 + sum(per_seq[:i]) for i in range(len(lengths))]
    chunks = [SequenceChunk(tuple((7 * i + j) % cfg.vocab_size for j in range(n)), 0, tuple(range(s, s + pages)))
              for i, (n, s, pages) in enumerate(zip(lengths, starts, per_seq))]
    return kv, pack(chunks, page_size, device)


def offline_prefill_lengths(num_tokens: int) -> list[int]:
    """The offline workload's first prompt lengths, the last cut so that they sum to num_tokens (a full prefill step)."""
    lengths: list[int] = []
    for prompt, _ in offline_workload(vocab_size=2):
        take = min(len(prompt), num_tokens - sum(lengths))
        if take == 0:
            break
        lengths.append(take)
    return lengths


def preset_dummy_params(model: str, device) -> tuple[object, dict]:
    """(config, bf16 params with dummy weights from seed 0) of a preset: what the kernel benchmarks run."""
    from llmfx.weights import load_params, resolve_model

    source = resolve_model(model)
    params = load_params(source, dtype="bfloat16", device=device, load_format="dummy", seed=0, max_positions=4096)
    return source.config, params


def compile_static(fn, device):
    """fn compiled as ModelEngine compiles a bucket's step (fullgraph, static shapes, inductor's kernels with PDL
    where llmfx's have it) but without CUDA graphs: the benchmarks capture and replay their own."""
    from llmfx.model_engine import inductor_pdl_options

    return torch.compile(fn, fullgraph=True, dynamic=False, options=inductor_pdl_options(torch.device(device)))


def finished_before(launches: Sequence[tuple[int, bool]]) -> list[int | None]:
    """Per launch (sequences, decode only?), how many sequences finished since the launch before it: the
    sequences it has fewer. None where either launch carries a prefill (sequences also join there)."""
    out: list[int | None] = [None] * len(launches)
    for k in range(1, len(launches)):
        (before, decode_before), (now, decode_now) = launches[k - 1], launches[k]
        if decode_before and decode_now:
            out[k] = before - now
    return out


class ColdL2Timer:
    """Microseconds of fn with the L2 cold, as a decode step's kernels meet their weights and KV: (a 256 MB read +
    fn) captured in a CUDA graph and replayed, less the read's own time. A read evicts the 50 MB L2 and leaves
    clean lines (a write would leave dirty ones, whose write-back could land in the timed kernel)."""

    def __init__(self, device, iters: int) -> None:
        self._buffer = torch.ones(64 << 20, dtype=torch.int32, device=device)
        self.iters = iters
        self.flush_us = graph_replay_us(self._evict, iters=iters)[0]

    def _evict(self) -> None:
        self._buffer.max()

    def __call__(self, fn) -> float:
        def cold():
            self._evict()
            fn()
        return graph_replay_us(cold, iters=self.iters)[0] - self.flush_us


def graph_kernel_table(graph: torch.cuda.CUDAGraph, replays: int = 10, row_limit: int = 40) -> str:
    """The CUDA kernels of `replays` replays of graph, grouped by name, as torch.profiler's table.

    Under PDL a kernel's time includes its wait for the one before: split a step into kernels without it.
    """
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=row_limit)


def print_kernel_table(graph: torch.cuda.CUDAGraph, save_as: Path | None = None) -> None:
    """Print graph_kernel_table(graph), and write it to save_as when given."""
    table = graph_kernel_table(graph)
    print(table)
    if save_as is not None:
        save_as.write_text(table)


def device_timed(fn, events: list[tuple[torch.cuda.Event, torch.cuda.Event]]):
    """fn, with CUDA events recorded around what each call queues, appended to events (read after the fact)."""
    def timed(*args, **kwargs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn(*args, **kwargs)
        end.record()
        events.append((start, end))
        return out
    return timed


def print_table(rows: list[Row]) -> None:
    """One aligned table: system, batch, metric, value, fraction of the floor."""
    print(f"{'benchmark':<10} {'system':<38} {'batch':>5} {'metric':<24} {'value':>12} {'floor':>7}")
    for r in rows:
        frac = "" if r.floor_fraction is None else f"{r.floor_fraction:.1%}"
        print(f"{r.benchmark:<10} {r.system:<38} {'' if r.batch is None else r.batch:>5} {r.metric:<24} "
              f"{r.value:>12.3f} {frac:>7}")


def source_commit() -> str:
    """The commit results are recorded against: $LLMFX_COMMIT when set, else git's HEAD here.

    The device tool's copy of the tree can carry a stale .git (its HEAD read the session's first commit all
    session long), so device commands name the commit: `LLMFX_COMMIT=<hash> bash benchmarks/gpu_run.sh ...`.
    """
    named = os.environ.get("LLMFX_COMMIT")
    if named:
        return named
    try:  # the tree llmfx is imported from, whatever the working directory
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip()


def save_rows(directory: Path, name: str, rows: list[dict], **fields) -> Path:
    """Write directory/name: a kernel benchmark's free-form rows with the GPU, torch and commit they ran on."""
    commit = source_commit()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / name
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    out.write_text(json.dumps({"gpu": gpu, "torch": torch.__version__, "commit": commit, **fields, "rows": rows},
                              indent=1))
    return out


def save(rows: list[Row], directory: Path, tag: str = "", extra: dict | None = None) -> Path:
    """Write benchmarks/results/<date>-<gpu><tag>.json with the environment, extra's fields and every figure."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    commit = source_commit()
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / f"{time.strftime('%Y-%m-%d')}-{gpu.replace(' ', '-').lower()}{tag}.json"
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "gpu": gpu, "torch": torch.__version__,
                               "commit": commit, **(extra or {}), "runs": [asdict(r) for r in rows]}, indent=1))
    return out
