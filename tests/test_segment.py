"""Whole-slide segmentation end to end (pipeline/segment.py, cellsam segment/export/demo).

Seam-freeness, determinism, resume after SIGKILL, flat memory, empty slides. The seam and
determinism tests drive the pipeline with a deterministic, tile-independent stand-in model
(threshold + connected components); the resume test runs the real CLI with ``--model classical``;
the real-model seam test runs when the shipped weights exist.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import shapely
from scipy import ndimage

from conftest import IN_CI, REPO, shared_file
from pipeline.cli import main as cli_main
from pipeline.config import Config, SegmentConfig, StoreConfig
from pipeline.errors import InputError
from pipeline.paths import slide_paths
from pipeline.segment import run_export, run_segment

MPP = 0.5
HALO = 40  # synthetic nuclei are <= 12 µm = 24 px across
# Small cores. Not 256: synthetic nuclei sit inside a 16 µm = 32 px grid, so tile lines at multiples
# of 32 px would never cross a nucleus; 250 px lines do.
CORE = 250
WEIGHTS = REPO / "pipeline" / "weights" / "cellsam_default.pt"


def threshold_model(images):
    """Stand-in model: pixels darker than 120 (synthetic nuclei), 8-connected components."""
    out = []
    for img in images:
        labels, n = ndimage.label(img.mean(axis=2) < 120, structure=np.ones((3, 3)))
        out.append((labels.astype(np.uint32), np.ones(n, np.float32)))
    return out


def no_nuclei_model(images):
    return [(np.zeros(img.shape[:2], np.uint32), np.zeros(0, np.float32)) for img in images]


def config(chunk_px=256, **seg):
    return Config(store=StoreConfig(chunk_px=chunk_px, pyramid_levels=2), segment=SegmentConfig(**{"halo_px": HALO, **seg}))


def finals(outdir, sid):
    sp = slide_paths(outdir, sid)
    return {p.name: p.read_bytes() for p in (sp.geojson_gz, sp.parquet, sp.qc_png)}


def summary_wo_timings(outdir, sid):
    sp = slide_paths(outdir, sid)
    s = json.loads(sp.summary.read_text(encoding="utf-8"))
    assert "timings_s" not in s  # wall-clock seconds live in <id>.timings.json (the summary is reproducible)
    timings = json.loads(sp.timings.read_text(encoding="utf-8"))["timings_s"]
    assert set(timings) >= {"read_s", "model_s", "extract_s", "write_s", "stitch_s", "export_s"}
    return s


def polygons(outdir, sid):
    t = pq.read_table(slide_paths(outdir, sid).parquet)
    return shapely.from_wkb(t["geometry"].to_numpy(zero_copy_only=False))


def match(a, b, iou_min=0.5):
    """Greedy one-to-one matching by IoU; returns (pairs [(i, j, iou)], unmatched a, unmatched b)."""
    tree = shapely.STRtree(b)
    ia, ib = tree.query(a, predicate="intersects")
    inter = shapely.area(shapely.intersection(a[ia], b[ib]))
    iou = inter / (shapely.area(a[ia]) + shapely.area(b[ib]) - inter)
    order = np.argsort(-iou, kind="stable")
    used_a, used_b, pairs = set(), set(), []
    for k in order:
        i, j = int(ia[k]), int(ib[k])
        if iou[k] >= iou_min and i not in used_a and j not in used_b:
            used_a.add(i), used_b.add(j), pairs.append((i, j, float(iou[k])))
    return pairs, len(a) - len(used_a), len(b) - len(used_b)


def max_pair_iou(g):
    tree = shapely.STRtree(g)
    i, j = tree.query(g, predicate="intersects")
    sel = i < j
    i, j = i[sel], j[sel]
    if not len(i):
        return 0.0
    inter = shapely.area(shapely.intersection(g[i], g[j]))
    return float((inter / (shapely.area(g[i]) + shapely.area(g[j]) - inter)).max())


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory):
    from pipeline.synthetic import write_synthetic_slide

    return write_synthetic_slide(tmp_path_factory.mktemp("slide") / "syn.tif", size_px=(900, 1000), mpp=MPP, seed=3)


@pytest.fixture(scope="module")
def tiled(slide_path, tmp_path_factory):
    """Reference run: small cores, 2 workers."""
    out = tmp_path_factory.mktemp("tiled")
    run_segment(slide_path, out, model_path=threshold_model, cfg=config(CORE, workers=2, batch_size=3), quiet=True)
    return out


# ---------------------------------------------------------------------------------------------
# seams


def check_seams(tiled_dir, whole_dir, sid, core_px, scale_l0, border_px, *, f1_min=0.99, exact=False):
    g_t, g_w = polygons(tiled_dir, sid), polygons(whole_dir, sid)
    assert len(g_t) > 20
    assert max_pair_iou(g_t) <= 0.1  # no duplicates, no overlapping pieces across seams
    # away from the region border (level-0 px)
    b = shapely.bounds(g_w)
    hi = b.max(axis=0)
    inner_w = (b[:, 0] > border_px) & (b[:, 1] > border_px) & (b[:, 2] < hi[2] - border_px) & (b[:, 3] < hi[3] - border_px)
    bt = shapely.bounds(g_t)
    inner_t = (bt[:, 0] > border_px) & (bt[:, 1] > border_px) & (bt[:, 2] < hi[2] - border_px) & (bt[:, 3] < hi[3] - border_px)
    pairs, miss_t, miss_w = match(g_t[inner_t], g_w[inner_w])
    f1 = 2 * len(pairs) / (inner_t.sum() + inner_w.sum())
    assert f1 >= f1_min, (f1, miss_t, miss_w)
    # nuclei straddling a tile line are whole: they match the untiled nucleus (not a cut piece)
    lines_x = np.arange(core_px, hi[2] / scale_l0[0], core_px) * scale_l0[0]
    lines_y = np.arange(core_px, hi[3] / scale_l0[1], core_px) * scale_l0[1]
    bi = bt[inner_t]
    straddle = np.zeros(len(bi), bool)
    for x in lines_x:
        straddle |= (bi[:, 0] < x) & (bi[:, 2] > x)
    for y in lines_y:
        straddle |= (bi[:, 1] < y) & (bi[:, 3] > y)
    assert straddle.sum() >= 5
    ious = {i: iou for i, _, iou in pairs}
    straddling_ious = np.array([ious.get(i, 0.0) for i in np.flatnonzero(straddle)])
    if exact:
        assert np.all(straddling_ious > 0.99), straddling_ious.min()
    else:
        assert np.mean(straddling_ious >= 0.5) >= f1_min


def test_tiled_equals_untiled_synthetic(slide_path, tiled, tmp_path):
    whole = tmp_path / "whole"
    run_segment(slide_path, whole, model_path=threshold_model, cfg=config(1024), quiet=True)  # one chunk
    s = json.loads(slide_paths(whole, "syn").summary.read_text())
    assert s["tissue_chunks"] == 1 and s["parameters"]["store"]["chunk_px"] == 1024
    check_seams(tiled, whole, "syn", CORE, (1.0, 1.0), border_px=2, f1_min=1.0, exact=True)
    # the stand-in sees every synthetic nucleus whole: counts agree exactly
    assert len(polygons(tiled, "syn")) == len(polygons(whole, "syn"))


@pytest.mark.slow
@pytest.mark.skipif(not WEIGHTS.exists(), reason=f"shipped model weights missing: {WEIGHTS}")
def test_tiled_equals_untiled_real_slide_real_model(tmp_path):
    slide = shared_file("slides/CMU-1-Small-Region.svs")
    cfg_t = Config(store=StoreConfig(chunk_px=256))
    cfg_w = Config(store=StoreConfig(chunk_px=4096))
    run_segment(slide, tmp_path / "t", slide_id="cmu", cfg=cfg_t, quiet=True)
    run_segment(slide, tmp_path / "w", slide_id="cmu", cfg=cfg_w, quiet=True)
    s = json.loads(slide_paths(tmp_path / "w", "cmu").summary.read_text())
    assert s["tissue_chunks"] == 1
    store_mpp = s["parameters"]["store"]["mpp"]
    scale = (store_mpp / s["source"]["slide_mpp_x"], store_mpp / s["source"]["slide_mpp_y"])
    check_seams(tmp_path / "t", tmp_path / "w", "cmu", 256, scale, border_px=64, f1_min=0.99)


# ---------------------------------------------------------------------------------------------
# determinism, export as a separate step


def test_deterministic_across_runs_and_workers(slide_path, tiled, tmp_path):
    run_segment(slide_path, tmp_path, model_path=threshold_model, cfg=config(CORE, workers=1, batch_size=1), quiet=True)
    ref = finals(tiled, "syn")
    assert finals(tmp_path, "syn") == ref
    assert summary_wo_timings(tmp_path, "syn") == summary_wo_timings(tiled, "syn")
    # rerun in place: store and chunks are reused, outputs identical
    chunks = sorted(slide_paths(tmp_path, "syn").chunks.glob("*.parquet"))
    before = {p: p.stat().st_mtime_ns for p in chunks}
    run_segment(slide_path, tmp_path, model_path=threshold_model, cfg=config(CORE, workers=2), quiet=True)
    assert {p: p.stat().st_mtime_ns for p in chunks} == before
    assert finals(tmp_path, "syn") == ref


def test_outputs_are_valid(tiled):
    import geopandas as gpd

    sp = slide_paths(tiled, "syn")
    fc = json.loads(gzip.decompress(sp.geojson_gz.read_bytes()))
    s = json.loads(sp.summary.read_text())
    gdf = gpd.read_parquet(sp.parquet)
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == len(gdf) == s["nuclei"] > 50
    assert fc["features"][0]["properties"]["objectType"] == "detection"
    assert gdf["nucleus_id"].tolist() == list(range(1, len(gdf) + 1))
    assert s["note"] is None and s["nuclei_per_mm2"] > 0 and s["model"]["name"].startswith("callable:")
    assert s["parameters"]["segment"]["halo_px"] == HALO
    from PIL import Image

    with Image.open(sp.qc_png) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] > 100
        px = np.asarray(im.convert("RGB"))
    assert (px[..., 2] > 200).sum() > 0  # outlines / heat drawn
    assert not list(Path(tiled).rglob("*.tmp-*"))


def test_cli_export_matches_segment(tiled, tmp_path):
    sp = slide_paths(tiled, "syn")
    assert cli_main(["--quiet", "export", str(sp.store), str(sp.chunks), "-o", str(tmp_path), "--geojson-plain"]) == 0
    assert finals(tmp_path, "syn") == finals(tiled, "syn")
    assert summary_wo_timings(tmp_path, "syn")["nuclei"] == summary_wo_timings(tiled, "syn")["nuclei"]
    plain = json.loads(slide_paths(tmp_path, "syn").geojson.read_text(encoding="utf-8"))
    assert plain == json.loads(gzip.decompress(sp.geojson_gz.read_bytes()))


def test_export_refuses_incomplete_chunks(tiled, tmp_path, capsys):
    import shutil

    sp = slide_paths(tiled, "syn")
    chunks = tmp_path / "chunks"
    shutil.copytree(sp.chunks, chunks)
    victim = sorted(chunks.glob("*.parquet"))[0]
    victim.unlink()
    with pytest.raises(InputError, match=victim.name):
        run_export(sp.store, chunks, tmp_path / "out")
    assert not (tmp_path / "out" / "syn.geojson.gz").exists()
    capsys.readouterr()
    assert cli_main(["export", str(sp.store), str(chunks), "-o", str(tmp_path / "out")]) == InputError.exit_code
    err = capsys.readouterr().err
    assert err.startswith("cellsam: error: ") and err.count("\n") == 1 and "cellsam infer" in err


# ---------------------------------------------------------------------------------------------
# resume after SIGKILL


def _cli(*args):
    return [sys.executable, "-m", "pipeline.cli", "--quiet", *map(str, args)]


def test_resume_after_sigkill(slide_path, tmp_path):
    out = tmp_path / "killed"
    args = ["segment", slide_path, "-o", out, "--model", "classical", "--chunk", 256, "--halo", HALO,
            "--workers", 1, "--batch-size", 1]
    sp = slide_paths(out, "syn")
    proc = subprocess.Popen(_cli(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list(sp.chunks.glob("*.parquet"))) >= 2:
                break
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    done = sorted(sp.chunks.glob("*.parquet"))
    total = len(json.loads((sp.store / ".zattrs").read_text())["cellsam"]["tissue_chunks"])
    assert 2 <= len(done) < total, "the run finished before it could be interrupted"
    for p in sp.finals():  # nothing under a final name yet
        assert not p.exists()
    for p in done:  # every chunk file under its final name is complete
        assert pq.read_table(p).num_rows >= 0
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in done}

    rerun = subprocess.run(_cli(*args), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sp.chunks.glob("*.parquet")}
    assert len(after) == total
    assert {k: after[k] for k in before} == before  # reused, not rewritten
    assert not list(out.rglob("*.tmp-*"))

    ref = tmp_path / "ref"
    run_segment(slide_path, ref, model_path="classical", cfg=config(256, workers=2, batch_size=4), quiet=True)
    assert finals(out, "syn") == finals(ref, "syn")
    assert summary_wo_timings(out, "syn") == summary_wo_timings(ref, "syn")


# ---------------------------------------------------------------------------------------------
# empty inputs


def test_slide_without_tissue_gives_empty_outputs(tmp_path):
    import geopandas as gpd

    from pipeline.synthetic import write_synthetic_slide

    slide = write_synthetic_slide(tmp_path / "white.tif", size_px=(600, 700), mpp=MPP, n_regions=0)
    summary = run_segment(slide, tmp_path / "out", model_path=threshold_model, cfg=config(256), quiet=True)
    sp = slide_paths(tmp_path / "out", "white")
    assert summary["nuclei"] == 0 and summary["tissue_chunks"] == 0 and "no tissue" in summary["note"]
    assert json.loads(sp.summary.read_text())["note"] == summary["note"]
    assert json.loads(gzip.decompress(sp.geojson_gz.read_bytes())) == {"type": "FeatureCollection", "features": []}
    assert len(gpd.read_parquet(sp.parquet)) == 0
    assert sp.qc_png.stat().st_size > 0


def test_tissue_without_nuclei(slide_path, tmp_path):
    summary = run_segment(slide_path, tmp_path, model_path=no_nuclei_model, cfg=config(256), quiet=True)
    assert summary["nuclei"] == 0 and summary["tissue_chunks"] > 0 and "no nuclei" in summary["note"]
    assert summary["nuclei_per_mm2"] == 0


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_segment_missing_slide_one_line(tmp_path, capsys):
    code = cli_main(["segment", str(tmp_path / "nope.svs"), "-o", str(tmp_path / "o"), "--model", "classical"])
    err = capsys.readouterr().err
    assert code == InputError.exit_code or code == 3
    assert err.startswith("cellsam: error: ") and err.count("\n") == 1 and "nope.svs" in err
    assert not (tmp_path / "o" / "nope.geojson.gz").exists()


def test_cli_segment_bad_values_one_line(slide_path, tmp_path, capsys):
    from pipeline.errors import ConfigError, ModelError

    assert cli_main(["segment", str(slide_path), "-o", str(tmp_path), "--halo", "-5"]) == ConfigError.exit_code
    assert cli_main(["segment", str(slide_path), "-o", str(tmp_path), "--model", str(tmp_path / "x.pt")]) == ModelError.exit_code
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "halo_px" in err[0] and "x.pt" in err[1]


def test_cli_demo(tmp_path, monkeypatch, capsys):
    from pipeline.cli import demo

    monkeypatch.setattr(demo, "DEMO_SIZE_PX", (1500, 1500))  # the real demo is 3000 px: same code, smaller
    assert cli_main(["--quiet", "demo", "-o", str(tmp_path), "--model", "classical"]) == 0
    out = capsys.readouterr().out
    assert "nuclei" in out and str(tmp_path / "demo_slide.geojson.gz") in out
    s = json.loads((tmp_path / "demo_slide.summary.json").read_text())
    assert s["nuclei"] > 50


# ---------------------------------------------------------------------------------------------
# memory does not grow with the slide


MEMORY_SCRIPT = r"""
import json, resource, sys
import numpy as np
from scipy import ndimage
from pipeline.config import Config
from pipeline.segment import run_segment

