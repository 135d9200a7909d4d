"""One slide end to end: slide -> tile store -> chunked inference -> stitching -> exports.

:func:`run_segment` (``cellsam segment``) = ``write_store`` (``cellsam tile``) + :func:`run_infer`
(``cellsam infer``, the GPU part) + :func:`run_export` (``cellsam export``, CPU only). The
Snakemake workflow runs the three commands as separate jobs; ``segment`` runs them in one process.

Outputs (names from :mod:`pipeline.paths`, all written to a temp sibling and renamed):

* ``<id>.geojson.gz`` (and ``<id>.geojson`` with ``geojson_plain``): QuPath detections;
* ``<id>.nuclei.parquet``: GeoParquet, one row per nucleus;
* ``<id>.summary.json``: counts, per-slide statistics, parameters, software and model versions;
* ``<id>.timings.json``: stage timings (seconds);
* ``<id>.qc.png``: QC image (:mod:`pipeline.qc`);
* ``rejected/<id>.geojson.gz`` and ``rejected/<id>.nuclei.parquet``, for a model that rejects
  (patch typer, or type head with a reject output): the instances it removed as "not a nucleus",
  stitched with the nuclei and then split off (:func:`pipeline.assemble.split_rejected`), as
  QuPath ``Ignore*`` detections, for review; the QC crop outlines them in grey.

Memory: the export streams the nuclei strip by strip (:mod:`pipeline.assemble`) into all outputs
at once, so no stage holds the slide's nucleus table; peak memory grows with the slide's width,
not its area (``benchmarks/results/stitch_curve.md``).

The summary is written last and marks a complete set: a failed export (disk full, interrupt)
removes the old summary and every output it wrote, so a set without a summary is incomplete.

Determinism: every output is a function of (slide, parameters, model, software versions) only,
byte for byte, the summary included; no machine paths are written (:func:`pipeline.paths.public_value`).
The single exception is ``<id>.timings.json`` (wall-clock seconds per stage), kept out of the summary.

A slide without tissue, or with tissue but no nuclei, gives valid empty outputs and a summary with
``"nuclei": 0`` and a ``"note"`` saying why.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import __version__
from .config import FOCUS_BLOCK_UM, FOCUS_SOFT_BELOW, FOCUS_WARN_FRACTION, REJECTED_WARN_FRACTION, Config
from .errors import InputError
from .infer import list_chunk_files, read_chunks_meta, run_infer
from .paths import SlidePaths, public_value, slide_id_from_path, slide_paths, unlink_quietly
from .testhooks import pause_point

log = logging.getLogger(__name__)

SUMMARY_SCHEMA_VERSION = 1
from .infer import TIMINGS_NAME


def _software_versions() -> dict:
    import importlib.metadata as md

    out = {"cellsam": __version__, "python": platform.python_version()}
    for dist in ("numpy", "shapely", "pyarrow", "zarr", "scikit-image", "openslide-python", "torch"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


def _check_chunks(chunks_dir: Path, attrs: dict, store_path: str) -> dict:
    """The chunk files of every tissue chunk, after checking they belong to this store."""
    meta = read_chunks_meta(chunks_dir)
    got = meta.get("store", {})
    for key in ("source_sha256", "mpp", "shape_rc", "chunk_px"):
        want = attrs.get(key)
        if key == "mpp":
            want = float(want)
        if key == "shape_rc":
            want = [int(v) for v in want]
        if got.get(key) != want:
            raise InputError(
                f"{chunks_dir}: chunk files were computed from another store ({key} {got.get(key)!r} != "
                f"{want!r} in {store_path}); rerun `cellsam infer {store_path} -o {chunks_dir}`"
            )
    files = list_chunk_files(chunks_dir)
    expected = sorted(tuple(int(v) for v in rc) for rc in attrs.get("tissue_chunks", []))
    missing = [rc for rc in expected if rc not in files]
    if missing:
        raise InputError(
            f"{chunks_dir}: {len(missing)} of {len(expected)} chunk files missing (e.g. {missing[0][0]}_{missing[0][1]}.parquet); "
            f"rerun `cellsam infer {store_path} -o {chunks_dir}`"
        )
    return {rc: files[rc] for rc in expected}


class _ParquetColumns:
    """Read-one-column-at-a-time view of a Parquet file for :func:`pipeline.measure.summarize`."""

    def __init__(self, path):
        import pyarrow.parquet as pq

        self._file = pq.ParquetFile(path)
        self.num_rows = self._file.metadata.num_rows
        self.column_names = self._file.schema_arrow.names

    def __getitem__(self, name):
        return self._file.read(columns=[name])[name]


def _parquet_outlines(path, scale_xy_l0, classes=False):
    """``outlines(chunk_rc, crop)`` for :class:`pipeline.qc.QCAccumulator`: store-px polygons of the
    nuclei of chunk ``chunk_rc`` and its neighbours, read back from the written GeoParquet (with
    ``classes``: ``(polygons, class name of each)``)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from .geometry import from_wkb, scale_translate

    def outlines(chunk_rc, _crop):
        r, c = chunk_rc
        t = pq.read_table(path, columns=["chunk_row", "chunk_col", "geometry"] + (["class"] if classes else []),
                          filters=[("chunk_row", ">=", r - 1), ("chunk_row", "<=", r + 1)])
        col = t["chunk_col"]
        t = t.filter(pc.and_(pc.greater_equal(col, c - 1), pc.less_equal(col, c + 1)))
        geoms = scale_translate(from_wkb(t["geometry"]), (1.0 / scale_xy_l0[0], 1.0 / scale_xy_l0[1]), (0.0, 0.0))
        return (geoms, t["class"].to_pylist()) if classes else geoms

    return outlines


