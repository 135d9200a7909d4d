"""Post-model overhead: watershed decoding + per-window extraction, and stitching + export at scale.

Writes ``benchmarks/results/postmodel.json``. Every stage runs in a fresh subprocess (peak RSS per
stage from ``getrusage``), once with the working tree's ``pipeline`` ("new") and once with the
``pipeline`` package of a git revision (``--ref``, "old"), interleaved, so that the ratio old/new is
measured under the same machine load (the machine may be shared: compare ratios, not seconds).

Stages
------
``window``
    A synthetic 1152 x 1152 window at 0.5 µm/px (chunk 1024 + halo 64): ~2500 elliptical nuclei,
    8-20 px major diameter, jittered grid, ~30 % touching a neighbour; RGB with purple nuclei on
    pink; HoVer-Net-style probability / offset maps (+ noise) of the same labels.

    - ``decode_s``: :func:`pipeline.model.postprocess.instances_from_maps` on the maps;
    - ``extract_s``: :func:`pipeline.stitch.extract_chunk_instances` on the labels (core = the
      central 1024 x 1024, window inside a large slide);
    - ``forward_s`` (``--forward``): the lite model's forward pass on the window (random weights,
      ``torch`` threads = 2), the reference the overhead is compared with.

    Times are the median of ``--repeats`` runs after one warm-up.
``big``
    A synthetic slide of ``--n`` nuclei: the window's chunk table replicated on a grid of cores
    (geometry, anchors and centroids shifted), so neighbouring chunks overlap in the eps band
    (dedup has real work). Stages: ``read_s`` (parquet), ``stitch_s``
    (:func:`~pipeline.stitch.resolve_duplicates` + :func:`~pipeline.stitch.assign_ids`),
    ``geojson_gz_s`` and ``geoparquet_s`` (:mod:`pipeline.export`), ``peak_rss_gb`` of the process.
    The old revision runs at ``--cmp-n`` nuclei (its GeoJSON writer is slow), the new one at both.

Usage::

    .venv/bin/python benchmarks/bench_postmodel.py [--ref REV] [--repeats 3] [--n 1000000]
        [--cmp-n 100000] [--forward] [--gzip-levels]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WINDOW_PX = 1152
HALO_PX = 64
MPP = 0.5
ORIGIN_RC = (10_000, 20_000)
SLIDE_RC = (100_000, 100_000)


# ----------------------------------------------------------------------------------------------
# synthetic data (numpy only: identical for both revisions)


def synth_labels(size=WINDOW_PX, n_target=2500, seed=0):
    """uint32 (size, size) labels: ellipses on a jittered grid, touching ones split by nearest."""
    rng = np.random.default_rng(seed)
    s = size / np.sqrt(n_target)
    g = np.arange(s / 2, size, s)
    cy, cx = np.meshgrid(g, g, indexing="ij")
    cy = cy.ravel() + rng.uniform(-0.4, 0.4, cy.size) * s
    cx = cx.ravel() + rng.uniform(-0.4, 0.4, cx.size) * s
    n = cy.size
    a = rng.uniform(8, 20, n) / 2
    b = a * rng.uniform(0.6, 1.0, n)
    th = rng.uniform(0, np.pi, n)
    best = np.full((size, size), np.inf)
    lab = np.zeros((size, size), np.int64)
    for i in range(n):
        r0, r1 = int(max(cy[i] - a[i] - 1, 0)), int(min(cy[i] + a[i] + 2, size))
        c0, c1 = int(max(cx[i] - a[i] - 1, 0)), int(min(cx[i] + a[i] + 2, size))
        if r0 >= r1 or c0 >= c1:
            continue
        yy, xx = np.mgrid[r0:r1, c0:c1]
        dy, dx = yy + 0.5 - cy[i], xx + 0.5 - cx[i]
        u = (dx * np.cos(th[i]) + dy * np.sin(th[i])) / a[i]
        v = (-dx * np.sin(th[i]) + dy * np.cos(th[i])) / b[i]
        q = u * u + v * v
        sub = best[r0:r1, c0:c1]
        m = (q < 1) & (q < sub)
        sub[m] = q[m]
        lab[r0:r1, c0:c1][m] = i + 1
    # number in raster order of the first pixel, as the decoder does
    flat = lab.ravel()
    ids, first = np.unique(flat, return_index=True)
    ids, first = ids[ids > 0], first[ids > 0]
    lut = np.zeros(int(flat.max()) + 1, np.uint32)
    lut[ids[np.argsort(first, kind="stable")]] = np.arange(1, ids.size + 1, dtype=np.uint32)
    return lut[lab]


def synth_rgb(lab, seed=0):
    rng = np.random.default_rng(seed + 1)
    base = np.where((lab > 0)[..., None], np.array([90, 60, 150]), np.array([230, 170, 200]))
    return np.clip(base + rng.normal(0, 12, lab.shape + (3,)), 0, 255).astype(np.uint8)


def synth_maps(lab, seed=0):
    """HoVer-Net-style targets (+ noise): prob (H, W), hv (2, H, W), float32."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed + 2)
    h, w = lab.shape
    flat = lab.ravel().astype(np.int64)
    n = int(flat.max()) + 1
    cnt = np.maximum(np.bincount(flat, minlength=n), 1)
    rr, cc = np.divmod(np.arange(flat.size), w)
    dy = rr - (np.bincount(flat, weights=rr, minlength=n) / cnt)[flat]
    dx = cc - (np.bincount(flat, weights=cc, minlength=n) / cnt)[flat]
    my, mx = np.ones(n), np.ones(n)
    np.maximum.at(my, flat, np.abs(dy))
    np.maximum.at(mx, flat, np.abs(dx))
    fg = flat > 0
    hv = np.zeros((2, flat.size), np.float32)
    hv[0, fg] = (dx / mx[flat])[fg]
    hv[1, fg] = (dy / my[flat])[fg]
    hv = hv.reshape(2, h, w) + rng.normal(0, 0.05, (2, h, w)).astype(np.float32)
    prob = ndi.gaussian_filter((lab > 0).astype(np.float32), 1.0) + rng.normal(0, 0.05, lab.shape).astype(np.float32)
    return np.clip(prob, 0, 1).astype(np.float32), np.clip(hv, -1, 1).astype(np.float32)


