"""OME-Zarr tile store: layout, pixels, sparsity, reuse, atomicity, flat memory."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, shared_file
from pipeline.config import StoreConfig, TissueConfig
from pipeline.errors import OutputError, SlideReadError, StoreError
from pipeline.slide import ArraySlide, open_slide
from pipeline.store import open_store, read_window, write_store
from pipeline.synthetic import write_synthetic_slide


def _chunk_file(store: Path, level: int, r: int, c: int) -> Path:
    return store / str(level) / "0" / str(r) / str(c)


def _tissue_array(h=300, w=400, value=(230, 150, 190)):
    arr = np.full((h, w, 3), 245, np.uint8)
    arr[40:200, 30:180] = value
    return arr


@pytest.fixture(scope="module")
def cmu_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmu") / "cmu.ome.zarr"
    with open_slide(shared_file("slides/CMU-1-Small-Region.svs")) as slide:
        write_store(slide, out, StoreConfig(mpp=0.5, chunk_px=1024), TissueConfig(), "cmu", tissue_png=out.with_name("cmu.tissue.png"))
    return out


def test_cmu_store_layout_and_ngff(cmu_store):
    group, attrs = open_store(cmu_store)
    assert attrs["complete"] is True and attrs["schema_version"] == 1
    assert attrs["slide_id"] == "cmu" and attrs["mpp"] == 0.5 and attrs["chunk_px"] == 1024
    assert attrs["shape_rc"] == [round(2967 * 0.499 / 0.5), round(2220 * 0.499 / 0.5)]
    assert attrs["scale_x_l0"] == pytest.approx(0.5 / 0.499)
    assert attrs["bounds_l0"] == [0, 0, 2220, 2967] and attrs["slide_dimensions_l0"] == [2220, 2967]
    assert attrs["tissue_area_mm2"] > 0.1
    assert attrs["tissue_chunks"] == sorted(attrs["tissue_chunks"]) and len(attrs["tissue_chunks"]) >= 1
    assert len(attrs["source_sha256"]) == 64
    arr0 = group["0"]
    assert arr0.shape == (3, *attrs["shape_rc"]) and arr0.chunks == (3, 1024, 1024) and arr0.dtype == np.uint8
    zarray = json.loads((cmu_store / "0" / ".zarray").read_text())
    assert zarray["zarr_format"] == 2 and zarray["fill_value"] == 255 and zarray["dimension_separator"] == "/"
    assert zarray["compressor"] is not None
    ms = json.loads((cmu_store / ".zattrs").read_text())["multiscales"][0]
    assert ms["version"] == "0.4" and [a["name"] for a in ms["axes"]] == ["c", "y", "x"]
    scales = [d["coordinateTransformations"][0]["scale"] for d in ms["datasets"]]
    assert scales == [[1.0, 0.5 * 2**k, 0.5 * 2**k] for k in range(len(scales))]
    assert (cmu_store.with_name("cmu.tissue.png")).is_file()

    # the ome-zarr reader sees image + tissue label with the same number of levels
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    nodes = list(Reader(parse_url(str(cmu_store)))())
    image = nodes[0]
    assert [tuple(d.shape) for d in image.data][0] == (3, *attrs["shape_rc"])
    label_nodes = [n for n in nodes if any(type(s).__name__ == "Label" for s in n.specs)]
    assert label_nodes and len(label_nodes[0].data) == len(image.data)
    lab_attrs = json.loads((cmu_store / "labels" / "tissue" / ".zattrs").read_text())
    assert lab_attrs["image-label"]["source"] == {"image": "../../"}


def test_cmu_pixels_match_openslide_and_background_absent(cmu_store):
    import openslide

    group, attrs = open_store(cmu_store)
    rows, cols = attrs["shape_rc"]
    store_rgb = read_window(group, 0, 0, rows, cols)
    osr = openslide.OpenSlide(str(shared_file("slides/CMU-1-Small-Region.svs")))
    full = osr.read_region((0, 0), 0, (2240, 2990)).convert("RGB")  # a little beyond the edge
    s = attrs["scale_x_l0"]
    ref = np.asarray(full.resize((cols, rows), Image.Resampling.BOX, box=(0, 0, cols * s, rows * s)))
    tissue = {tuple(rc) for rc in attrs["tissue_chunks"]}
    n_r, n_c = -(-rows // 1024), -(-cols // 1024)
    assert len(tissue) < n_r * n_c  # some background chunks exist on this slide
    for r in range(n_r):
        for c in range(n_c):
            win = (slice(r * 1024, (r + 1) * 1024), slice(c * 1024, (c + 1) * 1024))
            if (r, c) in tissue:
                diff = np.abs(store_rgb[win].astype(int) - ref[win])
                assert diff.max() <= 2 and diff.mean() < 0.05
                assert _chunk_file(cmu_store, 0, r, c).is_file()
            else:
                assert not _chunk_file(cmu_store, 0, r, c).exists()
                assert (store_rgb[win] == 255).all()
    # pyramid level 1 is the 2x2 mean of level 0
    lvl1 = np.asarray(group["1"][:, :512, :512]).astype(int)
    lvl0 = np.asarray(group["0"][:, :1024, :1024]).astype(int)
    mean = (lvl0[:, ::2, ::2] + lvl0[:, 1::2, ::2] + lvl0[:, ::2, 1::2] + lvl0[:, 1::2, 1::2] + 2) // 4
    assert np.array_equal(lvl1, mean)
    # tissue label is 1 somewhere, 0 on background
    lab = np.asarray(group["labels/tissue/0"][0])
    assert lab.max() == 1 and lab.min() == 0


def test_reuse_and_read_window(cmu_store, caplog):
    before = (cmu_store / ".zattrs").stat().st_mtime_ns
    with open_slide(shared_file("slides/CMU-1-Small-Region.svs")) as slide, caplog.at_level(logging.INFO):
        write_store(slide, cmu_store, StoreConfig(mpp=0.5, chunk_px=1024), TissueConfig(), "cmu")
    assert "store up to date" in caplog.text
    assert (cmu_store / ".zattrs").stat().st_mtime_ns == before
    group, attrs = open_store(cmu_store)
    win = read_window(group, -10, attrs["shape_rc"][1] - 5, 20, 20)
    assert win.shape == (20, 20, 3) and (win[:10] == 255).all() and (win[:, 5:] == 255).all()


def test_jp2k_slide_with_override(tmp_path):
    path = shared_file("slides/TCGA-CR-7395-01A-01-TS1.svs")
    with pytest.raises(SlideReadError, match="--slide-mpp"):
        open_slide(path)
    with open_slide(path, slide_mpp=0.25) as slide:
        assert slide.best_level_for_mpp(0.5) == 1
        out = write_store(slide, tmp_path / "t.zarr", StoreConfig(mpp=0.5, chunk_px=1024), TissueConfig(), "t")
        group, attrs = open_store(out)
        assert attrs["shape_rc"] == [round(3567 * 0.25 / 0.5), round(4443 * 0.25 / 0.5)]
        r, c = attrs["tissue_chunks"][0]
        got = read_window(group, r * 1024 + 100, c * 1024 + 100, 64, 64)
        lvl1 = slide.read_region_l0(round((c * 1024 + 100) * 2), round((r * 1024 + 100) * 2), 64, 64, 1)
        assert np.abs(got.astype(int) - lvl1).mean() < 4


@pytest.mark.parametrize("value", [(255, 255, 255), (0, 0, 0)])
def test_blank_slides_give_empty_store(tmp_path, value):
    slide = ArraySlide(np.full((600, 500, 3), value, np.uint8), mpp=0.5)
    out = write_store(slide, tmp_path / "b.zarr", StoreConfig(chunk_px=256, pyramid_levels=2), TissueConfig(), "b")
    group, attrs = open_store(out)
    assert attrs["tissue_chunks"] == [] and attrs["tissue_area_mm2"] == 0.0
    assert not (out / "0" / "0").exists()  # no chunk files at all
    assert (read_window(group, 0, 0, 600, 500) == 255).all()


def test_array_store_deterministic_and_replaces_incomplete(tmp_path):
    slide = ArraySlide(_tissue_array(), mpp=0.25)
    cfg = StoreConfig(mpp=0.5, chunk_px=64, pyramid_levels=3, workers=2)
    tcfg = TissueConfig(thumb_mpp=4.0, min_area_um2=100.0)
    a = write_store(slide, tmp_path / "a.zarr", cfg, tcfg, "x")
    b = tmp_path / "b.zarr"
    b.mkdir()
    (b / ".zgroup").write_text('{"zarr_format": 2}')  # incomplete leftover: replaced
    write_store(slide, b, cfg, tcfg, "x")
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) > 10
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    _, attrs = open_store(b)
    assert attrs["shape_rc"] == [150, 200] and attrs["tissue_chunks"]


def test_open_store_errors(tmp_path):
    with pytest.raises(StoreError, match="no tile store"):
        open_store(tmp_path / "nope.zarr")
    bad = tmp_path / "bad.zarr"
    bad.mkdir()
    (bad / ".zgroup").write_text('{"zarr_format": 2}')
    (bad / ".zattrs").write_text(json.dumps({"cellsam": {"complete": False, "schema_version": 1}}))
    with pytest.raises(StoreError, match="incomplete"):
        open_store(bad)


def test_unwritable_or_alien_output(tmp_path):
    slide = ArraySlide(_tissue_array(), mpp=0.5)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="file"):
        write_store(slide, blocker / "sub" / "s.zarr", StoreConfig(chunk_px=128), TissueConfig(), "x")
    alien = tmp_path / "mydata"
    alien.mkdir()
    (alien / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="not a tile store"):
        write_store(slide, alien, StoreConfig(chunk_px=128), TissueConfig(), "x")
    assert (alien / "notes.txt").read_text() == "keep me"


class _FailingSlide(ArraySlide):
    """Input double: decoding fails after a few reads (a corrupt tile mid-slide)."""

    def __init__(self, *a, fail_after: int, **k):
        super().__init__(*a, **k)
        self.reads = 0
        self.fail_after = fail_after

    def _read_level(self, *args):
        self.reads += 1
        if self.reads > self.fail_after:
            raise SlideReadError("<array>: file is truncated or corrupt: test")
        return super()._read_level(*args)


def test_failed_tile_leaves_no_store(tmp_path):
    slide = _FailingSlide(_tissue_array(600, 800), mpp=0.5, fail_after=3)
    out = tmp_path / "f.zarr"
    with pytest.raises(SlideReadError):
        write_store(slide, out, StoreConfig(chunk_px=64, workers=1), TissueConfig(min_area_um2=100.0), "f")
    assert not out.exists()
    assert not list(tmp_path.glob("f.zarr.tmp-*"))


def test_killed_tile_leaves_no_complete_store(tmp_path):
    src = write_synthetic_slide(tmp_path / "k.tif", size_px=(3000, 3000), seed=1, levels=3, tissue_scale=0.3)
    out = tmp_path / "k.zarr"
    cmd = [sys.executable, "-m", "pipeline.cli", "--quiet", "tile", str(src), "-o", str(out), "--chunk", "128", "--workers", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        tmps = list(tmp_path.glob("k.zarr.tmp-*"))
        if tmps and (tmps[0] / "0" / "0").exists():  # chunks being written
            break
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.skip("tile finished before it could be interrupted")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    with pytest.raises(StoreError):
        open_store(out)
    for tmp in tmp_path.glob("k.zarr.tmp-*"):
        with pytest.raises(StoreError):
            open_store(tmp)
    # a rerun removes the dead writer's temp dir and completes
    with open_slide(src) as slide:
        write_store(slide, out, StoreConfig(chunk_px=512), TissueConfig(), "k")
    assert open_store(out)[1]["complete"] is True
    assert not list(tmp_path.glob("k.zarr.tmp-*"))


_PEAK = (
    "import resource, subprocess, sys; "
    "r = subprocess.run(sys.argv[1:]); "
    "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


@pytest.mark.slow
def test_memory_flat_5k_vs_20k(tmp_path):
    peaks = {}
    for side in (5000, 20000):
        src = write_synthetic_slide(tmp_path / f"s{side}.tif", size_px=(side, side), seed=0, levels=5, tissue_scale=0.1)
        out = tmp_path / f"s{side}.zarr"
        cmd = [sys.executable, "-c", _PEAK, sys.executable, "-m", "pipeline.cli", "--quiet", "tile", str(src), "-o", str(out), "--chunk", "1024"]
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
        rc, peak_kb = (int(v) for v in res.stdout.split())
        assert rc == 0, res.stderr
        assert open_store(out)[1]["tissue_chunks"]
        peaks[side] = peak_kb / 1024
    assert peaks[20000] - peaks[5000] < 200, peaks
