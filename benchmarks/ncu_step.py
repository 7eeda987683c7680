"""Where a decode forward's device time goes, kernel by kernel, from Nsight Compute's counters (GPU with ncu).

Run the forward under ncu, then summarize its CSV (the summary needs no GPU):

    ncu --clock-control none --cache-control none --profile-from-start off --csv --page raw --print-units base \\
        --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,launch__grid_size,\\
    launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active \\
        python benchmarks/ncu_step.py --batch 1 --context 1024 > b1.csv
    python benchmarks/ncu_step.py --summarize b1.csv [--save DIR]

The forward is the TinyLlama shape (dummy bf16 weights), `batch` decode rows at `context`, compiled as the
engine compiles it (fullgraph, static shapes, inductor's kernels with PDL) and run twice before the profiled
call, so only one forward's kernels are counted. ncu runs kernels one at a time, so each duration is the
kernel alone: PDL's overlap between neighbours is not in it (compare the sum with the forward's CUDA-graph
time). Per kernel name the summary gives the calls, the time, the DRAM bytes and the time those bytes take
at the copy bandwidth (H200_COPY_BYTES_PER_S): a kernel far above that time is bound by latency, not bytes.
"""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

from llmfx.bench import H200_COPY_BYTES_PER_S, save_rows

DURATION, READ, WRITE = "gpu__time_duration.sum", "dram__bytes_read.sum", "dram__bytes_write.sum"
GRID, REGISTERS, OCCUPANCY = "launch__grid_size", "launch__registers_per_thread", \
    "sm__warps_active.avg.pct_of_peak_sustained_active"
DEVICE = "device__attribute_display_name"  # ncu prints it with every raw-page query


def parse_ncu_csv(text: str) -> list[dict]:
    """Rows of ncu's `--csv --page raw --print-units base` output: kernel name and the metrics above, as numbers.

    ncu prints its own log lines (==PROF==) and the program's output around the table: the table starts at the
    header row that names "Kernel Name", and its second row holds the units.
    """
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('"ID"') and '"Kernel Name"' in line)
    table = [line for line in lines[start:] if line.startswith('"')]
    reader = csv.DictReader(io.StringIO("\n".join(table)))
    rows = []
    for record in list(reader)[1:]:  # the first record is the units row
        row = {"kernel": record["Kernel Name"], "device": record.get(DEVICE, "")}
        for metric in (DURATION, READ, WRITE, GRID, REGISTERS, OCCUPANCY):
            if metric in record:
                row[metric] = float(record[metric].replace(",", ""))
        rows.append(row)
    return rows


def short_name(kernel: str) -> str:
    """A kernel's name without its template arguments or parameter list."""
    return kernel.split("(")[0].split("<")[0].strip()


def summarize(rows: list[dict]) -> list[dict]:
    """Per kernel name, most time first: calls, us, DRAM MB, achieved TB/s, us at the copy bandwidth, the excess."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(short_name(row["kernel"]), []).append(row)
    out = []
    for name, members in groups.items():
        ns = sum(r[DURATION] for r in members)
        moved = sum(r.get(READ, 0.0) + r.get(WRITE, 0.0) for r in members)
        at_bandwidth_us = moved / H200_COPY_BYTES_PER_S * 1e6
        out.append({"kernel": name, "calls": len(members), "us": ns / 1e3, "dram_mb": moved / 1e6,
                    "tb_per_s": moved / ns / 1e3 if ns else 0.0, "at_copy_bandwidth_us": at_bandwidth_us,
                    "excess_us": ns / 1e3 - at_bandwidth_us,
                    "grid": sorted({int(r[GRID]) for r in members if GRID in r}),
                    "registers": sorted({int(r[REGISTERS]) for r in members if REGISTERS in r}),
                    "occupancy_pct": (sum(r.get(OCCUPANCY, 0.0) for r in members) / len(members))})
    return sorted(out, key=lambda r: -r["us"])


def print_summary(summary: list[dict]) -> None:
    total_us = sum(r["us"] for r in summary)
    total_floor = sum(r["at_copy_bandwidth_us"] for r in summary)
    print(f"{'kernel':<58} {'calls':>5} {'us':>9} {'share':>6} {'DRAM MB':>9} {'TB/s':>6} {'floor us':>9} "
          f"{'excess':>8} {'occ %':>6}")
    for r in summary:
        print(f"{r['kernel'][:58]:<58} {r['calls']:>5} {r['us']:>9.1f} {r['us'] / total_us:>6.1%} {r['dram_mb']:>9.1f} "
              f"{r['tb_per_s']:>6.2f} {r['at_copy_bandwidth_us']:>9.1f} {r['excess_us']:>8.1f} {r['occupancy_pct']:>6.1f}")
    print(f"{'all kernels':<58} {sum(r['calls'] for r in summary):>5} {total_us:>9.1f} {'':>6} "
          f"{sum(r['dram_mb'] for r in summary):>9.1f} {'':>6} {total_floor:>9.1f} {total_us - total_floor:>8.1f}")


def run_forward(batch: int, context: int, model: str) -> None:
    """Compile and run the decode forward twice, then once between cudaProfilerStart and Stop (what ncu counts)."""
    import torch

    from llmfx.bench import compile_static, decode_batch, preset_dummy_params
    from llmfx.models import forward

    device = torch.device("cuda")
    cfg, params = preset_dummy_params(model, device)
    kv, inputs = decode_batch(cfg, batch, context, torch.bfloat16, device)
    fwd = compile_static(lambda: forward(params, cfg, inputs, kv), device)
    with torch.inference_mode():
        for _ in range(2):
            fwd()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        fwd()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tinyllama-1.1b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--summarize", type=Path, default=None, help="an ncu CSV to summarize instead of running")
    parser.add_argument("--save", type=Path, default=None)
    args = parser.parse_args()
    if args.summarize is None:
        run_forward(args.batch, args.context, args.model)
        return
    rows = parse_ncu_csv(args.summarize.read_text())
    summary = summarize(rows)
    print_summary(summary)
    if args.save:
        # The GPU the CSV was measured on, not the one summarizing it.
        save_rows(args.save, f"{args.summarize.stem}.json", summary, source=args.summarize.name, kernels=len(rows),
                  gpu=rows[0]["device"] or "not in the CSV", torch="not in the CSV")


if __name__ == "__main__":
    main()