def _extract_kwargs(origin_rc=ORIGIN_RC, chunk_rc=(0, 0)):
    r0, c0 = origin_rc
    return dict(window_origin_rc=(r0, c0), core_box_rc=(r0 + HALO_PX, c0 + HALO_PX, r0 + WINDOW_PX - HALO_PX,
                                                        c0 + WINDOW_PX - HALO_PX),
                store_shape_rc=SLIDE_RC, mpp=MPP, eps_px=3.0, min_area_um2=3.0, chunk_rc=chunk_rc)


def _median_time(fn, repeats):
    """Median wall and process-CPU seconds of ``repeats`` calls after a warm-up.

    On a shared machine the CPU time of a single-threaded stage is the steadier number (it does
    not count the time the process waits for a core); on an idle machine both agree.
    """
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def _rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


# ----------------------------------------------------------------------------------------------
# workers (run in subprocesses, with PYTHONPATH selecting the revision)


def worker_window(args):
    import pipeline
    from pipeline.model.postprocess import instances_from_maps
    from pipeline.stitch import extract_chunk_instances

    lab = synth_labels()
    rgb = synth_rgb(lab)
    prob, hv = synth_maps(lab)
    scores = np.random.default_rng(3).uniform(0.5, 1.0, int(lab.max())).astype(np.float32)
    res = {"pipeline": str(Path(pipeline.__file__).parent), "nuclei_in_window": int(lab.max())}
    dec = instances_from_maps(prob, hv, MPP)
    res["decode_digest"] = hashlib.sha256(dec[0].tobytes() + dec[1].tobytes()).hexdigest()[:16]
    res["decoded_nuclei"] = int(dec[0].max())
    res["decode_s"], res["decode_cpu_s"] = _median_time(lambda: instances_from_maps(prob, hv, MPP), args.repeats)
    kw = _extract_kwargs()
    table = extract_chunk_instances(lab, scores, rgb, **kw)
    res["extract_rows"] = table.num_rows
    res["extract_s"], res["extract_cpu_s"] = _median_time(lambda: extract_chunk_instances(lab, scores, rgb, **kw),
                                                          args.repeats)
    if args.save:
        import pyarrow.parquet as pq

        pq.write_table(table, args.save)
    if args.forward:
        import torch

        from pipeline.model.cellsam import DEFAULT_ARCH, CellSAM
        from pipeline.model.segmenter import Segmenter

        torch.set_num_threads(2)
        torch.manual_seed(0)
        seg = Segmenter(CellSAM(DEFAULT_ARCH).eval(), {"mpp": MPP}, device="cpu")
        res["forward_s"], res["forward_cpu_s"] = _median_time(lambda: seg.forward(rgb[None]), max(1, args.repeats - 1))
    res["peak_rss_gb"] = _rss_gb()
    return res


