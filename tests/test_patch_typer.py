"""Patch typer (pipeline.model.patchtyper): patch sampling, the segmenter's typing rules, the
checkpoint round trip, training mechanics and the shipped ``quality`` model on held-out tiles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import shared_file
from pipeline.model.checkpoint import NAMED_WEIGHTS, load_checkpoint, resolve_weights, save_checkpoint
from pipeline.model.patchtyper import PatchTyper, combine, crop_patches, sample_patches
from pipeline.training.patchtyper import augment, blur_patches, fit_typer, instance_patches, typer_loss, typer_targets
from pipeline.training.typehead import NUCLEUS, REJECT

CLASSES = ["Epithelial", "Inflammatory", "Fibroblast", "Other"]


def _image(h=90, w=110, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(np.uint8)


def test_sample_patches_equals_crops_and_subsamples_and_reflects():
    img = _image().astype(np.float32)
    t = torch.from_numpy(img).permute(2, 0, 1)[None]
    # an 8-px patch centred on (50.5, 40.5) at 1 image px per patch px is the crop [37:45, 47:55]
    p = sample_patches(t, [[50.5, 40.5]], 1.0, 8)
    np.testing.assert_allclose(p[0].numpy(), img[37:45, 47:55].transpose(2, 0, 1), atol=0.01)
    # 2 image px per patch px: every other pixel
    p = sample_patches(t, [[50, 40]], 2.0, 4)
    np.testing.assert_allclose(p[0].numpy(), img[[37, 39, 41, 43]][:, [47, 49, 51, 53]].transpose(2, 0, 1), atol=0.01)
    # at the border: reflected (pixel -1 reads pixel 0 with align_corners=False reflection)
    p = sample_patches(t, [[0.5, 0.5]], 1.0, 4)  # columns / rows -1, 0, 1, 2
    np.testing.assert_allclose(p[0, :, 1:, 1:].numpy(), img[0:3, 0:3].transpose(2, 0, 1), atol=0.01)
    np.testing.assert_allclose(p[0, :, 0, 1:].numpy(), img[0, 0:3].T, atol=0.01)


def test_crop_patches_are_the_pixels_around_the_nucleus_wherever_the_window_starts():
    img = _image(120, 140)
    # scale 1: the window around the rounded centroid (x 50.4 -> 50, y 40.6 -> 41), 8 px: [37:45, 46:54]
    p = crop_patches(img, [[50.4, 40.6]], 1.0, 8)
    assert p.shape == (1, 3, 8, 8) and p.dtype == torch.uint8
    np.testing.assert_array_equal(p[0].permute(1, 2, 0).numpy(), img[37:45, 46:54])
    # scale 2: a 2x-upsampled image gives back (nearly) the original patch, unlike scale 1
    smooth = np.repeat(np.repeat(_image(30, 35), 4, 0), 4, 1)
    big = np.repeat(np.repeat(smooth, 2, 0), 2, 1)
    want = torch.from_numpy(smooth[37:45, 46:54]).permute(2, 0, 1).float()
    near = (crop_patches(big, [[100.0, 82.0]], 2.0, 8)[0].float() - want).abs().mean()  # big cols 92..107
    off = (crop_patches(big, [[100.0, 82.0]], 1.0, 8)[0].float() - want).abs().mean()
    assert near < 12 and off > 2 * near, (near, off)
    # a window that starts elsewhere (integer shift) gives the same interior patches, bit for bit
    cen = np.random.default_rng(3).uniform(40, 110, (50, 2))
    a = crop_patches(img, cen, 2.2, 20)
    b = crop_patches(img[9:, 5:], cen - [5, 9], 2.2, 20)
    inside = (cen[:, 0] - 5 > 23) & (cen[:, 1] - 9 > 23) & (cen[:, 0] < 140 - 23) & (cen[:, 1] < 120 - 23)
    assert inside.sum() >= 10
    assert torch.equal(a[inside], b[inside])
    # at the border: reflected, full size
    assert crop_patches(img, [[0, 0], [139, 119]], 2.2, 20).shape == (2, 3, 20, 20)
    assert crop_patches(img, np.zeros((0, 2)), 2.2, 20).shape == (0, 3, 20, 20)


def test_unknown_sampler_is_refused():
    with pytest.raises(ValueError, match="sampler"):
        PatchTyper({"classes": CLASSES, "sampler": "nearest"})


def test_instance_patches_follow_the_physical_scale():
    img = _image(200, 200)
    a = instance_patches(img, np.array([[100.5, 100.5]]), 0.55, 0.55, 10)
    b = instance_patches(img, np.array([[100.0, 100.0]]), 0.275, 0.55, 10)  # half the µm/px: 2 px per patch px
    assert a.shape == b.shape == (1, 10, 10, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a[0], img[96:106, 96:106])
    np.testing.assert_array_equal(b[0], img[91:110:2, 91:110:2])


def test_blur_patches_is_a_per_patch_gaussian_and_zero_is_identity():
    from scipy.ndimage import gaussian_filter

    x = torch.rand(3, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    y = blur_patches(x, np.array([0.0, 2.0, 1.0]))
    assert torch.allclose(y[0], x[0], atol=1e-6)  # sigma 0: unchanged
    ref = gaussian_filter(x[1, 2].numpy(), 2.0, mode="nearest", truncate=3.0)
    assert np.abs(ref - y[1, 2].numpy()).max() < 1e-5
    assert y[2].std() < x[2].std() and y[1].std() < y[2].std()  # more sigma, smoother


def test_typer_augment_blur_zero_keeps_the_old_stream():
    x = torch.rand(8, 3, 20, 20, generator=torch.Generator().manual_seed(1))
    a = augment(x, np.random.default_rng(2))
    b = augment(x, np.random.default_rng(2), blur=0.0)
    assert torch.equal(a, b)
    c = augment(x, np.random.default_rng(2), blur=1.0, mpp=1.1)
    assert not torch.equal(a, c) and c.shape == a.shape and float(c.min()) >= 0 and float(c.max()) <= 1


def test_combine_rules():
    h = np.array([[0.8, 0.2, 0, 0]], np.float32)
    t = np.array([[0.2, 0.6, 0.2, 0]], np.float32)
    np.testing.assert_allclose(combine(h, t, "typer"), t)
    np.testing.assert_allclose(combine(h, t, "mean"), [[0.5, 0.4, 0.1, 0]])
    np.testing.assert_allclose(combine(None, t, "mean"), t)
    with pytest.raises(ValueError, match="combine rule"):
        combine(h, t, "max")


def test_typer_targets_and_loss_by_hand():
    y = typer_targets(np.array([2, REJECT, NUCLEUS, -1]), 4)
    assert y.tolist() == [2, 4, NUCLEUS, -1]
    logits = torch.tensor([[0.0, 0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]])
    w = torch.ones(5)
    # class row: -log softmax[2]; nucleus row: -log(1 - p_reject)
    want = (-torch.log_softmax(logits[0], 0)[2] + (torch.logsumexp(logits[1], 0) - torch.logsumexp(logits[1, :4], 0))) / 2
    got = typer_loss(logits, torch.tensor([2, NUCLEUS]), w, 0.0)
    assert abs(float(got) - float(want)) < 1e-6


def test_fit_typer_learns_a_separable_toy_problem():
    rng = np.random.default_rng(0)
    n = 256
    y = rng.integers(0, 3, n)
    patches = np.zeros((n, 16, 16, 3), np.uint8)
    patches[..., 0] = np.where(y == 0, 200, 30)[:, None, None]  # class 0: red, class 1: green, 2 (reject): blue
    patches[..., 1] = np.where(y == 1, 200, 30)[:, None, None]
    patches[..., 2] = np.where(y == 2, 200, 30)[:, None, None]
    target = np.where(y == 2, 2, y)  # 2 classes + reject (index 2)
    cfg = {"classes": ["a", "b"], "patch_px": 16, "mpp": 0.5, "width": 8}
    typer = fit_typer(patches, target, cfg, epochs=6, batch=32, lr=5e-3, log=lambda *_: None)
    with torch.inference_mode():
        out = typer(torch.from_numpy(patches).permute(0, 3, 1, 2).float() / 255).argmax(1).numpy()
    assert (out == target).mean() > 0.9


def test_fit_typer_learns_classes_from_a_teachers_soft_targets():
    # every row is only "a nucleus of some class" (NUCLEUS): the class can come from the teacher alone
    rng = np.random.default_rng(1)
    n = 256
    cls = rng.integers(0, 2, n)
    patches = np.zeros((n, 16, 16, 3), np.uint8)
    patches[..., 0] = np.where(cls == 0, 200, 30)[:, None, None]
    patches[..., 1] = np.where(cls == 1, 200, 30)[:, None, None]
    soft = np.zeros((n, 3), np.float32)
    soft[np.arange(n), cls] = 0.9
    soft[:, 2] = 0.1  # "not a nucleus" last
    y = np.full(n, NUCLEUS)
    cfg = {"classes": ["a", "b"], "patch_px": 16, "mpp": 0.5, "width": 8}
    kw = dict(epochs=6, batch=32, lr=5e-3, log=lambda *_: None)
    x = torch.from_numpy(patches).permute(0, 3, 1, 2).float() / 255
    flipped = soft[:, [1, 0, 2]]  # a teacher with the opposite opinion; same seed, same start
    for teach, want in ((soft, cls), (flipped, 1 - cls)):
        taught = fit_typer(patches, y, cfg, soft=teach, soft_weight=1.0, **kw)
        with torch.inference_mode():
            assert (taught(x)[:, :2].argmax(1).numpy() == want).mean() > 0.9


def _with_typer(cfg_extra=None, seed=0):
    model, meta = load_checkpoint(None)
    cfg = {"classes": CLASSES, "patch_px": 40, "mpp": 0.55, "width": 8, "combine": "typer",
           "reject_threshold": None, **(cfg_extra or {})}
    torch.manual_seed(seed)
    model.arch = {**model.arch, "patch_typer": cfg}
    model.patch_typer = PatchTyper(cfg).eval()
    return model, meta


def test_segmenter_types_with_the_typer_and_rejects_by_its_threshold(tmp_path):
    from pipeline.model.segmenter import Segmenter, load_model
    from pipeline.model.typehead import centroids_xy

    # a synthetic tile with dark round nuclei the shipped network finds
    yy, xx = np.mgrid[:192, :192]
    tile = np.full((192, 192, 3), (235, 200, 225), np.uint8)
    for cy, cx in [(40, 40), (40, 120), (120, 60), (150, 150), (100, 100)]:
        tile[(yy - cy) ** 2 + (xx - cx) ** 2 < 64] = (90, 40, 130)
    model, meta = _with_typer()
    seg = Segmenter(model, meta, device="cpu", engine="torch")
    assert seg.patch_typer is not None and seg.class_names == CLASSES
    lab, sc, probs = seg.segment_batch(tile[None])[0]
    k = int(lab.max())
    assert k >= 4 and probs.shape == (k, 4)
    want, _ = seg.patch_typer.predict(tile, centroids_xy(lab), seg.mpp)
    np.testing.assert_allclose(probs, want, atol=1e-5)  # "typer": the typer's probabilities
    # saved and loaded: the same outputs (the typer is part of the checkpoint)
    path = tmp_path / "q.pt"
    save_checkpoint(path, model, meta)
    again = load_model(path, device="cpu", engine="torch").segment_batch(tile[None])[0]
    np.testing.assert_array_equal(again[0], lab)
    np.testing.assert_allclose(again[2], probs, atol=1e-5)
    # a reject threshold of 0 drops every instance, 1 none
    m0, meta0 = _with_typer({"reject_threshold": 0.0})
    assert int(Segmenter(m0, meta0, device="cpu", engine="torch").segment_batch(tile[None])[0][0].max()) == 0
    m1, meta1 = _with_typer({"reject_threshold": 1.0})
    assert int(Segmenter(m1, meta1, device="cpu", engine="torch").segment_batch(tile[None])[0][0].max()) == k
    # "mean": the mean of the head's and the typer's
    mm, metam = _with_typer({"combine": "mean"})
    segm = Segmenter(mm, metam, device="cpu", engine="torch")
    lab_m, _, probs_m = segm.segment_batch(tile[None])[0]
    np.testing.assert_array_equal(lab_m, lab)
    assert not np.allclose(probs_m, probs, atol=1e-3)
    np.testing.assert_allclose(probs_m.sum(1), 1, atol=1e-5)
    # without a type head the typer alone types
    mt, metat = _with_typer()
    mt.arch = {k2: v for k2, v in mt.arch.items() if k2 != "type_head"}
    mt.type_head = None
    segt = Segmenter(mt, metat, device="cpu", engine="torch")
    lab_t, _, probs_t = segt.segment_batch(tile[None])[0]
    np.testing.assert_allclose(probs_t, probs, atol=1e-5)


def test_named_models_resolve(tmp_path, monkeypatch):
    assert resolve_weights(None) == NAMED_WEIGHTS["default"] == resolve_weights("default")
    assert resolve_weights("quality") == NAMED_WEIGHTS["quality"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quality").write_bytes(b"")  # a file of that name here wins
    assert resolve_weights("quality").name == "quality" and not resolve_weights("quality").is_absolute()


# --- the shipped models' typers ---------------------------------------------------------------------
# measured on held-out CRCHisto img1 + img7 (engine torch), detection F1 / weighted type F1: the lite
# network without typer 0.718 / 0.534, quality 0.728 / 0.552; the default with its small typer lies
# between (all 16 held-out tiles: benchmarks/results/quality_model.json)
QUALITY_WEIGHTED_F1_FLOOR = 0.53
QUALITY_DETECTION_F1_FLOOR = 0.70


def test_shipped_typers_type_and_detect_better_than_the_head_alone_on_held_out_tiles():
    from pipeline.data.classes import ClassVocabulary, read_point_csv
    from pipeline.data.readers import read_image
    from pipeline.metrics import aggregate_point_counts, point_counts, point_scores
    from pipeline.model import load_model
    from pipeline.model.typehead import centroids_xy
    from pipeline.training.typehead import CRCHISTO_MPP, CRCHISTO_VAL_TILES, POINT_RADIUS_UM

    if not NAMED_WEIGHTS["quality"].exists():
        pytest.fail(f"{NAMED_WEIGHTS['quality']}: the shipped quality model is missing")
    vocab = ClassVocabulary.crchisto()
    scores = {}
    for name in ("lite_no_typer", "default", "quality"):
        seg = load_model("default" if name == "lite_no_typer" else name, device="cpu", engine="torch")
        assert seg.patch_typer is not None, name
        if name == "lite_no_typer":
            seg.patch_typer = None
        rows = []
        for tile in ("img1", "img7"):
            assert tile in CRCHISTO_VAL_TILES
            img = read_image(shared_file(f"nuclei/crchisto/images/{tile}.png"))
            pts = read_point_csv(shared_file(f"nuclei/crchisto/points/{tile}.csv"))
            lab, _, probs = seg.segment(img, CRCHISTO_MPP)
            rows.append(point_counts(pts.xy_px, centroids_xy(lab), POINT_RADIUS_UM / CRCHISTO_MPP,
                                     pts.encode(vocab), probs.argmax(1), 4))
        scores[name] = point_scores(aggregate_point_counts(rows))
    q, d, n = scores["quality"], scores["default"], scores["lite_no_typer"]
    assert q["f1"] >= QUALITY_DETECTION_F1_FLOOR, q["f1"]
    assert q["weighted_f1"] >= QUALITY_WEIGHTED_F1_FLOOR, q["weighted_f1"]
    assert q["weighted_f1"] > n["weighted_f1"] + 0.005, (q["weighted_f1"], n["weighted_f1"])
    assert q["f1"] > n["f1"] and d["f1"] > n["f1"], (q["f1"], d["f1"], n["f1"])
    assert d["weighted_f1"] > n["weighted_f1"], (d["weighted_f1"], n["weighted_f1"])


def test_openvino_runner_matches_torch():
    from pipeline.model.engine import available

    typer = PatchTyper({"classes": CLASSES, "width": 8}).eval()
    img = _image(200, 240, seed=5)
    cen = np.random.default_rng(2).uniform(0, 200, (70, 2))  # 70 patches: one padded chunk of 128
    want = typer.predict(img, cen, 0.5)
    assert typer.use_engine("torch") == "torch/fp32"
    if not available("openvino"):
        pytest.skip("OpenVINO is not installed")
    name = typer.use_engine("auto")
    assert name.startswith("openvino/"), name
    got = typer.predict(img, cen, 0.5)
    assert got[0].shape == (70, 4) and got[1].shape == (70,)
    np.testing.assert_allclose(got[0], want[0], atol=0.03)
    np.testing.assert_allclose(got[1], want[1], atol=0.03)
    assert typer.use_engine("torch") == "torch/fp32" and typer._runner is None


@pytest.mark.parametrize("sampler", ["bilinear", "crop"])
def test_predict_samples_at_the_typers_physical_scale(sampler):
    # the same tissue at 0.55 and, upsampled 2x, at 0.275 µm/px gives (nearly) the same patches
    typer = PatchTyper({"classes": CLASSES, "width": 8, "mpp": 0.55, "sampler": sampler}).eval()
    rng = np.random.default_rng(4)
    small = np.repeat(np.repeat(rng.integers(0, 256, (30, 30, 3)).astype(np.uint8), 4, 0), 4, 1)  # smooth-ish
    big = np.repeat(np.repeat(small, 2, 0), 2, 1)
    cen = np.array([[40.0, 50.0], [70.0, 60.0]])
    a = typer.predict(small, cen, 0.55)
    b = typer.predict(big, cen * 2 + 0.5, 0.275)
    wrong = typer.predict(big, cen * 2 + 0.5, 0.55)  # told the wrong µm/px: other patches
    np.testing.assert_allclose(a[0], b[0], atol=0.02)
    assert np.abs(wrong[0] - a[0]).max() > np.abs(b[0] - a[0]).max()


def test_new_classes_drop_the_typer_and_mismatched_classes_are_refused():
    from pipeline.errors import ModelError
    from pipeline.model.segmenter import Segmenter
    from pipeline.model.typehead import TypeHead
    from pipeline.training.typehead import with_type_head

    model, meta = _with_typer()
    head = TypeHead({**model.arch["type_head"], "classes": ["Gland cell", "Stroma cell"], "stage2": None})
    new = with_type_head(model, head)
    assert new.patch_typer is None and "patch_typer" not in new.arch
    assert model.patch_typer is not None  # the caller's model is untouched
    kept = with_type_head(model, model.type_head)  # same classes: the typer stays
    assert kept.patch_typer is not None
    model.type_head = head
    with pytest.raises(ModelError, match="patch typer's classes"):
        Segmenter(model, meta, device="cpu", engine="torch")


def test_cli_runs_the_quality_model_by_name(tmp_path):
    import csv
    import subprocess
    import sys

    tile = shared_file("nuclei/crchisto/images/img1.png")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], capture_output=True, text=True)

    rows = {}
    for tag, name, extra in (("all", "quality", ["--reject-threshold", "1"]), ("quality", "quality", [])):
        r = cli("--quiet", "predict", tile, "--mpp", "0.55", "--model", name, "-o", tmp_path / f"{tag}.tif", *extra)
        assert r.returncode == 0, r.stderr
        with open(tmp_path / f"{tag}.nuclei.csv", newline="") as fh:
            rows[tag] = list(csv.DictReader(fh))
        assert list(rows[tag][0])[5:] == ["class"] + [f"p_{c}" for c in CLASSES] + ["not_nucleus_prob"]
    assert 0 < len(rows["quality"]) < len(rows["all"])  # the typer's rejection removes some
    p = {tag: np.array([float(r["not_nucleus_prob"]) for r in rows[tag]]) for tag in rows}
    assert p["quality"].max() <= 0.7 < p["all"].max()  # the kept ones' probability, at either threshold
    r = cli("--quiet", "predict", tile, "--mpp", "0.55", "--model", "qualty", "-o", tmp_path / "x.tif")
    assert r.returncode != 0 and "default, quality" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# measured (default engine): in the CMU-1 keratin / hair-shaft negative regions (64 µm margin) the
# lite network alone leaves 317 instances mostly inside the polygons, the default with its typer 36;
# on the fully annotated validation tiles it removes 0-4 instances per tile (of 200-500)
def test_default_typer_removes_the_keratin_detections_and_keeps_real_nuclei():
    from pathlib import Path

    from pipeline.data.datasets import builtin_samples, split_samples
    from pipeline.data.regions import read_negative_regions
    from pipeline.model import load_model

    neg = Path(__file__).resolve().parents[1] / "pipeline" / "data" / "negatives" / "cmu1_negatives.geojson"
    data_root = shared_file("slides/CMU-1-Small-Region.svs").parents[1]  # fails in CI when missing
    (reg,) = read_negative_regions(neg, data_root, 64.0)
    (val,) = [s for s in split_samples(builtin_samples(data_root / "nuclei"))[1] if s.name.startswith("TCGA-21-5784")]
    img, _ = val.load()
    counts = {}
    for name in ("lite_no_typer", "default"):
        seg = load_model("default", device="cpu")
        if name == "lite_no_typer":
            seg.patch_typer = None
        lab = seg.segment(reg["image"], reg["mpp"])[0]
        k = int(lab.max())
        px = np.bincount(lab.ravel(), minlength=k + 1)[1:]
        ins = np.bincount(lab.ravel(), weights=reg["mask"].ravel(), minlength=k + 1)[1:]
        counts[name] = (int((ins > 0.5 * px).sum()), int(seg.segment(img, val.mpp)[0].max()))
    (n_in, n_val), (d_in, d_val) = counts["lite_no_typer"], counts["default"]
    assert n_in >= 150 and n_val >= 200, counts
    assert d_in <= 0.3 * n_in, counts  # most keratin / hair-shaft detections removed
    assert d_val >= 0.97 * n_val, counts  # real nuclei (a densely packed lung tile) kept


def test_reject_threshold_override_reaches_every_part_that_rejects():
    from pipeline.model.segmenter import Segmenter

    model, meta = _with_typer({"reject_threshold": 0.7})
    model.type_head.cfg = {**model.type_head.cfg, "reject_threshold": 0.9}  # a head that rejects too
    seg = Segmenter(model, meta, device="cpu", engine="torch")
    assert seg.reject_threshold == pytest.approx(0.7)
    seg.set_reject_threshold(1.0)  # "keep all" must hold for both
    assert seg.patch_typer.cfg["reject_threshold"] == 1.0 and seg.type_head.cfg["reject_threshold"] == 1.0
    model, meta = _with_typer()  # nothing rejects: the typer gets it, the head's reject output stays off
    seg = Segmenter(model, meta, device="cpu", engine="torch")
    assert seg.reject_threshold is None
    seg.set_reject_threshold(0.5)
    assert seg.reject_threshold == 0.5 and seg.type_head.cfg.get("reject_threshold") is None


def test_reject_threshold_override_from_the_cli_and_config(tmp_path):
    """``--reject-threshold 1`` keeps what the default's typer removes (``predict``); for a model that
    rejects, the chunk identity that resume compares does not depend on it (the whole-slide export
    applies it: tests/test_rejected.py); an out-of-range value is one config error."""
    import subprocess
    import sys

    from pipeline.config import SegmentConfig, with_overrides
    from pipeline.errors import ConfigError
    from pipeline.infer import resolve_model

    tile = shared_file("nuclei/crchisto/images/img13.png")  # fat and stroma: the typer removes some
    counts = {}
    for tag, extra in (("default", []), ("all", ["--reject-threshold", "1"])):
        r = subprocess.run([sys.executable, "-m", "pipeline.cli", "--quiet", "predict", str(tile), "--mpp", "0.55",
                            "-o", str(tmp_path / f"{tag}.tif"), *extra], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        counts[tag] = len((tmp_path / f"{tag}.nuclei.csv").read_text().splitlines()) - 1
    assert 0 < counts["default"] < counts["all"], counts
    shipped = resolve_model(None, device="cpu", refine=False, store_mpp=0.5)
    keep_all = resolve_model(None, device="cpu", refine=False, store_mpp=0.5, reject_threshold=1.0)
    assert shipped.info["reject_threshold"] == pytest.approx(0.7) and keep_all.info == shipped.info
    with pytest.raises(ConfigError, match="reject_threshold"):
        with_overrides(SegmentConfig(), reject_threshold=-0.1)
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "predict", str(tile), "--mpp", "0.55",
                        "-o", str(tmp_path / "x.tif"), "--reject-threshold", "2"], capture_output=True, text=True)
    assert r.returncode != 0 and "reject_threshold" in r.stderr and len(r.stderr.strip().splitlines()) == 1