def threshold_model(images):
    out = []
    for img in images:
        labels, n = ndimage.label(img.mean(axis=2) < 120, structure=np.ones((3, 3)))
        out.append((labels.astype(np.uint32), np.ones(n, np.float32)))
    return out

s = run_segment(sys.argv[1], sys.argv[2], model_path=threshold_model, cfg=Config(), quiet=True)
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "nuclei": s["nuclei"],
                  "chunks": s["tissue_chunks"]}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not (IN_CI or os.environ.get("CELLSAM_SLOW_TESTS")), reason="slow (~2 min): set CELLSAM_SLOW_TESTS=1")
def test_peak_memory_flat_in_slide_size(tmp_path):
    from pipeline.synthetic import write_synthetic_slide

    peaks = {}
    for size in (5000, 20000):
        slide = write_synthetic_slide(tmp_path / f"s{size}.tif", size_px=(size, size), mpp=MPP, nuclei_fraction=0.05)
        proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(slide), str(tmp_path / f"o{size}")],
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-2000:]
        peaks[size] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert peaks[20000]["chunks"] >= 8 * peaks[5000]["chunks"]  # many more chunks processed
    assert peaks[20000]["peak_rss_mb"] - peaks[5000]["peak_rss_mb"] < 300, peaks


def test_given_store_is_reused_and_other_slides_refused(slide_path, tiled, tmp_path):
    from pipeline.synthetic import write_synthetic_slide

    store = slide_paths(tiled, "syn").store
    stamp = (store / ".zattrs").stat().st_mtime_ns
    # default chunk (1024) differs from the store's (250): the given store is used as is
    run_segment(slide_path, tmp_path / "o", store_path=store, model_path=threshold_model,
                cfg=Config(segment=SegmentConfig(halo_px=HALO)), quiet=True)
    assert (store / ".zattrs").stat().st_mtime_ns == stamp
    assert finals(tmp_path / "o", "syn") == finals(tiled, "syn")
    other = write_synthetic_slide(tmp_path / "other.tif", size_px=(600, 600), mpp=MPP, seed=9)
    with pytest.raises(InputError, match="another slide"):
        run_segment(other, tmp_path / "p", store_path=store, model_path=threshold_model, cfg=config(), quiet=True)
    assert (store / ".zattrs").stat().st_mtime_ns == stamp
