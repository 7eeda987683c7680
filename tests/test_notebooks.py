"""The notebooks run top to bottom on CPU and save non-empty PNG figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")
pytest.importorskip("pandas")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_notebook(name: str, workdir: Path, monkeypatch, results_dir: Path, expect_text: str = "") -> list[Path]:
    """Execute a notebook in workdir (60 s a cell); returns the PNGs it saved."""
    figures = workdir / "figures"
    monkeypatch.setenv("LLMFX_FIGURES_DIR", str(figures))
    monkeypatch.setenv("LLMFX_RESULTS_DIR", str(results_dir))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbclient.NotebookClient(nb, timeout=60, kernel_name="python3",
                            resources={"metadata": {"path": str(workdir)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert expect_text in text
    pngs = sorted(figures.glob("*.png")) if figures.is_dir() else []
    for png in pngs:
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, f"{png.name} is not a non-empty PNG"
    return pngs


def test_quickstart_runs(tmp_path, monkeypatch):
    run_notebook("01_quickstart.ipynb", tmp_path, monkeypatch, tmp_path / "none")


def test_scheduling_policies_saves_its_figures(tmp_path, monkeypatch):
    pngs = run_notebook("02_scheduling_policies.ipynb", tmp_path, monkeypatch, tmp_path / "none",
                        expect_text="keeps every engine invariant")
    assert {p.name for p in pngs} == {"latency_cdf.png", "kv_usage.png"}


def test_performance_plots_result_files(tmp_path, monkeypatch):
    results = tmp_path / "results"
    results.mkdir()
    runs = [{"benchmark": "latency", "system": system, "batch": b, "metric": "output tok/s", "value": v * b,
             "floor_fraction": f} for system, v, f in (("llmfx", 900.0, 0.4), ("transformers", 70.0, 0.03))
            for b in (1, 8, 64)]
    (results / "2026-11-29.json").write_text(json.dumps(
        {"date": "2026-11-29", "gpu": "NVIDIA H200", "torch": "2.11.0", "commit": "0123456789", "runs": runs}))
    pngs = run_notebook("03_performance.ipynb", tmp_path, monkeypatch, results)
    assert {p.name for p in pngs} == {"throughput.png", "floor_fraction.png"}


def test_performance_says_so_without_results(tmp_path, monkeypatch):
    pngs = run_notebook("03_performance.ipynb", tmp_path, monkeypatch, tmp_path / "missing",
                        expect_text="No benchmark results")
    assert pngs == []
