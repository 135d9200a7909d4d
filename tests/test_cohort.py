"""Cohort stage: the cohort table and report on fabricated per-slide results."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.cohort import COLUMNS, CohortLayout, cohort_table, report_paths, run_cohort, summary_fields
from pipeline.errors import ConfigError
from pipeline.paths import SlidePaths
from pipeline.samples import read_sample_sheet

CELLSAM = [sys.executable, "-m", "pipeline.cli"]


def _write_sheet(path: Path, rows: list[str], header: str = "slide_id\tpath\tmpp") -> Path:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def _fake_slide(tmp: Path, name: str) -> Path:
    p = tmp / "slides" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"not really a slide")
    return p


def _fake_results(results: Path, slide_id: str, areas: np.ndarray, tissue_mm2: float, runtime: float) -> None:
    """Per-slide outputs as `cellsam export` names them (contents: what the cohort reads)."""
    paths = SlidePaths(results, slide_id)
    results.mkdir(parents=True, exist_ok=True)
    summary = {
        "nuclei": int(len(areas)),
        "tissue_area_mm2": tissue_mm2,
        "nuclei_per_mm2": len(areas) / tissue_mm2,
        "measurements": {
            "area_um2": {"median": float(np.median(areas)), "mean": float(areas.mean())},
            "circularity": {"median": 0.8},
            "hematoxylin_od_mean": {"median": 0.45},
        },
        "timings_s": {"infer_s": runtime / 2, "export_total_s": runtime / 2, "total_s": runtime},
    }
    paths.summary.write_text(json.dumps(summary), encoding="utf-8")
    pd.DataFrame({"nucleus_id": np.arange(len(areas), dtype=np.int64), "area_um2": areas}).to_parquet(paths.parquet)
    paths.geojson_gz.write_bytes(b"\x1f\x8b")
    paths.qc_png.write_bytes(b"\x89PNG")


@pytest.fixture
def cohort(tmp_path):
    """Three slides listed out of order: two with results, one failed its check, one failed in infer."""
    for name in ("b.svs", "a.svs", "c.svs", "d.svs"):
        _fake_slide(tmp_path, name)
    sheet = _write_sheet(
        tmp_path / "samples.tsv",
        ["s-b\tslides/b.svs\t", "s-a\tslides/a.svs\t0.25", "s-c\tslides/c.svs\t", "s-d\tslides/d.svs\t"],
    )
    results = tmp_path / "results"
    layout = CohortLayout(results)
    rng = np.random.default_rng(0)
    _fake_results(results, "s-a", rng.uniform(20, 60, 200), tissue_mm2=0.5, runtime=10.0)
    _fake_results(results, "s-b", rng.uniform(30, 90, 100), tissue_mm2=0.25, runtime=4.0)
    layout.status_dir.mkdir(parents=True)
    for sid in ("s-a", "s-b", "s-d"):
        layout.status(sid).write_text(json.dumps({"slide": sid, "ok": True, "error": None}))
    layout.status("s-c").write_text(
        json.dumps({"slide": "c.svs", "ok": False, "error": "c.svs: not a slide OpenSlide can read"})
    )
    log = layout.log("infer", "s-d")
    log.parent.mkdir(parents=True)
    log.write_text("INFO starting\ncellsam: error: out of memory (try a smaller --chunk or --batch-size)\n")
    return tmp_path, sheet, results, layout


def test_summary_fields_follow_the_summary_schema():
    fields = summary_fields(
        {"nuclei": 5, "tissue_area_mm2": 2.0, "nuclei_per_mm2": 2.5,
         "measurements": {"area_um2": {"median": 31.5, "mean": 30.0}, "circularity": {"median": None}},
         "timings_s": {"infer_s": 1.0, "total_s": 9.0}}
    )
    assert fields["nuclei"] == 5 and fields["tissue_mm2"] == 2.0 and fields["nuclei_per_mm2"] == 2.5
    assert fields["area_um2_median"] == 31.5 and fields["runtime_s"] == 9.0
    assert math.isnan(fields["circularity_median"]) and math.isnan(fields["solidity_median"])
    empty = summary_fields({"nuclei": 0, "tissue_area_mm2": 0.0, "nuclei_per_mm2": None, "measurements": {}})
    assert empty["nuclei"] == 0 and math.isnan(empty["nuclei_per_mm2"]) and math.isnan(empty["runtime_s"])
    assert fields["rejected_count"] is None and math.isnan(fields["rejected_per_mm2"])  # a model that does not reject
    rej = summary_fields({"nuclei": 5, "rejected": {"count": 3, "density_per_mm2": 1.5, "threshold": 0.7}})
    assert rej["rejected_count"] == 3 and rej["rejected_per_mm2"] == 1.5
    assert math.isnan(fields["soft_tissue_fraction"])  # outputs written before the focus score
    soft = summary_fields({"nuclei": 5, "focus": {"soft_fraction": 0.25, "blocks_scored": 8}})
    assert soft["soft_tissue_fraction"] == 0.25


def test_cohort_table_rows_order_and_reasons(cohort):
    _, sheet, results, layout = cohort
    samples = read_sample_sheet(sheet)
    table = cohort_table(samples, results, status_dir=layout.status_dir, logs_dir=layout.logs_dir)
    assert list(table.columns) == list(COLUMNS)
    assert list(table["slide_id"]) == ["s-a", "s-b", "s-c", "s-d"]
    assert list(table["status"]) == ["ok", "ok", "failed", "failed"]
    assert table.loc[0, "nuclei"] == 200 and table.loc[1, "nuclei"] == 100
    assert table.loc[0, "nuclei_per_mm2"] == pytest.approx(400.0)
    assert table.loc[1, "runtime_s"] == pytest.approx(4.0)
    assert table.loc[0, "hematoxylin_od_mean_median"] == pytest.approx(0.45)
    assert table.loc[2, "reason"] == "check: c.svs: not a slide OpenSlide can read"
    assert table.loc[3, "reason"] == "infer: cellsam: error: out of memory (try a smaller --chunk or --batch-size)"
    assert pd.isna(table.loc[2, "nuclei"]) and math.isnan(table.loc[3, "tissue_mm2"])


def test_benchmarks_override_summary_runtime(cohort):
    _, sheet, results, layout = cohort
    for stage, seconds in (("tile", 1.25), ("infer", 3.5), ("export", 0.25)):
        path = layout.benchmark(stage, "s-a")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"s\th:m:s\tmax_rss\n{seconds}\t0:00:01\t100\n")
    table = cohort_table(read_sample_sheet(sheet), results, benchmarks_dir=layout.benchmarks_dir)
    assert table.loc[0, "runtime_s"] == pytest.approx(5.0)
    assert table.loc[1, "runtime_s"] == pytest.approx(4.0)  # no benchmarks: the summary's timings


def test_run_cohort_writes_deterministic_report(cohort, tmp_path):
    _, sheet, results, layout = cohort
    prefix = tmp_path / "out" / "cohort"
    run_cohort(results, sheet, prefix, status_dir=layout.status_dir, logs_dir=layout.logs_dir)
    files = report_paths(prefix)
    first = {k: p.read_bytes() for k, p in files.items()}
    assert all(len(b) > 100 for b in first.values())
    assert first["png"].startswith(b"\x89PNG")
    table = pd.read_parquet(files["parquet"])
    assert list(table["slide_id"]) == ["s-a", "s-b", "s-c", "s-d"]
    assert pd.read_csv(files["csv"])["status"].tolist() == ["ok", "ok", "failed", "failed"]
    page = first["html"].decode("utf-8")
    assert "data:image/png;base64," in page and "<script" not in page
    assert "s-c</b>: check: c.svs: not a slide OpenSlide can read" in page
    assert "Failed slides (2)" in page
    assert not list(prefix.parent.glob("*.tmp-*"))
    run_cohort(results, sheet, prefix, status_dir=layout.status_dir, logs_dir=layout.logs_dir)
    assert {k: p.read_bytes() for k, p in files.items()} == first


def test_cli_cohort_defaults_to_layout_dirs(cohort):
    tmp, sheet, results, _ = cohort
    proc = subprocess.run(
        [*CELLSAM, "--quiet", "cohort", "--results", str(results), "--samples", str(sheet), "-o", str(tmp / "c")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    csv = pd.read_csv(tmp / "c.csv")
    assert csv.loc[csv["slide_id"] == "s-c", "reason"].item().startswith("check: ")
    assert csv.loc[csv["slide_id"] == "s-d", "reason"].item().startswith("infer: cellsam: error: out of memory")


def test_cli_cohort_bad_sheet_is_one_line_error(tmp_path):
    sheet = _write_sheet(tmp_path / "s.tsv", ["x\ty.svs"], header="slide_id\tpth")
    (tmp_path / "r").mkdir()
    proc = subprocess.run(
        [*CELLSAM, "cohort", "--results", str(tmp_path / "r"), "--samples", str(sheet), "-o", str(tmp_path / "c")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == ConfigError.exit_code
    assert proc.stderr.strip().splitlines() == [
        f"cellsam: error: sample sheet {sheet}: unknown column(s) 'pth'; allowed: slide_id, path, mpp"
    ]


def test_figure_stacks_what_was_removed_after_the_nuclei():
    """A model that rejects: the removed density per slide is a hatched segment after the nuclei, so
    a slide where the filter removed much stands out; none drawn when nothing was removed."""
    import pandas as pd
    from PIL import Image

    from pipeline.cohort import render_figure

    base = {"slide_id": ["a", "b"], "status": ["ok", "ok"], "nuclei_per_mm2": [1000.0, 1000.0]}
    none = render_figure(pd.DataFrame({**base, "rejected_per_mm2": [0.0, 0.0]}), {})
    some = render_figure(pd.DataFrame({**base, "rejected_per_mm2": [50.0, 600.0]}), {})
    assert render_figure(pd.DataFrame({**base, "rejected_per_mm2": [50.0, 600.0]}), {}) == some  # same bytes
    assert none == render_figure(pd.DataFrame(base), {})  # no removal, no segment, no legend

    def grey(png):  # hatch lines and bar edges in #888888
        px = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).reshape(-1, 3).astype(int)
        return int((np.abs(px - 136).sum(axis=1) < 40).sum())

    assert grey(some) > grey(none) + 200
