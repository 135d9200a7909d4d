"""Cohort stage: the workflow's bookkeeping paths and the cohort summary table + report.

Pure core + thin I/O shell:

* :class:`CohortLayout` names the workflow's per-slide status, log and benchmark files and the
  cohort report files (per-slide results are named by :class:`pipeline.paths.SlidePaths`);
* :func:`slide_row` / :func:`cohort_table` turn per-slide artifacts into one table row per slide;
* :func:`run_cohort` writes ``PREFIX.csv``, ``PREFIX.parquet``, ``PREFIX.png`` and ``PREFIX.html``.

The sample sheet format is documented in :mod:`pipeline.samples`.

Cohort table (``PREFIX.csv`` / ``PREFIX.parquet``), one row per slide, sorted by ``slide_id``
--------------------------------------------------------------------------------------------
``slide_id`` str; ``status`` str (``ok`` | ``failed``); ``reason`` str (empty when ok);
``path`` str; ``nuclei`` Int64; ``tissue_mm2`` float64 (mm²); ``nuclei_per_mm2`` float64;
``rejected_count`` Int64 and ``rejected_per_mm2`` float64 (what a model that rejects removed as
"not a nucleus", ``summary["rejected"]``; missing for a model that does not reject);
``soft_tissue_fraction`` float64 (the fraction of the scored tissue blocks that are out of focus or
coarser than the model's µm/px, ``summary["focus"]["soft_fraction"]``; missing for outputs written
before it existed);
``<feature>_median`` float64 for each column of :data:`FEATURES` (units of the column, see
docs/outputs.md); for a model with a type head, per class (``summary["classes"]``, classes in
first-seen order) ``<class>_count`` Int64, ``<class>_per_mm2`` float64 (per mm² of tissue) and
``<class>_fraction`` float64 (none for an untyped model); ``runtime_s`` float64 (s: the sum of the workflow's per-stage job wall times
from the Snakemake benchmarks, else ``total_s`` of ``ID.timings.json``; summaries written before
the timings had their own file carry them as ``timings_s`` in the summary, read as a fallback).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from .paths import SlidePaths, atomic_write
from .samples import read_sample_sheet

log = logging.getLogger(__name__)

STAGES = ("check", "tile", "infer", "export")  # per-slide workflow jobs, in order

# per-nucleus measurement columns (docs/outputs.md) whose per-slide median goes into the cohort table
FEATURES = (
    "area_um2",
    "perimeter_um",
    "circularity",
    "solidity",
    "eccentricity",
    "max_caliper_um",
    "hematoxylin_od_mean",
    "eosin_od_mean",
)
COLUMNS = (
    ["slide_id", "status", "reason", "path", "nuclei", "tissue_mm2", "nuclei_per_mm2", "rejected_count",
     "rejected_per_mm2", "soft_tissue_fraction"]
    + [f"{name}_median" for name in FEATURES]
    + ["runtime_s"]
)


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class CohortLayout:
    """Where the workflow keeps its bookkeeping under ``outdir`` (results are in ``SlidePaths``).

    ``slide_id`` arguments may be a Snakemake wildcard such as ``"{slide}"``.
    """

    outdir: Path

    @property
    def status_dir(self) -> Path:
        return self.outdir / "status"

    @property
    def logs_dir(self) -> Path:
        return self.outdir / "logs"

    @property
    def benchmarks_dir(self) -> Path:
        return self.outdir / "benchmarks"

    @property
    def prefix(self) -> Path:
        return self.outdir / "cohort"

    def status(self, slide_id: str) -> Path:
        """``cellsam check`` result, JSON ``{"slide", "ok", "error"}``."""
        return status_path(self.status_dir, slide_id)

    def log(self, stage: str, slide_id: str) -> Path:
        return log_path(self.logs_dir, stage, slide_id)

    def benchmark(self, stage: str, slide_id: str) -> Path:
        return self.benchmarks_dir / stage / f"{slide_id}.tsv"

    def slide(self, slide_id: str) -> SlidePaths:
        return SlidePaths(self.outdir, slide_id)


def status_path(status_dir: str | os.PathLike, slide_id: str) -> Path:
    return Path(status_dir) / f"{slide_id}.check.json"


def log_path(logs_dir: str | os.PathLike, stage: str, slide_id: str) -> Path:
    return Path(logs_dir) / stage / f"{slide_id}.log"


def report_paths(prefix: str | os.PathLike) -> dict[str, Path]:
    """Files written by :func:`run_cohort` for ``prefix`` (``results/cohort`` -> ``results/cohort.csv`` ...)."""
    prefix = Path(prefix)
    return {ext: prefix.with_name(f"{prefix.name}.{ext}") for ext in ("csv", "parquet", "png", "html")}


# --------------------------------------------------------------------------- per-slide rows


def _read_json(path: Path) -> dict | None:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc)
        return None
    return data if isinstance(data, dict) else None


def _last_line(path: Path) -> str:
    """Last ``cellsam: error:`` line of a log, else its last non-empty line ('' if none)."""
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [ln for ln in lines if ln]
    errors = [ln for ln in lines if ln.startswith("cellsam: error:")]
    return (errors or lines or [""])[-1]


def failure_reason(slide_id: str, logs_dir: str | os.PathLike | None) -> str:
    """Reason for a slide without final outputs: the newest stage log's last (error) line."""
    if logs_dir is not None:
        logs = [(p.stat().st_mtime_ns, i, stage, p) for i, stage in enumerate(STAGES)
                if (p := log_path(logs_dir, stage, slide_id)).is_file()]
        if logs:
            _, _, stage, path = max(logs)
            line = _last_line(path)
            return f"{stage}: {line}" if line else f"{stage}: failed (empty log {path})"
    return "no outputs (not run, or failed before writing a log)"


