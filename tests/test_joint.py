"""Joint training (pipeline/training/joint.py): point-corrected teacher targets, the D4 teacher,
hand-drawn negative regions and a short resumable run on the real shared data."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from conftest import NUCLEI, REPO, SHARED, shared_file
from pipeline.model.postprocess import PostprocessParams
from pipeline.training.joint import (JointConfig, load_negative_regions, point_targets, teacher_maps,
                                     train_joint)

NEGATIVES = REPO / "pipeline" / "data" / "negatives" / "cmu1_negatives.geojson"


def _disc(shape, cy, cx, r):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return np.hypot(yy - cy, xx - cx) <= r


def test_point_targets_hard_negative_missed_point_and_types():
    shape = (96, 96)
    prob = np.zeros(shape, np.float32)
    dist = np.zeros(shape, np.float32)
    for cy, cx in ((20, 20), (70, 70)):  # two teacher nuclei
        m = _disc(shape, cy, cx, 6)
        prob[m] = 0.95
        dist[m] = np.clip(1 - np.hypot(*(np.mgrid[:96, :96] - np.array([cy, cx])[:, None, None])) / 6, 0, 1)[m]
    # a typed point on the first nucleus, an unlabelled point where the teacher sees nothing;
    # nothing on the second nucleus (far from every point: a hard negative)
    pts = np.array([[20.0, 20.0], [20.0, 75.0]])
    cls = np.array([2, -1])
    off = point_targets(prob, dist, pts, cls, 0.5, PostprocessParams(), JointConfig())
    assert off["n_neg"] == 0 and off["fg"][70, 70] == pytest.approx(0.95)  # default: no point negatives
    cfg = JointConfig(point_negatives=True, neg_weight=3.0, pos_weight=2.0, pos_radius_um=2.0)
    t = point_targets(prob, dist, pts, cls, 0.5, PostprocessParams(), cfg)
    assert t["n_neg"] == 1 and t["n_missed"] == 1
    assert t["fg"][70, 70] == 0 and t["dist"][70, 70] == 0 and t["weight"][70, 70] == 3.0
    assert t["fg"][20, 20] == pytest.approx(0.95) and t["weight"][20, 20] == 1.0  # kept from the teacher
    assert t["fg"][75, 20] == 1.0 and t["weight"][75, 20] == 2.0 and t["dist"][75, 20] == 1.0  # missed: x=20, y=75
    assert t["fg"][75, 30] == 0.0  # 10 px = 5 µm away: outside the 2 µm disc
    assert t["types"][20, 20] == 2 and (t["types"] >= 0).sum() == 1


def test_teacher_is_d4_equivariant():
    """The teacher averages the 8 dihedral transforms: transforming the input transforms the maps."""
    from pipeline.data.readers import read_image
    from pipeline.model.checkpoint import DEFAULT_WEIGHTS, load_checkpoint
    from pipeline.model.segmenter import Segmenter

    img = read_image(shared_file("nuclei/crchisto/images/img2.png"))[:320, :320]
    model, meta = load_checkpoint(DEFAULT_WEIGHTS)
    seg = Segmenter(model, meta, device="cpu", engine="torch")
    p, d = teacher_maps(seg, img)
    p2, d2 = teacher_maps(seg, np.ascontiguousarray(img.transpose(1, 0, 2)[::-1]))
    np.testing.assert_allclose(p2, p.T[::-1], atol=2e-3)
    np.testing.assert_allclose(d2, d.T[::-1], atol=2e-3)
    assert 0.05 < (p > 0.5).mean() < 0.6  # it does see nuclei


def test_negative_regions_read_from_the_slide():
    """The CMU keratin/debris polygons: zero targets inside, the teacher's maps around them."""
    from pipeline.model.checkpoint import DEFAULT_WEIGHTS, load_checkpoint
    from pipeline.model.segmenter import Segmenter

    shared_file("slides/CMU-1-Small-Region.svs")
    bare = load_negative_regions(NEGATIVES, SHARED, 0.5)
    assert len(bare) == 1  # both polygons lie on one slide: one tissue window
    r = bare[0]
    assert r["image"].dtype == np.uint8 and r["image"].shape[:2] == r["mask"].shape == r["fg"].shape
    assert 0.05 < r["mask"].mean() < 0.5
    assert r["image"][r["mask"]].mean() > 120  # pale keratin / debris, not dark epidermis
    assert (r["weight"][~r["mask"]] == 0).all() and (r["weight"][r["mask"]] == 3.0).all()
    model, meta = load_checkpoint(DEFAULT_WEIGHTS)
    t = load_negative_regions(NEGATIVES, SHARED, 0.5, Segmenter(model, meta, device="cpu", engine="torch"))[0]
    assert (t["fg"][t["mask"]] == 0).all() and (t["weight"][~t["mask"]] == 1.0).all()
    assert (t["fg"][~t["mask"]] > 0.5).mean() > 0.03  # real nuclei around the negatives stay positive