def worker_gen_big(args):
    """Replicate the window's chunk table on a grid of cores until ``--n`` rows; write parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import shapely

    from pipeline.stitch import CHUNK_SCHEMA, extract_chunk_instances

    lab = synth_labels()
    rgb = synth_rgb(lab)
    scores = np.random.default_rng(3).uniform(0.5, 1.0, int(lab.max())).astype(np.float32)
    base = extract_chunk_instances(lab, scores, rgb, **_extract_kwargs(origin_rc=(0, 0)))
    core = WINDOW_PX - 2 * HALO_PX
    n_win = int(np.ceil(args.n / base.num_rows))
    cols = int(np.ceil(np.sqrt(n_win)))
    polys = shapely.from_wkb(base["geometry"].to_numpy(zero_copy_only=False))
    coords, index = shapely.get_coordinates(polys, return_index=True)
    out = Path(args.table)  # a directory of chunk files, as `cellsam infer` writes them
    out.mkdir(parents=True, exist_ok=True)
    rows = 0
    for k in range(n_win):
        i, j = divmod(k, cols)
        dy, dx = i * core + HALO_PX, j * core + HALO_PX  # slide starts at (HALO, HALO): no slide edge
        t = base.slice(0, min(base.num_rows, args.n - rows))
        m = t.num_rows
        moved = shapely.polygons(shapely.linearrings(coords[index < m] + [dx, dy], indices=index[index < m]))
        upd = {
            "chunk_row": np.full(m, i, np.int32), "chunk_col": np.full(m, j, np.int32),
            "anchor_y_px": t["anchor_y_px"].to_numpy() + dy, "anchor_x_px": t["anchor_x_px"].to_numpy() + dx,
            "centroid_y_um": t["centroid_y_um"].to_numpy() + dy * MPP,
            "centroid_x_um": t["centroid_x_um"].to_numpy() + dx * MPP,
            "geometry": shapely.to_wkb(moved),
        }
        for name, v in upd.items():
            t = t.set_column(t.schema.get_field_index(name), name, pa.array(v, type=CHUNK_SCHEMA.field(name).type))
        pq.write_table(t, out / f"{i}_{j}.parquet")
        rows += m
        if rows >= args.n:
            break
    return {"rows": rows, "windows": k + 1}


def _chunk_files(directory):
    files = {}
    for p in Path(directory).glob("*.parquet"):
        r, c = p.stem.split("_")
        files[(int(r), int(c))] = p
    return dict(sorted(files.items()))


def worker_big(args):
    """Stitch + GeoJSON.gz + GeoParquet of a directory of chunk files, as ``cellsam export`` does.

    Streamed strip by strip (:mod:`pipeline.assemble`, writers of :mod:`pipeline.export`) when the
    revision has it; older revisions stitch the concatenated table in memory.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    import pipeline
    from pipeline import export

    files = _chunk_files(args.table)
    res = {"pipeline": str(Path(pipeline.__file__).parent), "rss_after_import_gb": _rss_gb(), "chunk_files": len(files)}
    key, scale = "k" * 64, (2.0, 2.0)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        out = Path(tmp)
        try:
            from pipeline.assemble import iter_nuclei
        except ImportError:
            iter_nuclei = None
        if iter_nuclei is not None:
            res["mode"] = "stream"
            t0, c0 = time.perf_counter(), time.process_time()
            st = iter_nuclei(files, mpp=MPP, dedup_iou=0.5, min_area_um2=3.0, chunk_px=WINDOW_PX - 2 * HALO_PX)
            res["stitch_s"], res["stitch_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
            res["instances"] = st.scan.instances
            res["rss_after_stitch_gb"] = _rss_gb()
            t0, c0 = time.perf_counter(), time.process_time()
            n = 0
            with export.GeoJSONWriter(out / "s.geojson.gz", scale_xy_l0=scale, slide_key=key) as gj, \
                    export.GeoParquetWriter(out / "s.parquet", scale_xy_l0=scale, slide_key=key) as gp:
                for strip in st:
                    gj.write(strip)
                    gp.write(strip)
                    n += strip.num_rows
            res["export_s"], res["export_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
            res["nuclei"] = n
            res["peak_cached_rows"] = st.peak_cached_rows
        else:
            res["mode"] = "in_memory"
            from pipeline.stitch import assign_ids, resolve_duplicates

            t0 = time.perf_counter()
            table = pa.concat_tables([pq.read_table(p).replace_schema_metadata(None) for p in files.values()])
            res["read_s"] = time.perf_counter() - t0
            res["instances"] = table.num_rows
            t0, c0 = time.perf_counter(), time.process_time()
            table = assign_ids(resolve_duplicates(table, mpp=MPP))
            res["stitch_s"], res["stitch_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
            res["nuclei"] = table.num_rows
            res["rss_after_stitch_gb"] = _rss_gb()
            t0, c0 = time.perf_counter(), time.process_time()
            export.write_geojson(table, out / "s.geojson.gz", scale_xy_l0=scale, slide_key=key)
            export.write_geoparquet(table, out / "s.parquet", scale_xy_l0=scale, slide_key=key)
            res["export_s"], res["export_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
            res["stitch_s"] += res.pop("read_s")
        res["geojson_gz_mb"] = (out / "s.geojson.gz").stat().st_size / 1e6
        res["geoparquet_mb"] = (out / "s.parquet").stat().st_size / 1e6
        res["geojson_sha256"] = hashlib.sha256((out / "s.geojson.gz").read_bytes()).hexdigest()
        if args.save:
            import shutil

            shutil.copy(out / "s.geojson.gz", args.save)
    res["stitch_export_s"] = res["stitch_s"] + res["export_s"]
    res["stitch_export_cpu_s"] = res["stitch_cpu_s"] + res["export_cpu_s"]
    res["peak_rss_gb"] = _rss_gb()
    return res


def worker_gzip_levels(args):
    """Compression time / size of the new GeoJSON text per gzip level (``--cmp-n`` nuclei)."""
    import gzip
    import pyarrow.parquet as pq

    from pipeline import export
    from pipeline.stitch import assign_ids, resolve_duplicates

    import pyarrow as pa

    files = _chunk_files(args.table)
    table = pa.concat_tables([pq.read_table(p).replace_schema_metadata(None) for p in files.values()])
    table = assign_ids(resolve_duplicates(table, mpp=MPP))
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        p = Path(tmp) / "s.geojson"
        export.write_geojson(table, p, scale_xy_l0=(2.0, 2.0), slide_key="k" * 64, gz=False)
        raw = p.read_bytes()
    res = {"nuclei": table.num_rows, "raw_mb": len(raw) / 1e6, "levels": {}}
    for level in (1, 3, 6):
        t0 = time.perf_counter()
        z = gzip.compress(raw, compresslevel=level, mtime=0)
        res["levels"][level] = {"s": time.perf_counter() - t0, "mb": len(z) / 1e6}
    return res


WORKERS = {"window": worker_window, "gen-big": worker_gen_big, "big": worker_big, "gzip-levels": worker_gzip_levels}


# ----------------------------------------------------------------------------------------------
# driver


def _run(worker, pythonpath, extra, tmp):
    out = Path(tmp) / f"res-{worker}-{time.monotonic_ns()}.json"
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", worker, "--result", str(out), "--tmp", tmp, *extra]
    subprocess.run(cmd, check=True, env=env, cwd=tmp)
    return json.loads(out.read_text())


def _compare_tables(old_path, new_path):
    """Row counts and largest measurement differences of the two revisions' window tables."""
    import pyarrow.parquet as pq
    import shapely

    old, new = pq.read_table(old_path), pq.read_table(new_path)
    res = {"rows_old": old.num_rows, "rows_new": new.num_rows}
    if old.num_rows != new.num_rows or old["local_id"] != new["local_id"]:
        res["same_ids"] = False
        return res
    res["same_ids"] = True
    go = shapely.from_wkb(old["geometry"].to_numpy(zero_copy_only=False))
    gn = shapely.from_wkb(new["geometry"].to_numpy(zero_copy_only=False))
    res["geometry_equal"] = int(shapely.equals(go, gn).sum())
    res["geometry_identical_wkb"] = int(sum(a == b for a, b in zip(old["geometry"].to_pylist(), new["geometry"].to_pylist())))
    diffs = {}
    for name in old.column_names:
        if name in ("geometry",):
            continue
        a, b = old[name].to_numpy(), new[name].to_numpy()
        if a.dtype.kind == "f":
            d = np.abs(a.astype(np.float64) - b.astype(np.float64))
            rel = d / np.maximum(np.abs(a.astype(np.float64)), 1e-12)
            ok = np.isfinite(d)
            diffs[name] = {"max_abs": float(d[ok].max()) if ok.any() else 0.0,
                           "max_rel": float(rel[ok].max()) if ok.any() else 0.0,
                           "nan_mismatch": int((np.isnan(a) != np.isnan(b)).sum())}
        else:
            diffs[name] = {"equal": bool(np.array_equal(a, b))}
    res["columns"] = diffs
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", default=None, help="git revision of the old pipeline (default: none, new only)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n", type=int, default=1_000_000, help="nuclei of the big stitch+export run (new)")
    ap.add_argument("--cmp-n", type=int, default=100_000, help="nuclei of the old-vs-new stitch+export run")
    ap.add_argument("--forward", action="store_true", help="also time the lite model forward (reference)")
    ap.add_argument("--gzip-levels", action="store_true")
    ap.add_argument("--skip-big", action="store_true")
    ap.add_argument("--skip-window", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "postmodel.json"))
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--table", help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        res = WORKERS[args.worker](args)
        Path(args.result).write_text(json.dumps(res))
        return 0

    res = {"machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                       "loadavg": os.getloadavg()},
           "window_px": WINDOW_PX, "repeats": args.repeats, "ref": args.ref}
    with tempfile.TemporaryDirectory(prefix="bench-postmodel-") as tmp:
        impls = {"new": ROOT}
        if args.ref:
            old = Path(tmp) / "old"
            old.mkdir()
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.ref, "pipeline"], check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
            impls = {"old": old, "new": ROOT}
        fwd = ["--forward"] if args.forward else []
        res["window"] = {}
        for name, path in (impls.items() if not args.skip_window else ()):
            res["window"][name] = _run("window", path, ["--repeats", str(args.repeats), "--save",
                                                        str(Path(tmp) / f"{name}.parquet"), *fwd], tmp)
            fwd = []  # the forward pass is the same code in both: time it once
        w = res["window"]
        fwd_s = w[next(iter(impls))].get("forward_s") if w else None
        for name in (impls if w else ()):
            w[name]["post_model_s"] = w[name]["decode_s"] + w[name]["extract_s"]
            w[name]["post_model_cpu_s"] = w[name]["decode_cpu_s"] + w[name]["extract_cpu_s"]
            if fwd_s:
                w[name]["overhead_vs_forward"] = w[name]["post_model_s"] / fwd_s
        if "old" in impls and w:
            w["speedup"] = {k: w["old"][k] / w["new"][k] for k in ("decode_s", "extract_s", "post_model_s", "decode_cpu_s",
                                                                  "extract_cpu_s", "post_model_cpu_s")}
            w["decode_identical"] = w["old"]["decode_digest"] == w["new"]["decode_digest"]
            w["compare"] = _compare_tables(Path(tmp) / "old.parquet", Path(tmp) / "new.parquet")
        if not args.skip_big:
            res["big"] = {}
            cmp_table = str(Path(tmp) / "cmp_chunks")
            _run("gen-big", ROOT, ["--n", str(args.cmp_n), "--table", cmp_table], tmp)
            for name, path in impls.items():
                res["big"][f"{name}_{args.cmp_n}"] = _run("big", path, ["--table", cmp_table], tmp)
            if "old" in impls:
                o, n = res["big"][f"old_{args.cmp_n}"], res["big"][f"new_{args.cmp_n}"]
                res["big"]["speedup_cmp"] = {k: o[k] / n[k] for k in (
                    "stitch_s", "export_s", "stitch_export_s", "stitch_cpu_s", "export_cpu_s", "stitch_export_cpu_s")}
                res["big"]["same_geojson"] = o["geojson_sha256"] == n["geojson_sha256"]
            if args.gzip_levels:
                res["gzip_levels"] = _run("gzip-levels", ROOT, ["--table", cmp_table], tmp)
            if args.n != args.cmp_n:
                big_table = str(Path(tmp) / "big_chunks")
                res["big"]["generate"] = _run("gen-big", ROOT, ["--n", str(args.n), "--table", big_table], tmp)
                res["big"][f"new_{args.n}"] = _run("big", ROOT, ["--table", big_table], tmp)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(out.name + f".tmp-{os.getpid()}")
    tmp_out.write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    os.replace(tmp_out, out)
    print(json.dumps(res, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
