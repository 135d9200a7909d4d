"""Distillation (teacher-embedding cache, resumable loop), dual-mode and refiner training on two real
CPM-15 tiles (20x = 0.5 µm/px, read from ../shared/data) with a tiny randomly initialised SAM."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.cli import main
from pipeline.model import load_model
from pipeline.model.checkpoint import load_checkpoint
from pipeline.training.distill import (DistillConfig, TeacherCache, crop_grid, dihedral_pair, distill, embedding_loss,
                                       load_crops, train_dual)
from pipeline.training.refine_train import RefinerConfig, train_refiner
from pipeline.model.teacher import build_tiny_sam_checkpoint, load_teacher
from conftest import shared_file

TILES = ("image06", "image07")  # CPM-15 20x tiles, 459x392 and 439x439


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("nuclei")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    for name in TILES:
        (root / "images" / f"{name}.png").symlink_to(shared_file(f"nuclei/cpm15/images/{name}.png"))
        (root / "labels" / f"{name}.tif").symlink_to(shared_file(f"nuclei/cpm15/labels/{name}.tif"))
    (root / "mpp.txt").write_text("0.5\n")
    return root


@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory):
    return build_tiny_sam_checkpoint(tmp_path_factory.mktemp("sam") / "tiny_sam.pth")


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_crop_grid_covers_tile_deterministically():
    assert crop_grid((459, 392), 128) == [(r, c) for r in (0, 128, 256, 331) for c in (0, 128, 256, 264)]
    assert crop_grid((100, 300), 128) == [(0, 0), (0, 128), (0, 172)]


def test_dihedral_pair_is_consistent_with_the_grid():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)

    def pooled(a):  # a translation/dihedral-equivariant "embedding": 16x16 mean pooling
        t = torch.from_numpy(a.astype(np.float32)).permute(2, 0, 1)[None]
        return F.avg_pool2d(t, 16)[0].numpy()

    emb = pooled(img)
    for k in range(8):
        ti, te = dihedral_pair(img, emb, k)
        np.testing.assert_allclose(pooled(ti), te, rtol=1e-6)
    assert not np.array_equal(dihedral_pair(img, emb, 1)[1], emb)


def test_distill_caches_teacher_once_resumes_and_loss_falls(tmp_path, data_dir, tiny_sam):
    out = tmp_path / "student.pt"
    cfg = DistillConfig(epochs=1, iters_per_epoch=4, batch_size=2, crop_px=128, warmup_iters=1, lr=2e-3,
                        max_tiles=1)
    meta = distill(data_dir, out, tiny_sam, cfg=cfg, device="cpu")
    crops = load_crops(data_dir, cfg)
    assert meta["distill"]["cache_new"] == len(crops) == 16  # image06: 4 x 4 crops of 128 px
    cache = TeacherCache(out.with_name("student.pt.run") / "teacher.zarr", load_teacher(tiny_sam).info, 0.5, 128)
    assert all(cache.has(c["key"]) for c in crops)
    first = cache.get(crops[0]["key"])
    assert first.shape == (256, 8, 8) and first.dtype == np.float32
    # second epoch (resume from last.pt): the cache is reused, not recomputed
    cfg2 = DistillConfig(**{**cfg.__dict__, "epochs": 2})
    meta2 = distill(data_dir, out, tiny_sam, cfg=cfg2, device="cpu")
    assert meta2["distill"]["cache_new"] == 0
    rows = _rows(tmp_path / "student.pt.log.csv")
    assert [r["epoch"] for r in rows] == ["0", "1"] and rows[1]["cache_new"] == "0" and rows[0]["cache_new"] == "16"
    np.testing.assert_array_equal(cache.get(crops[0]["key"]), first)
    # the distillation loss on the fixed crops fell relative to the untrained student
    model, m = load_checkpoint(out)
    assert m["mode"] == "lite" and m["distilled_from"]["type"] == "custom"
    from pipeline.model.cellsam import CellSAM

    torch.manual_seed(cfg.seed)
    fresh = CellSAM()
    model.train()  # batch statistics: a few steps leave BatchNorm running stats unconverged
    x = torch.from_numpy(np.stack([c["image"] for c in crops])).permute(0, 3, 1, 2).float()
    tgt = torch.from_numpy(np.stack([cache.get(c["key"]) for c in crops]))
    with torch.no_grad():
        before = float(embedding_loss(fresh.student(fresh.normalize(x))["embed"], tgt)["loss"])
        after = float(embedding_loss(model.student(model.normalize(x))["embed"], tgt)["loss"])
    assert after < 0.97 * before, (before, after)


def test_dual_training_writes_a_dual_checkpoint(tmp_path, data_dir, tiny_sam):
    out = tmp_path / "dual.pt"
    cfg = DistillConfig(epochs=1, iters_per_epoch=2, batch_size=2, crop_px=128, warmup_iters=1)
    meta = train_dual(data_dir, out, tiny_sam, cfg=cfg, device="cpu")
    assert meta["mode"] == "dual" and meta["teacher"]["type"] == "custom"
    raw = torch.load(out, map_location="cpu", weights_only=True)
    assert raw["arch"]["fusion"] is True and any(k.startswith("fusion.") for k in raw["state_dict"])
    assert not any(k.startswith("teacher.") for k in raw["state_dict"])
    assert load_model(out, device="cpu", teacher=tiny_sam).mode == "dual"
    assert len(_rows(tmp_path / "dual.pt.log.csv")) == 1


def test_refiner_training_and_refined_segmentation(tmp_path, data_dir, tiny_sam):
    out = tmp_path / "refined.pt"
    from pipeline.model.cellsam import CellSAM

    torch.manual_seed(0)
    cfg = RefinerConfig(epochs=1, iters_per_epoch=2, batch_size=2, crop_px=128, prompts_per_crop=6, warmup_iters=1)
    meta = train_refiner(CellSAM(), data_dir, out, cfg=cfg, teacher=load_teacher(tiny_sam), metadata={"mpp": 0.5},
                         device="cpu")
    assert meta["refine"]["window_tokens"] == 8 and meta["refiner"]["decoder_init"] == "custom"
    row = _rows(tmp_path / "refined.pt.log.csv")[0]
    assert np.isfinite(float(row["loss"])) and float(row["loss"]) > 0
    seg = load_model(out, device="cpu", refine=True)
    assert seg.refine and seg.model.mask_decoder is not None
    img = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    lab, sc = seg.segment(img)[:2]
    assert lab.dtype == np.uint32 and sc.shape == (int(lab.max()),)


def test_cli_errors_are_one_line(tmp_path, data_dir, tiny_sam, capsys):
    rc = main(["distill", "--teacher", str(tmp_path / "nope.pth"), "--data", str(data_dir), "--out", str(tmp_path / "o.pt")])
    err = capsys.readouterr().err.strip()
    assert rc == 5 and err.startswith("cellsam: error:") and "not found" in err and "\n" not in err
    rc = main(["distill", "--refiner", "--data", str(data_dir), "--out", str(tmp_path / "o.pt")])
    assert rc == 2 and "--init" in capsys.readouterr().err
    rc = main(["distill", "--teacher", str(tiny_sam), "--data", str(data_dir), "--out", str(tmp_path / "o.pt"),
               "--prompts-per-crop", "3"])
    assert rc == 2 and "do not apply" in capsys.readouterr().err