def _focus_summary(focus: dict) -> dict | None:
    """``summary["focus"]`` from :attr:`pipeline.assemble.ChunkScan.focus` (None when the chunk files
    carry no sharpness: written by an earlier version)."""
    if not focus:
        return None
    from .focus import summarize_focus

    return {"block_um": FOCUS_BLOCK_UM, **summarize_focus([focus[rc][2] for rc in sorted(focus)], FOCUS_SOFT_BELOW)}


def _mpp_check(attrs: dict, stats: dict, chunks_dir: Path) -> dict:
    """``summary["mpp_check"]`` (:func:`pipeline.mppcheck.mpp_check`): the final nuclei's median area
    at the declared µm/px, and the scale probe ``run_infer`` left in ``chunks_dir`` (if any)."""
    import math

    from .infer import PROBE_NAME
    from .mppcheck import mpp_check

    try:
        probe = json.loads((chunks_dir / PROBE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        probe = None
    mx, my = attrs.get("slide_mpp_x"), attrs.get("slide_mpp_y")
    declared = math.sqrt(float(mx) * float(my)) if mx and my else float(attrs["mpp"])
    area = (stats["measurements"].get("area_um2") or {}).get("median")
    return mpp_check(declared, area, int(stats["count"]), probe if isinstance(probe, dict) else None)


def _parameters(attrs: dict, meta: dict, cfg: Config) -> dict:
    """Everything that determines the outputs (not workers/batch size/device)."""
    seg = cfg.segment
    return {
        "store": {
            "mpp": float(attrs["mpp"]),
            "chunk_px": int(attrs["chunk_px"]),
            "tissue": attrs.get("tissue_config"),
        },
        "segment": {
            "halo_px": meta.get("halo_px"),
            "anchor_eps_px": meta.get("anchor_eps_px"),
            "min_area_um2": meta.get("min_area_um2"),
            "refine": meta.get("refine"),
            "dedup_iou": float(seg.dedup_iou),
            "max_area_um2": meta.get("max_area_um2"),
            "min_circularity": meta.get("min_circularity"),
            "conflict_min_width_um": float(seg.conflict_min_width_um),
            "cell_expansion_um": float(seg.cell_expansion_um),
        },
    }


def run_export(
    store_path: str | os.PathLike,
    chunks_dir: str | os.PathLike,
    outdir: str | os.PathLike,
    *,
    slide_id: str | None = None,
    cfg: Config = Config(),
    quiet: bool = False,
    timings: dict | None = None,
    started: float | None = None,
) -> dict:
    """Stitch the chunk files of a store and write the final outputs (``cellsam export``).

    Parameters
    ----------
    store_path : path
        Complete tile store the chunks were computed from.
    chunks_dir : path
        Output of :func:`pipeline.infer.run_infer` (all tissue chunks present).
    outdir : path
        Output directory; names from :class:`pipeline.paths.SlidePaths`.
    slide_id : str, optional
        Output prefix; default: the store's ``slide_id``.
    cfg : Config
        ``segment.dedup_iou``, ``segment.geojson_plain`` are used here.
    timings : dict, optional
        Stage timings of earlier stages (seconds) to include in ``<id>.timings.json``; default: read
        ``chunks_dir/_timings.json`` if present.
    started : float, optional
        ``time.perf_counter()`` at the start of the whole run (for ``total_s`` in ``<id>.timings.json``).

    Returns
    -------
    dict
        The summary (as written to ``<id>.summary.json``).

    Raises
    ------
    StoreError
        Missing or incomplete store.
    InputError
        Chunk files missing or from another store.
    """
    from .assemble import iter_nuclei, split_rejected
    from .export import REJECTED_CLASS, GeoJSONWriter, GeoParquetWriter, write_json_atomic
    from .measure import summarize
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from .progress import Progress
    from .qc import QCAccumulator, model_label
    from .store import open_store

    t_start = time.perf_counter()
    store_path = str(store_path)
    chunks_dir = Path(chunks_dir)
    group, attrs = open_store(store_path)
    sp = slide_paths(outdir, slide_id or attrs.get("slide_id") or slide_id_from_path(store_path))
    try:
        sp.outdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        from .errors import OutputError

        raise OutputError(f"{sp.outdir}: cannot create output directory: {exc.strerror or exc}") from exc
    files = _check_chunks(chunks_dir, attrs, store_path)
    meta = read_chunks_meta(chunks_dir)
    if timings is None:
        try:
            timings = json.loads((chunks_dir / TIMINGS_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            timings = {}
    timings = dict(timings)
    mpp = float(attrs["mpp"])

    t0 = time.perf_counter()
    nuclei = iter_nuclei(files, mpp=mpp, dedup_iou=cfg.segment.dedup_iou, chunk_px=int(attrs["chunk_px"]),
                         min_area_um2=float(meta.get("min_area_um2", cfg.segment.min_area_um2)),
                         conflict_min_width_um=cfg.segment.conflict_min_width_um)
    n_trunc = nuclei.n_truncated_owned
    rejects = nuclei.scan.reject  # a model that rejects: its "not a nucleus" instances are exported apart
    reject_threshold = cfg.segment.reject_threshold  # None: the rule the chunks were flagged by
    if reject_threshold is not None and not rejects:
        log.warning("%s: --reject-threshold %g ignored: the model of these chunks does not reject "
                    "(no 'not a nucleus' probabilities)", chunks_dir, reject_threshold)
    rejected_sinks = []  # callables taking each strip's rejected rows: the two writers, the QC image
    strips = nuclei
    if rejects:
        def on_rejected(table):
            for write in rejected_sinks:
                write(table)

        strips = split_rejected(nuclei, on_rejected, reject_threshold)
    if cfg.segment.cell_expansion_um > 0:  # QuPath cells from the final nuclei, strip by strip
        from .cells import iter_with_cells

        strips = iter_with_cells(strips, group=group, attrs=attrs, expansion_um=cfg.segment.cell_expansion_um,
                                 halo_px=float(meta.get("halo_px") or 0), eps_px=float(meta.get("anchor_eps_px") or 0))
    timings["stitch_s"] = time.perf_counter() - t0  # passes 0-1; pass 2 runs inside the export below

    # <id>.summary.json (written last) marks a complete set: drop the old one first, and on any
    # failure (disk full, interrupt) remove every final this export may have written, so a failed
    # export never leaves a half-new set of outputs behind (each file is atomic on its own)
    outputs = [*sp.finals(), sp.geojson, sp.timings, sp.rejected_geojson_gz, sp.rejected_parquet]
    unlink_quietly(sp.summary)
    for path in (sp.rejected_geojson_gz, sp.rejected_parquet):  # an earlier run's, with a model that rejected
        unlink_quietly(path)
    for path in outputs:  # temporaries of a killed earlier run
        for tmp in path.parent.glob(f"{path.name}.tmp-*"):
            unlink_quietly(tmp)
    try:
        t0 = time.perf_counter()
        scale = (float(attrs["scale_x_l0"]), float(attrs["scale_y_l0"]))
        # UUIDs derive from the slide's content hash: stable across reruns and renames, distinct across slides
        key = str(attrs.get("source_sha256") or sp.slide_id)
        qc = QCAccumulator(group, attrs)
        with contextlib.ExitStack() as stack:
            writers = [stack.enter_context(GeoJSONWriter(sp.geojson_gz, scale_xy_l0=scale, slide_key=key, gz=True))]
            if cfg.segment.geojson_plain:
                writers.append(stack.enter_context(GeoJSONWriter(sp.geojson, scale_xy_l0=scale, slide_key=key, gz=False)))
            writers.append(stack.enter_context(GeoParquetWriter(sp.parquet, scale_xy_l0=scale, slide_key=key,
                                                                slide_id=sp.slide_id,
                                                                cells=cfg.segment.cell_expansion_um > 0,
                                                                class_names=nuclei.scan.class_names,
                                                                reject=rejects)))
            if rejects:
                try:
                    sp.rejected_parquet.parent.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    from .errors import OutputError

                    raise OutputError(f"{sp.rejected_parquet.parent}: cannot create output directory: "
                                      f"{exc.strerror or exc}") from exc
                # same key: the UUIDs derive from the id before the split (instance_id), unique over both
                # files and the same for a nucleus whatever the threshold
                rejected_sinks += [
                    stack.enter_context(GeoJSONWriter(sp.rejected_geojson_gz, scale_xy_l0=scale, slide_key=key,
                                                      gz=True, classification=REJECTED_CLASS)).write,
                    stack.enter_context(GeoParquetWriter(sp.rejected_parquet, scale_xy_l0=scale, slide_key=key,
                                                         slide_id=sp.slide_id, class_names=nuclei.scan.class_names,
                                                         reject=True)).write,
                    qc.add_rejected]
            scan = nuclei.scan  # progress in strips (chunk rows) of the slide
            bar = stack.enter_context(Progress(max(0, scan.strip_hi - scan.strip_lo + 1), "export", "strip",
                                               quiet=True if quiet else None))
            for strip in strips:  # strip by strip: memory bounded by a few chunk rows of nuclei
                for w in writers:
                    w.write(strip)
                qc.add(strip)
                if "anchor_y_px" in strip.column_names and strip.num_rows:
                    top = float(pc.max(strip["anchor_y_px"]).as_py())
                    bar.update_to(int(top // scan.chunk_px) - scan.strip_lo + 1)
                pause_point("export")  # crash tests only (pipeline.testhooks)
            bar.update_to(bar.total)
        timings["export_s"] = time.perf_counter() - t0
        log.info("stitch + export: %d chunk files -> %s (%.1f s)", len(files), sp.outdir,
                 timings["stitch_s"] + timings["export_s"])

        t0 = time.perf_counter()
        stats = summarize(_ParquetColumns(sp.parquet), attrs.get("tissue_area_mm2"))  # one column at a time
        n = int(stats["count"])
        caption = (
            f"{sp.slide_id}: {n} nuclei, tissue {attrs.get('tissue_area_mm2') or 0:.2f} mm2, "
            f"{(stats['nuclei_per_mm2'] or 0):.0f} nuclei/mm2, store {mpp:g} um/px, model {model_label(meta.get('model'))}"
        )
        focus = _focus_summary(nuclei.scan.focus)
        if focus is not None:
            qc.set_focus(nuclei.scan.focus, focus)
            if focus["soft_fraction"]:
                caption += f", {100 * focus['soft_fraction']:.0f}% of tissue soft"
            if (focus["soft_fraction"] or 0) > FOCUS_WARN_FRACTION:
                log.warning("%s: %.0f %% of the tissue is soft (out of focus, or coarser than the model's %g um/px; "
                            "sharpness < %g): fewer nuclei are found there and real ones may be removed as not "
                            "nuclei; the hatched blocks of %s show where",
                            sp.slide_id, 100 * focus["soft_fraction"], mpp, focus["soft_below"], sp.qc_png)
        n_rejected = pq.ParquetFile(sp.rejected_parquet).metadata.num_rows if rejects else None
        rejected_fraction = round(n_rejected / (n + n_rejected), 6) if rejects and n + n_rejected else None
        if rejects:
            caption += f", {n_rejected} removed as not nuclei"
            if rejected_fraction is not None and rejected_fraction > REJECTED_WARN_FRACTION:
                log.warning("%s: %.0f %% of the detections (%d) were removed as not nuclei; review %s in QuPath "
                            "(keratin and debris are expected there, real nuclei are not; --reject-threshold 1 "
                            "keeps all and re-exports without a second inference)",
                            sp.slide_id, 100 * rejected_fraction, n_rejected, sp.rejected_geojson_gz)
        qc.write(sp.qc_png, _parquet_outlines(sp.parquet, scale, classes=bool(nuclei.scan.class_names)),
                 caption=caption, class_names=nuclei.scan.class_names,
                 rejected=_parquet_outlines(sp.rejected_parquet, scale) if rejects else None)
        timings["qc_s"] = time.perf_counter() - t0

        if not attrs.get("tissue_chunks"):
            note = "no tissue detected: empty outputs"
        elif n == 0:
            note = "tissue detected but no nuclei found: empty outputs"
        else:
            note = None
        check = _mpp_check(attrs, stats, chunks_dir)
        if not check["plausible"]:
            from .mppcheck import warning_line

            log.warning("%s", warning_line(Path(str(attrs.get("source_path") or sp.slide_id)).name, check))
        if n_trunc:
            log.warning(
                "%d nuclei touched the halo edge and were dropped; rerun with a larger --halo (now %s px)",
                n_trunc,
                meta.get("halo_px"),
            )
        timings["export_total_s"] = time.perf_counter() - t_start
        if started is not None:
            timings["total_s"] = time.perf_counter() - started
        summary = {
            "schema_version": SUMMARY_SCHEMA_VERSION,
            "slide_id": sp.slide_id,
            "source": {
                "file": Path(str(attrs.get("source_path", ""))).name,
                "sha256": attrs.get("source_sha256"),
                "slide_mpp_x": attrs.get("slide_mpp_x"),
                "slide_mpp_y": attrs.get("slide_mpp_y"),
                "bounds_l0": attrs.get("bounds_l0"),
            },
            "nuclei": n,
            "tissue_area_mm2": stats["tissue_area_mm2"],
            "nuclei_per_mm2": stats["nuclei_per_mm2"],
            "tissue_chunks": len(attrs.get("tissue_chunks", [])),
            "nuclei_dropped_at_halo": n_trunc,
            "nuclei_dropped_implausible": nuclei.scan.n_implausible_owned,
            "stitch_conflicts": nuclei.dedup.conflicts,
            "cells": cfg.segment.cell_expansion_um > 0,
            "note": note,
            "mpp_check": check,
            "focus": focus,
            "measurements": stats["measurements"],
            **({"classes": class_statistics(sp.parquet, nuclei.scan.class_names, stats["tissue_area_mm2"])}
               if nuclei.scan.class_names else {}),
            "rejected": ({"count": n_rejected, "fraction": rejected_fraction,
                          "density_per_mm2": (round(n_rejected / stats["tissue_area_mm2"], 3)
                                              if stats["tissue_area_mm2"] else None),
                          "threshold": (float(reject_threshold) if reject_threshold is not None
                                        else (meta.get("model") or {}).get("reject_threshold"))} if rejects else None),
            "outputs": {
                "geojson_gz": sp.geojson_gz.name,
                "geojson": sp.geojson.name if cfg.segment.geojson_plain else None,
                "parquet": sp.parquet.name,
                "qc_png": sp.qc_png.name,
                "timings": sp.timings.name,
                "rejected_geojson_gz": sp.rejected_geojson_gz.relative_to(sp.outdir).as_posix() if rejects else None,
                "rejected_parquet": sp.rejected_parquet.relative_to(sp.outdir).as_posix() if rejects else None,
            },
            "model": public_value(meta.get("model")),
            "parameters": _parameters(attrs, meta, cfg),
            "software": _software_versions(),
        }
        # wall-clock seconds vary run to run: their own file, so the summary is byte-reproducible
        write_json_atomic({"slide_id": sp.slide_id, "timings_s": {k: round(float(v), 3) for k, v in sorted(timings.items())
                                                                  if isinstance(v, (int, float))}}, sp.timings)
        write_json_atomic(summary, sp.summary)
    except BaseException:
        for path in outputs:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        raise
    log.info("export: %d nuclei -> %s (%.1f s)", n, sp.outdir, timings["export_total_s"])
    return summary


def class_statistics(parquet, class_names, tissue_area_mm2):
    """``summary["classes"]`` of a typed model: per class (model order) ``count``, ``density_per_mm2``
    (nuclei per mm² of tissue; None without tissue area) and ``fraction`` (of all nuclei; None if none).

    Parameters
    ----------
    parquet : path
        The slide's GeoParquet (its ``class`` column is read).
    class_names : sequence of str
        The model's classes.
    tissue_area_mm2 : float or None
    """
    import numpy as np
    import pyarrow.parquet as pq

    values = pq.read_table(parquet, columns=["class"])["class"].to_numpy(zero_copy_only=False)
    names, counts = np.unique(np.asarray(values, dtype=object).astype(str), return_counts=True) if len(values) \
        else (np.zeros(0, str), np.zeros(0, np.int64))
    found = dict(zip(names.tolist(), counts.tolist()))
    total = int(len(values))
    out = {}
    for name in class_names:
        k = int(found.get(name, 0))
        out[str(name)] = {
            "count": k,
            "density_per_mm2": round(k / tissue_area_mm2, 3) if tissue_area_mm2 else None,
            "fraction": round(k / total, 6) if total else None,
        }
    return out


def _check_writable(outdir, sp: SlidePaths) -> None:
    """Fail early, naming the output directory the user gave, when it cannot be written (instead of
    a later error about an internal ``.work/`` path).

    Raises
    ------
    OutputError
        If ``outdir`` cannot be created or written (nothing is left in it).
    """
    from .errors import OutputError

    probe = sp.outdir / f".write-test-{os.getpid()}"
    if sp.outdir.exists() and not sp.outdir.is_dir():
        raise OutputError(f"{outdir}: cannot write the output directory: Not a directory")
    try:
        sp.outdir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        unlink_quietly(probe)
        raise OutputError(f"{outdir}: cannot write the output directory: {exc.strerror or exc}") from exc


def _reusable_store(store: Path, slide) -> bool:
    """True if ``store`` is a complete tile store of ``slide`` (its own chunk/mpp are kept).

    Raises
    ------
    InputError
        If it is a complete store of another slide (refusing to overwrite it).
    """
    from .errors import StoreError
    from .store import open_store

    if not store.exists():
        return False
    try:
        _, attrs = open_store(store)
    except StoreError:
        return False  # incomplete or stale: rewritten by write_store (which refuses non-stores)
    if attrs.get("source_sha256") != slide.sha256:
        raise InputError(
            f"--store {store}: tile store of another slide ({attrs.get('source_path')}); "
            f"use another --store path or delete it"
        )
    log.info("reusing tile store %s (chunk %s px, %g µm/px)", store, attrs.get("chunk_px"), float(attrs["mpp"]))
    return True


def run_segment(
    slide_path: str | os.PathLike,
    outdir: str | os.PathLike,
    *,
    slide_id: str | None = None,
    slide_mpp: float | None = None,
    store_path: str | os.PathLike | None = None,
    model_path: Any = None,
    cfg: Config = Config(),
    device: str | None = None,
    refine: bool | None = None,
    scheduler: str | None = None,
    geojson_plain: bool | None = None,
    quiet: bool = False,
) -> dict:
    """Segment all nuclei of one slide (``cellsam segment``); resumable.

    Parameters
    ----------
    slide_path : path
        Whole-slide image.
    outdir : path
        Output directory (layout: :mod:`pipeline.paths`).
    slide_id : str, optional
        Output prefix; default: slide file name without extension.
    slide_mpp : float, optional
        µm/px of level 0 when the slide does not say.
    store_path : path, optional
        Tile store to use: an existing complete store of this slide is used as is (its chunk size
        and µm/px win over ``cfg.store``); otherwise it is written there. Default
        ``OUTDIR/.work/<id>/store.ome.zarr`` (rewritten if its parameters differ from ``cfg``).
    model_path : optional
        ``None`` (shipped weights), ``"classical"``, a checkpoint path, or a model object/callable
        (see :func:`pipeline.infer.resolve_model`).
    cfg : Config
        All parameters; ``device``, ``refine``, ``geojson_plain`` override ``cfg.segment``.
    scheduler : str, optional
        dask.distributed scheduler address.

    Returns
    -------
    dict
        The summary written to ``<id>.summary.json``.
    """
    from .infer import resolve_model
    from .slide import open_slide
    from .store import write_store

    t_start = time.perf_counter()
    seg = cfg.segment
    over = {k: v for k, v in {"device": device, "refine": refine, "geojson_plain": geojson_plain}.items() if v is not None}
    if over:
        seg = replace(seg, **over)
    sid = slide_id or slide_id_from_path(slide_path)
    sp: SlidePaths = slide_paths(outdir, sid)
    _check_writable(outdir, sp)

    # The store is written at the model's resolution: resolve the model first.
    model = resolve_model(model_path, device=seg.device, refine=seg.refine, store_mpp=cfg.store.mpp,
                          engine=seg.engine, precision=seg.precision, teacher=seg.teacher, min_score=seg.min_score,
                          reject_threshold=seg.reject_threshold)
    store_cfg = cfg.store
    if model.mpp is not None and abs(model.mpp - store_cfg.mpp) > 1e-6:
        log.info("store resolution set to the model's %g µm/px (config: %g)", model.mpp, store_cfg.mpp)
        store_cfg = replace(store_cfg, mpp=model.mpp)
    cfg = Config(tissue=cfg.tissue, store=store_cfg, segment=seg)

    timings: dict = {}
    t0 = time.perf_counter()
    slide = open_slide(slide_path, slide_mpp=slide_mpp)
    try:
        if store_path is not None and _reusable_store(Path(store_path), slide):
            store = Path(store_path)  # a store the user made (e.g. `cellsam tile`): used as is
        else:
            store = Path(store_path) if store_path is not None else sp.store
            write_store(slide, store, cfg.store, cfg.tissue, sid, tissue_png=sp.tissue_png)
    finally:
        slide.close()
    timings["tile_s"] = time.perf_counter() - t0

    # pass the spec, not the loaded model: the per-process cache returns the same weights here,
    # distributed workers load it once each, and "classical" binds to the store's µm/px
    spec = model_path if model_path is None or isinstance(model_path, (str, os.PathLike)) else model
    result = run_infer(store, sp.chunks, model=spec, cfg=seg, scheduler=scheduler, quiet=quiet)
    for k, v in result["timings_s"].items():
        timings[k if k != "wall_s" else "infer_s"] = v
    return run_export(store, sp.chunks, sp.outdir, slide_id=sid, cfg=cfg, quiet=quiet, timings=timings, started=t_start)


__all__ = ["run_export", "run_segment"]