def _number(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def summary_fields(summary: dict, timings: dict | None = None) -> dict:
    """Cohort columns from one ``ID.summary.json`` (docs/outputs.md; missing values -> NaN).

    Reads ``nuclei``, ``tissue_area_mm2``, ``nuclei_per_mm2``, ``measurements[<feature>]["median"]``
    and ``timings_s["total_s"]`` of ``timings`` (the content of ``ID.timings.json``), else of the
    summary (older outputs kept their timings there).
    """
    stats = summary.get("measurements")
    stats = stats if isinstance(stats, dict) else {}
    nuclei = summary.get("nuclei")
    out = {
        "nuclei": nuclei if isinstance(nuclei, int) and not isinstance(nuclei, bool) else None,
        "tissue_mm2": _number(summary.get("tissue_area_mm2")),
        "nuclei_per_mm2": _number(summary.get("nuclei_per_mm2")),
    }
    rejected = summary.get("rejected") if isinstance(summary.get("rejected"), dict) else {}
    count = rejected.get("count")
    out["rejected_count"] = count if isinstance(count, int) and not isinstance(count, bool) else None
    out["rejected_per_mm2"] = _number(rejected.get("density_per_mm2"))
    focus = summary.get("focus") if isinstance(summary.get("focus"), dict) else {}
    out["soft_tissue_fraction"] = _number(focus.get("soft_fraction"))
    for name in FEATURES:
        entry = stats.get(name)
        out[f"{name}_median"] = _number(entry.get("median") if isinstance(entry, dict) else None)
    classes = summary.get("classes") if isinstance(summary.get("classes"), dict) else {}
    model = summary.get("model") if isinstance(summary.get("model"), dict) else {}
    order = [n for n in (model.get("classes") or []) if n in classes]  # model order (JSON keys are sorted)
    for name in order + sorted(n for n in classes if n not in order):
        entry = classes[name] if isinstance(classes[name], dict) else {}
        count = entry.get("count")
        out[f"{name}_count"] = count if isinstance(count, int) and not isinstance(count, bool) else None
        out[f"{name}_per_mm2"] = _number(entry.get("density_per_mm2"))
        out[f"{name}_fraction"] = _number(entry.get("fraction"))
    timings = (timings or {}).get("timings_s", summary.get("timings_s"))
    out["runtime_s"] = _number(timings.get("total_s") if isinstance(timings, dict) else None)
    return out


#: suffixes of the per-class cohort columns (``<class>_count`` etc., from ``summary["classes"]``)
CLASS_SUFFIXES = ("_count", "_per_mm2", "_fraction")


def class_names_of(table) -> list[str]:
    """Nucleus classes with per-class columns in a cohort table, in column order."""
    return [c[: -len("_count")] for c in table.columns
            if c.endswith("_count") and c not in COLUMNS and f"{c[:-len('_count')]}_per_mm2" in table.columns]


def _benchmark_seconds(layout_dir: Path, slide_id: str) -> float:
    """Sum of the Snakemake benchmark wall times (column ``s``) of the slide's stages, NaN if none."""
    total, found = 0.0, False
    for stage in STAGES:
        path = layout_dir / stage / f"{slide_id}.tsv"
        try:
            header, values = path.read_text(encoding="utf-8").splitlines()[:2]
        except (OSError, ValueError):
            continue
        cols = dict(zip(header.split("\t"), values.split("\t")))
        try:
            total += float(cols["s"])
            found = True
        except (KeyError, ValueError):
            continue
    return total if found else math.nan


def slide_row(
    slide_id: str,
    path: str,
    results: Path,
    *,
    status_dir: Path | None = None,
    logs_dir: Path | None = None,
    benchmarks_dir: Path | None = None,
) -> dict:
    """One cohort row for a slide from its status file, summary and logs (see module docstring)."""
    row = {c: math.nan for c in COLUMNS}
    row.update(slide_id=slide_id, path=path, status="failed", reason="", nuclei=None)
    status = _read_json(status_path(status_dir, slide_id)) if status_dir is not None else None
    if status is not None and status.get("ok") is False:
        row["reason"] = f"check: {status.get('error') or 'slide not readable'}"
        return row
    paths = SlidePaths(Path(results), slide_id)
    summary = _read_json(paths.summary)
    missing = [p.name for p in paths.finals() if not p.is_file()]
    if summary is None or missing:
        row["reason"] = failure_reason(slide_id, logs_dir)
        return row
    row.update(summary_fields(summary, _read_json(paths.timings)))
    row.update(status="ok", reason="")
    if benchmarks_dir is not None:
        seconds = _benchmark_seconds(Path(benchmarks_dir), slide_id)
        if not math.isnan(seconds):
            row["runtime_s"] = seconds
    return row


def cohort_table(samples, results, *, status_dir=None, logs_dir=None, benchmarks_dir=None):
    """Cohort table: one row per slide of ``samples`` (from :func:`read_sample_sheet`), sorted by id.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`COLUMNS` with the dtypes listed in the module docstring.
    """
    import pandas as pd

    rows = [
        slide_row(
            sid, str(samples.loc[sid, "path"]), Path(results),
            status_dir=status_dir, logs_dir=logs_dir, benchmarks_dir=benchmarks_dir,
        )
        for sid in sorted(samples.index)
    ]
    names = []  # per-class columns: classes in first-seen order (slides sorted by id)
    for row in rows:
        for key in row:
            if key.endswith("_count") and key not in COLUMNS and key[: -len("_count")] not in names:
                names.append(key[: -len("_count")])
    class_cols = [f"{n}{suf}" for n in names for suf in CLASS_SUFFIXES]
    table = pd.DataFrame(rows, columns=list(COLUMNS[:-1]) + class_cols + [COLUMNS[-1]])
    for col in ("slide_id", "status", "reason", "path"):
        table[col] = table[col].astype(str)
    table["nuclei"] = table["nuclei"].astype("Int64")
    for col in list(COLUMNS[5:]) + class_cols:
        table[col] = table[col].astype("Int64" if col.endswith("_count") else "float64")
    return table.reset_index(drop=True)


# --------------------------------------------------------------------------- report


def nucleus_areas(parquet: Path):
    """Nucleus areas (µm², float64 1-D array) from an ``ID.nuclei.parquet``; empty if unavailable."""
    import numpy as np
    import pyarrow.parquet as pq

    try:
        if "area_um2" not in pq.read_schema(parquet).names:
            return np.zeros(0, dtype=np.float64)
        values = pq.read_table(parquet, columns=["area_um2"]).column("area_um2").to_numpy(zero_copy_only=False)
    except (OSError, ValueError) as exc:
        log.warning("no nucleus areas from %s: %s", parquet, exc)
        return np.zeros(0, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    return values[np.isfinite(values)]


def render_figure(table, areas: dict) -> bytes:
    """PNG bytes: nucleus-area box plots and nucleus density per slide; failed slides in red.

    Parameters
    ----------
    table : pandas.DataFrame
        From :func:`cohort_table`.
    areas : dict of str to ndarray
        ``slide_id`` -> nucleus areas (µm², float64) for the slides with status ``ok``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ids = list(table["slide_id"])[::-1]  # top-to-bottom = sorted order
    n = max(len(ids), 1)
    fig, (ax_area, ax_dens) = plt.subplots(
        1, 2, figsize=(10, 1.2 + 0.35 * n), sharey=True, gridspec_kw={"width_ratios": [3, 2]}
    )
    status = dict(zip(table["slide_id"], table["status"]))
    density = dict(zip(table["slide_id"], table["nuclei_per_mm2"]))
    ys = list(range(len(ids)))
    data = [areas.get(sid) for sid in ids]
    with_data = [(y, d) for y, d in zip(ys, data) if d is not None and len(d)]
    if with_data:
        mpl_version = tuple(int(v) for v in matplotlib.__version__.split(".")[:2])
        orient = {"orientation": "horizontal"} if mpl_version >= (3, 10) else {"vert": False}
        ax_area.boxplot(
            [d for _, d in with_data], positions=[y for y, _ in with_data],
            widths=0.6, showfliers=False, manage_ticks=False, **orient,
        )
    ax_area.set_xlabel("nucleus area (µm²)")
    ax_area.set_title("Nucleus area per slide")
    dens = [density[sid] if status[sid] == "ok" and math.isfinite(density[sid]) else 0.0 for sid in ids]
    names = class_names_of(table)
    if names:  # typed model: per-class density per slide, stacked, in the classes' fixed colours
        from .data.classes import ClassVocabulary

        vocab = ClassVocabulary.from_names(names)
        left = [0.0] * len(ids)
        for name, rgb in zip(vocab.names, vocab.colors):
            per = dict(zip(table["slide_id"], table[f"{name}_per_mm2"]))
            vals = [per[sid] if status[sid] == "ok" and math.isfinite(per[sid]) else 0.0 for sid in ids]
            ax_dens.barh(ys, vals, left=left, color=tuple(v / 255 for v in rgb), label=name)
            left = [a + b for a, b in zip(left, vals)]
        ax_dens.set_title("Density per class per slide")
    else:
        ax_dens.barh(ys, dens, color="#4c72b0")
        left = dens
        ax_dens.set_title("Density per slide")
    if "rejected_per_mm2" in table.columns:  # what a model that rejects removed, after the nuclei
        per = dict(zip(table["slide_id"], table["rejected_per_mm2"]))
        removed = [per[sid] if status[sid] == "ok" and math.isfinite(per[sid]) else 0.0 for sid in ids]
        if any(removed):
            ax_dens.barh(ys, removed, left=left, facecolor="white", edgecolor="#888888", hatch="////",
                         linewidth=0.5, label="removed: not a nucleus")
    if names or ax_dens.get_legend_handles_labels()[0]:
        # outside the axes, right of them: never over a bar, whatever the number of slides
        ax_dens.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax_dens.set_xlabel("nuclei per mm²")
    for y, sid in zip(ys, ids):
        if status[sid] != "ok":
            ax_dens.text(0, y, " failed", va="center", color="#c0392b", fontsize=8)
    ax_area.set_yticks(ys)
    ax_area.set_yticklabels(ids, fontsize=8)
    for label, sid in zip(ax_area.get_yticklabels(), ids):
        if status[sid] != "ok":
            label.set_color("#c0392b")
    ax_area.set_ylim(-0.7, len(ids) - 0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None}, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def render_html(table, png: bytes) -> str:
    """Self-contained HTML report (inline CSS, the figure as a data URI); no timestamps."""
    ok = int((table["status"] == "ok").sum())
    failed = table[table["status"] != "ok"]
    shown = table.drop(columns=["path"])
    rows_html = shown.to_html(index=False, na_rep="", float_format=lambda v: f"{v:.4g}", border=0)
    if len(failed):
        items = "".join(
            f"<li><b>{html.escape(sid)}</b>: {html.escape(reason)}</li>"
            for sid, reason in zip(failed["slide_id"], failed["reason"])
        )
        failed_html = f"<h2>Failed slides ({len(failed)})</h2><ul class='failed'>{items}</ul>"
    else:
        failed_html = "<h2>Failed slides</h2><p>None.</p>"
    img = base64.b64encode(png).decode("ascii")
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>cellsam cohort report</title>"
        "<style>body{font-family:sans-serif;margin:2em;}table{border-collapse:collapse;font-size:90%;}"
        "th,td{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right;}"
        "th:first-child,td:first-child{text-align:left;}.failed li{color:#c0392b;}</style></head><body>\n"
        f"<h1>cellsam cohort report</h1>\n<p>{len(table)} slides: {ok} ok, {len(failed)} failed.</p>\n"
        f"{failed_html}\n<h2>Plots</h2>\n<img alt='nucleus area and density per slide' "
        f"src='data:image/png;base64,{img}'>\n<h2>Per-slide summary</h2>\n{rows_html}\n</body></html>\n"
    )


def _write_atomic(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_report(table, areas: dict, prefix: str | os.PathLike) -> dict[str, Path]:
    """Write the table (CSV, parquet), figure (PNG) and HTML report for ``prefix`` atomically."""
    paths = report_paths(prefix)
    paths["csv"].parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(paths["csv"], table.to_csv(index=False, lineterminator="\n").encode("utf-8"))
    buf = io.BytesIO()
    table.to_parquet(buf, index=False)
    _write_atomic(paths["parquet"], buf.getvalue())
    png = render_figure(table, areas)
    _write_atomic(paths["png"], png)
    _write_atomic(paths["html"], render_html(table, png).encode("utf-8"))
    return paths


def run_cohort(
    results: str | os.PathLike,
    samples: str | os.PathLike,
    prefix: str | os.PathLike,
    *,
    status_dir: str | os.PathLike | None = None,
    logs_dir: str | os.PathLike | None = None,
    benchmarks_dir: str | os.PathLike | None = None,
):
    """Summarise a cohort: read the sheet, build the table, write the report files.

    Parameters
    ----------
    results : path
        Directory holding the per-slide outputs (``SlidePaths`` layout).
    samples : path
        Sample sheet; slide files need not exist any more.
    prefix : path
        Output prefix; see :func:`report_paths`.
    status_dir, logs_dir, benchmarks_dir : path, optional
        Workflow bookkeeping (:class:`CohortLayout`); absent ones are ignored.

    Returns
    -------
    pandas.DataFrame
        The cohort table.

    Raises
    ------
    ConfigError
        For a bad sample sheet.
    OutputError
        If the report cannot be written.
    """
    from .errors import OutputError

    sheet = read_sample_sheet(samples, check_files=False)
    dirs = [Path(d) if d is not None else None for d in (status_dir, logs_dir, benchmarks_dir)]
    table = cohort_table(sheet, Path(results), status_dir=dirs[0], logs_dir=dirs[1], benchmarks_dir=dirs[2])
    areas = {
        sid: nucleus_areas(SlidePaths(Path(results), sid).parquet)
        for sid, st in zip(table["slide_id"], table["status"])
        if st == "ok"
    }
    try:
        write_report(table, areas, prefix)
    except OSError as exc:
        raise OutputError(f"cannot write cohort report {prefix}: {exc.strerror or exc}") from None
    n_failed = int((table["status"] != "ok").sum())
    log.info("cohort: %d slides, %d failed -> %s.*", len(table), n_failed, prefix)
    for sid, reason in zip(table["slide_id"], table["reason"]):
        if reason:
            log.warning("slide %s failed: %s", sid, reason)
    return table