def test_short_joint_run_resumes_and_ships_a_type_head(tmp_path):
    shared_file("nuclei/crchisto/points/img2.csv")
    shared_file("nuclei/monuseg2018_train")
    from pipeline.config import TrainConfig
    from pipeline.model.checkpoint import DEFAULT_WEIGHTS, load_checkpoint

    out = tmp_path / "joint.pt"
    kw = dict(init=DEFAULT_WEIGHTS, regions=NEGATIVES, regions_root=SHARED, tune=False, max_point_tiles=2)
    cfg = TrainConfig(epochs=1, iters_per_epoch=2, batch_size=6, crop_px=128, warmup_iters=1, lr=1e-4, threads=2)
    train_joint(str(NUCLEI), str(NUCLEI / "crchisto"), out, cfg=cfg, fit_types=False, **kw)
    run = tmp_path / "joint.pt.run"
    # rerun with one more epoch: resumes from last.pt (epoch 0 is not redone)
    cfg2 = TrainConfig(**{**cfg.__dict__, "epochs": 2})
    meta = train_joint(str(NUCLEI), str(NUCLEI / "crchisto"), out, cfg=cfg2, fit_types=True, **kw)
    with open(run / "log.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["epoch"] for r in rows] == ["0", "1"]
    for r in rows:
        assert 0 < float(r["val_det_f1"]) <= 1 and 0.3 < float(r["val_aji"]) <= 1
        assert float(r["w_bce"]) > 0 and float(r["type_ce"]) > 0
    model, meta2 = load_checkpoint(out)
    assert model.type_head is not None and model.type_head.classes == ["Epithelial", "Inflammatory", "Fibroblast", "Other"]
    assert model.type_head.cfg["reject_threshold"] is None
    assert meta2["joint_config"]["neg_weight"] == JointConfig().neg_weight
    assert meta["type_head_training"]["tiles"] == 2


def test_feature_distillation_anchors_the_starting_embedding():
    import torch

    from pipeline.model.checkpoint import DEFAULT_WEIGHTS, load_checkpoint
    from pipeline.training.joint import feature_loss, feature_teacher

    model, _ = load_checkpoint(DEFAULT_WEIGHTS)
    model.eval()
    teacher = feature_teacher(model)
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 64, 64)).astype(np.float32))
    same = feature_loss(model(x)["embed"], teacher, x)
    assert float(same) < 1e-10
    with torch.no_grad():  # move the student: the teacher must not follow, and the loss must see it
        for p in model.parameters():
            p.mul_(1.1)
    moved = feature_loss(model(x)["embed"], teacher, x)
    assert float(moved) > 1e-3
    assert not any(p.requires_grad for p in teacher.parameters())
    moved.backward()  # gradients reach the student only
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert all(p.grad is None for p in teacher.parameters())
