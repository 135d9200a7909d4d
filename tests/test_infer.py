"""Chunked inference (pipeline/infer.py): grid, resume, determinism, scheduling, errors.

The model is a deterministic classical stand-in defined here (dark-pixel threshold + connected
components): an instance depends only on its own pixels, so it is tile-independent given a halo
larger than a nucleus, and any difference between runs comes from the orchestration.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import ndimage

from pipeline.config import SegmentConfig, StoreConfig, TissueConfig
from pipeline.errors import ModelError, StoreError
from pipeline.infer import (
    META_NAME,
    Model,
    chunk_path,
    chunk_windows,
    list_chunk_files,
    make_batches,
    model_box,
    parse_chunk_name,
    run_infer,
)

MPP = 0.5
HALO = 40  # synthetic nuclei are <= 12 µm = 24 px across


def threshold_model(images):
    """Stand-in model: pixels darker than 120 (synthetic nuclei), 8-connected components."""
    out = []
    for img in images:
        labels, n = ndimage.label(img.mean(axis=2) < 120, structure=np.ones((3, 3)))
        scores = np.ones(n, np.float32)
        if n:
            scores = (1.0 - np.asarray(ndimage.mean(img[..., 0], labels, np.arange(1, n + 1))) / 255.0).astype(np.float32)
        out.append((labels.astype(np.uint32), scores))
    return out


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory):
    from pipeline.synthetic import write_synthetic_slide

    return write_synthetic_slide(tmp_path_factory.mktemp("slide") / "syn.tif", size_px=(900, 1000), mpp=MPP, seed=3)


def make_store(slide_path, out, chunk_px, mpp=MPP):
    from pipeline.slide import open_slide
    from pipeline.store import write_store

    with open_slide(slide_path) as slide:
        return write_store(slide, out, StoreConfig(mpp=mpp, chunk_px=chunk_px, pyramid_levels=2), TissueConfig(), "syn")


@pytest.fixture(scope="module")
def store256(slide_path, tmp_path_factory):
    return make_store(slide_path, tmp_path_factory.mktemp("store") / "s.ome.zarr", 256)


def cfg(**kw):
    return SegmentConfig(**{"halo_px": HALO, "batch_size": 2, "workers": 2, **kw})


def file_bytes(chunks_dir):
    return {p.name: p.read_bytes() for p in sorted(Path(chunks_dir).glob("*.parquet"))}


# ---------------------------------------------------------------------------------------------
# pure core


def test_chunk_windows_grid_and_clipping():
    wins = chunk_windows((600, 530), 256, 32, [[2, 2], [0, 0], [1, 2], [0, 0]])
    assert [w.chunk_rc for w in wins] == [(0, 0), (1, 2), (2, 2)]  # sorted, unique
    first, mid, last = wins
    assert first.core_box_rc == (0, 0, 256, 256)
    assert first.window_origin_rc == (-32, -32) and first.window_px == 320
    assert first.clipped_box_rc((600, 530)) == (0, 0, 288, 288)
    assert mid.core_box_rc == (256, 512, 512, 530)  # clipped at the right edge
    assert last.core_box_rc == (512, 512, 600, 530)
    assert last.clipped_box_rc((600, 530)) == (480, 480, 600, 530)
    with pytest.raises(StoreError, match="outside"):
        chunk_windows((600, 530), 256, 32, [[3, 0]])


def test_batches_and_names():
    assert make_batches(list(range(5)), 2) == [[0, 1], [2, 3], [4]]
    assert chunk_path("d", (3, 7)).name == "3_7.parquet"
    assert parse_chunk_name("3_7.parquet") == (3, 7)
    assert parse_chunk_name("_meta.json") is None and parse_chunk_name("3_7.parquet.tmp-5") is None


def test_model_box_is_tissue_bbox_plus_margin_aligned():
    tissue = np.zeros((320, 320), bool)
    assert model_box(tissue, 32) is None
    tissue[200:230, 250:260] = True
    r0, c0, r1, c1 = model_box(tissue, 32)
    assert (r0, c0, r1, c1) == (160, 208, 272, 304)  # 200-32 -> 160 (16-aligned), 260+32 -> 304
    assert all(v % 16 == 0 for v in (r0, c0, r1, c1))
    tissue[:] = True
    assert model_box(tissue, 32) == (0, 0, 320, 320)  # never beyond the window


def test_crop_to_tissue_finds_the_same_nuclei(store256, tmp_path):
    """Running the model on tissue boxes only loses nothing against whole windows."""
    import pyarrow.parquet as pq

    a = run_infer(store256, tmp_path / "crop", model=threshold_model, cfg=cfg(), quiet=True)
    b = run_infer(store256, tmp_path / "full", model=threshold_model, cfg=cfg(crop_to_tissue=False), quiet=True)
    assert a["instances"] == b["instances"] > 0

    def nuclei(d):
        out = []
        for p in sorted(Path(d).glob("*.parquet")):
            t = pq.read_table(p, columns=["anchor_y_px", "anchor_x_px", "geometry"]).to_pydict()
            out += zip(t["anchor_y_px"], t["anchor_x_px"], t["geometry"])
        return sorted(out)

    assert nuclei(tmp_path / "crop") == nuclei(tmp_path / "full")


# ---------------------------------------------------------------------------------------------
# run_infer


def test_infer_writes_one_file_per_tissue_chunk(store256, tmp_path):
    from pipeline.store import open_store

    _, attrs = open_store(store256)
    res = run_infer(store256, tmp_path / "c", model=threshold_model, cfg=cfg(), quiet=True)
    tissue = sorted(tuple(rc) for rc in attrs["tissue_chunks"])
    assert 0 < len(tissue) < 16  # some background chunks are skipped
    assert sorted(list_chunk_files(tmp_path / "c")) == tissue
    assert res["chunks_processed"] == len(tissue) and res["chunks_reused"] == 0
    assert set(res["timings_s"]) >= {"read_s", "model_s", "extract_s", "write_s", "wall_s"}
    meta = json.loads((tmp_path / "c" / META_NAME).read_text())
    assert meta["halo_px"] == HALO and meta["store"]["chunk_px"] == 256
    n = 0
    for rc in tissue:
        t = pq.read_table(chunk_path(tmp_path / "c", rc))
        assert set(t["chunk_row"].to_pylist()) <= {rc[0]} and set(t["chunk_col"].to_pylist()) <= {rc[1]}
        # every kept anchor is in its core expanded by eps
        ay, ax = t["anchor_y_px"].to_numpy(), t["anchor_x_px"].to_numpy()
        eps = SegmentConfig().anchor_eps_px
        assert np.all((ay >= rc[0] * 256 - eps) & (ay < (rc[0] + 1) * 256 + eps))
        assert np.all((ax >= rc[1] * 256 - eps) & (ax < (rc[1] + 1) * 256 + eps))
        n += t.num_rows
    assert n == res["instances"] > 50
    assert not list((tmp_path / "c").glob("*.tmp-*"))


def test_infer_deterministic_across_workers_and_batches(store256, tmp_path):
    run_infer(store256, tmp_path / "a", model=threshold_model, cfg=cfg(workers=1, batch_size=1), quiet=True)
    run_infer(store256, tmp_path / "b", model=threshold_model, cfg=cfg(workers=2, batch_size=3), quiet=True)
    a, b = file_bytes(tmp_path / "a"), file_bytes(tmp_path / "b")
    assert a and a == b


def test_infer_resume_skips_done_chunks(store256, tmp_path):
    out = tmp_path / "c"
    run_infer(store256, out, model=threshold_model, cfg=cfg(), quiet=True)
    full = file_bytes(out)
    names = sorted(full)
    # simulate an interrupted run: drop half of the chunk files, leave a stale temp file
    for name in names[::2]:
        (out / name).unlink()
    (out / f"{names[1]}.tmp-999999999").write_bytes(b"partial")
    kept = {n: os.stat(out / n) for n in names[1::2]}
    calls = []

    def counting_model(images):
        calls.append(len(images))
        return threshold_model(images)

    res = run_infer(store256, out, model=Model(counting_model, mpp=None, info={"name": "callable:threshold_model"}), cfg=cfg(), quiet=True)
    assert res["chunks_reused"] == len(kept) and res["chunks_processed"] == len(names) - len(kept)
    assert sum(calls) == len(names) - len(kept)
    for n, st in kept.items():  # untouched: same inode, same mtime
        now = os.stat(out / n)
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    assert file_bytes(out) == full
    assert not list(out.glob("*.tmp-*"))


def test_infer_changed_parameters_clear_stale_chunks(store256, tmp_path):
    out = tmp_path / "c"
    run_infer(store256, out, model=threshold_model, cfg=cfg(), quiet=True)
    first = file_bytes(out)
    res = run_infer(store256, out, model=threshold_model, cfg=cfg(min_area_um2=60.0), quiet=True)
    assert res["chunks_reused"] == 0  # recomputed, not reused
    second = file_bytes(out)
    assert sorted(first) == sorted(second)
    def rows(files):
        return sum(pq.read_table(pa.BufferReader(b)).num_rows for b in files.values())

    assert 0 < rows(second) < rows(first)
    assert json.loads((out / META_NAME).read_text())["min_area_um2"] == 60.0


def test_infer_distributed_scheduler_matches_threads(store256, tmp_path):
    from distributed import LocalCluster

    run_infer(store256, tmp_path / "t", model="classical", cfg=cfg(), quiet=True)
    # no default Client in this process: run_infer connects to the address itself
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        run_infer(store256, tmp_path / "d", model="classical", cfg=cfg(), scheduler=cluster.scheduler_address, quiet=True)
    assert file_bytes(tmp_path / "t") == file_bytes(tmp_path / "d")


def test_infer_refuses_store_at_other_resolution(store256, tmp_path):
    wrong = Model(threshold_model, mpp=0.25, info={"name": "x"})
    with pytest.raises(StoreError, match="0.25"):
        run_infer(store256, tmp_path / "c", model=wrong, cfg=cfg(), quiet=True)


def test_infer_rejects_malformed_model_output(store256, tmp_path):
    def bad(images):
        return [(np.zeros(img.shape[:2], np.int64), np.zeros(0, np.float32)) for img in images]

    with pytest.raises(ModelError, match="uint32"):
        run_infer(store256, tmp_path / "c", model=bad, cfg=cfg(), quiet=True)


def test_infer_missing_store_and_model(tmp_path, store256):
    with pytest.raises(StoreError, match="cellsam tile"):
        run_infer(tmp_path / "nope.ome.zarr", tmp_path / "c", model=threshold_model, cfg=cfg(), quiet=True)
    with pytest.raises(ModelError, match="not found"):
        run_infer(store256, tmp_path / "c", model=tmp_path / "missing.pt", cfg=cfg(), quiet=True)


def test_cli_infer_one_line_error(tmp_path, capsys):
    from pipeline.cli import main

    assert main(["infer", str(tmp_path / "nope.ome.zarr"), "-o", str(tmp_path / "c")]) == StoreError.exit_code
    err = capsys.readouterr().err
    assert err.startswith("cellsam: error: ") and err.count("\n") == 1 and "nope.ome.zarr" in err


def test_cli_infer_classical(store256, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "--quiet", "infer", str(store256), "-o", str(tmp_path / "c"),
         "--model", "classical", "--halo", str(HALO), "--workers", "1"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # --quiet: no progress bar, no info lines
    assert len(list_chunk_files(tmp_path / "c")) > 0


# ---------------------------------------------------------------------------------------------
# the real model class through its checkpoint (randomly initialised weights: the code path, not
# the accuracy, is under test; the shipped weights are tested when present)


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from pipeline.model.cellsam import DEFAULT_ARCH, CellSAM
    from pipeline.model.checkpoint import save_checkpoint

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "random.pt"
    save_checkpoint(path, CellSAM(DEFAULT_ARCH).eval(), {"mpp": MPP, "version": "test-random"})
    return path


def test_infer_with_checkpoint_is_deterministic(store256, random_checkpoint, tmp_path):
    res = run_infer(store256, tmp_path / "a", model=random_checkpoint, cfg=cfg(device="cpu", batch_size=3), quiet=True)
    info = json.loads((tmp_path / "a" / META_NAME).read_text())["model"]
    assert info["version"] == "test-random" and info["weights_file"] == "random.pt" and len(info["weights_sha256"]) == 64
    assert res["model_mpp"] == MPP and res["timings_s"]["model_s"] > 0
    run_infer(store256, tmp_path / "b", model=random_checkpoint, cfg=cfg(device="cpu", batch_size=3, workers=1), quiet=True)
    assert file_bytes(tmp_path / "a") == file_bytes(tmp_path / "b") != {}


SHIPPED = Path(__file__).resolve().parents[1] / "pipeline" / "weights" / "cellsam_default.pt"


@pytest.mark.skipif(not SHIPPED.exists(), reason=f"shipped model weights missing: {SHIPPED}")
def test_infer_with_shipped_model_finds_synthetic_nuclei(slide_path, tmp_path):
    from pipeline.model import load_model

    seg = load_model(device="auto")
    store = make_store(slide_path, tmp_path / "s.ome.zarr", 256, mpp=seg.mpp)
    halo = int(np.ceil(HALO * MPP / seg.mpp))
    res = run_infer(store, tmp_path / "c", model=seg, cfg=cfg(halo_px=halo), quiet=True)
    ref = run_infer(store, tmp_path / "r", model=threshold_model, cfg=cfg(halo_px=halo), quiet=True)
    assert res["model_mpp"] == seg.mpp
    # the synthetic nuclei are unmistakable: the model finds about as many as the threshold does
    assert abs(res["instances"] - ref["instances"]) <= 0.2 * ref["instances"]


def test_model_box_half_or_whole_snaps_to_four_shapes():
    """Static-shape engines: every box is a half or whole window per side and covers the tissue box."""
    from pipeline.infer import model_box

    rng = np.random.default_rng(0)
    shapes = set()
    for _ in range(300):
        tissue = np.zeros((1216, 1216), bool)
        r0, c0 = rng.integers(0, 1216, 2)
        tissue[r0:r0 + rng.integers(1, 900), c0:c0 + rng.integers(1, 900)] = True
        free = model_box(tissue, 64)
        snap = model_box(tissue, 64, half_or_whole=True)
        assert 0 <= snap[0] <= free[0] and free[2] <= snap[2] <= 1216
        assert 0 <= snap[1] <= free[1] and free[3] <= snap[3] <= 1216
        shapes.add((snap[2] - snap[0], snap[3] - snap[1]))
    assert shapes == {(608, 608), (608, 1216), (1216, 608), (1216, 1216)}
    assert model_box(np.zeros((1216, 1216), bool), 64, half_or_whole=True) is None
