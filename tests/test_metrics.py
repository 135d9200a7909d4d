"""Tests for pipeline.metrics: hand-computed AJI, PQ against stardist.matching, edge cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from conftest import shared_file
from pipeline import metrics
from pipeline.errors import InputError


def _rects(shape, boxes):
    """Label image with label i+1 painted over box i = (r0, c0, r1, c1); later boxes win."""
    lab = np.zeros(shape, dtype=np.uint32)
    for i, (r0, c0, r1, c1) in enumerate(boxes):
        lab[r0:r1, c0:c1] = i + 1
    return lab


def _random_pair(seed, shape=(64, 80), n=18):
    """A ground truth of random rectangles and a jittered, partly dropped, partly invented copy."""
    rng = np.random.default_rng(seed)
    boxes = []
    for _ in range(n):
        r0, c0 = rng.integers(0, shape[0] - 4), rng.integers(0, shape[1] - 4)
        boxes.append((r0, c0, r0 + rng.integers(3, 14), c0 + rng.integers(3, 14)))
    gt = _rects(shape, boxes)
    pboxes = []
    for r0, c0, r1, c1 in boxes:
        if rng.random() < 0.15:
            continue  # missed nucleus
        dr, dc = rng.integers(-2, 3, size=2)
        pboxes.append((max(r0 + dr, 0), max(c0 + dc, 0), r1 + dr + rng.integers(-1, 2), c1 + dc))
    for _ in range(3):  # invented nuclei
        r0, c0 = rng.integers(0, shape[0] - 4), rng.integers(0, shape[1] - 4)
        pboxes.append((r0, c0, r0 + 5, c0 + 6))
    pred = _rects(shape, pboxes)
    # non-consecutive, shuffled label values must not matter
    perm = np.concatenate([[0], rng.permutation(np.arange(1, len(pboxes) + 1)) * 7 + 100])
    return gt, perm[pred].astype(np.uint32)


def _aji_bruteforce(gt, pred):
    """Reference AJI: explicit loop over GT objects over full-image masks (independent code path)."""
    c = u = 0
    used = set()
    for g in np.unique(gt[gt > 0]):
        gm = gt == g
        best, best_iou, best_i, best_u = None, -1.0, 0, 0
        for p in np.unique(pred[gm & (pred > 0)]):
            pm = pred == p
            i = int(np.sum(gm & pm))
            un = int(np.sum(gm | pm))
            if i / un > best_iou:
                best, best_iou, best_i, best_u = p, i / un, i, un
        if best is None:
            u += int(gm.sum())
        else:
            c += best_i
            u += best_u
            used.add(int(best))
    for p in np.unique(pred[pred > 0]):
        if int(p) not in used:
            u += int(np.sum(pred == p))
    return c / u


# --- AJI, hand computed ------------------------------------------------------------------


def test_aji_reused_prediction():
    # two 2x2 GT nuclei side by side, one 2x4 prediction covering both: each GT picks it
    gt = _rects((4, 6), [(0, 0, 2, 2), (0, 2, 2, 4)])
    pred = _rects((4, 6), [(0, 0, 2, 4)])
    # C = 4 + 4, U = 8 + 8 (the prediction's union counted once per GT that picks it)
    assert metrics.aji(gt, pred) == pytest.approx(8 / 16)
    r = metrics.evaluate_pair(gt, pred)
    assert (r["aji_intersection_px"], r["aji_union_px"]) == (8, 16)
    assert (r["tp"], r["fp"], r["fn"]) == (0, 1, 2)  # IoU exactly 0.5 is not a match (strict >)


def test_aji_unmatched_prediction():
    gt = _rects((8, 8), [(0, 0, 3, 3)])
    pred = np.zeros((8, 8), np.uint16)
    pred[0:3, 0:3] = 5
    pred[5:7, 5:7] = 7  # false positive, 4 px, never picked
    assert metrics.aji(gt, pred) == pytest.approx(9 / 13)


def test_aji_unmatched_gt():
    gt = _rects((8, 8), [(0, 0, 3, 3), (5, 5, 7, 7)])
    pred = _rects((8, 8), [(0, 1, 3, 4)])  # overlaps GT 1 by 6 px, union 12
    # C = 6, U = 12 + 4 (GT 2 overlaps nothing)
    assert metrics.aji(gt, pred) == pytest.approx(6 / 16)


def test_aji_picks_max_iou_and_counts_the_other_overlapping_prediction():
    gt = _rects((3, 8), [(0, 0, 1, 6)])  # 6 px
    pred = _rects((3, 8), [(0, 0, 1, 2), (0, 2, 1, 6)])  # IoU 2/6 and 4/6
    # picks the second: C = 4, U = 6; the first is never picked: U += 2
    assert metrics.aji(gt, pred) == pytest.approx(4 / 8)


@pytest.mark.parametrize("seed", range(5))
def test_aji_matches_bruteforce_on_random_labels(seed):
    gt, pred = _random_pair(seed)
    assert metrics.aji(gt, pred) == pytest.approx(_aji_bruteforce(gt, pred), abs=1e-12)


# --- PQ against stardist.matching ---------------------------------------------------------

# stardist compares float32 IoU with ">=", we use float64 with ">" (unique matching at 0.5):
# the smallest float32 above 0.5 makes both the same on images with unions < 8e6 px
_SD_THRESH = float(np.nextafter(np.float32(0.5), np.float32(1)))


def _check_against_stardist(gt, pred):
    sd = pytest.importorskip("stardist.matching")
    ref = sd.matching(gt, pred, thresh=_SD_THRESH)
    got = metrics.evaluate_pair(gt, pred)
    assert (got["tp"], got["fp"], got["fn"]) == (ref.tp, ref.fp, ref.fn)
    assert (got["n_true"], got["n_pred"]) == (ref.n_true, ref.n_pred)
    assert got["pq"] == pytest.approx(ref.panoptic_quality, abs=1e-6)
    assert got["obj_f1"] == pytest.approx(ref.f1, abs=1e-12)
    assert got["obj_precision"] == pytest.approx(ref.precision, abs=1e-12)
    assert got["obj_recall"] == pytest.approx(ref.recall, abs=1e-12)
    if ref.tp:
        assert got["sq"] == pytest.approx(ref.mean_matched_score, abs=1e-6)
    return got


@pytest.mark.parametrize("seed", range(8))
def test_pq_matches_stardist_on_random_labels(seed):
    gt, pred = _random_pair(seed)
    got = _check_against_stardist(gt, pred)
    assert 0 < got["tp"] < got["n_true"]  # the case exercises matches and misses


def _erode_labels(lab, size=3):
    """Drop every pixel whose size x size neighbourhood holds another label."""
    same = ndi.minimum_filter(lab, size) == ndi.maximum_filter(lab, size)
    return np.where(same, lab, 0).astype(lab.dtype)


def test_pq_matches_stardist_on_real_tile():
    import tifffile

    gt = tifffile.imread(shared_file("nuclei/cpm15/labels/image01.tif"))
    rng = np.random.default_rng(0)
    lut = np.arange(int(gt.max()) + 1, dtype=np.uint32)
    lut[1:] = rng.permutation(lut[1:]) // 2 + 1  # pairs of nuclei merged into one label
    variants = {
        "eroded": _erode_labels(gt, 3),
        "eroded5": _erode_labels(gt, 5),
        "shifted": np.roll(gt, (2, 3), axis=(0, 1)),
        "merged": lut[gt],
    }
    scores = {}
    for name, pred in variants.items():
        scores[name] = _check_against_stardist(gt, pred)["pq"]
    # every variant is a non-trivial comparison; stronger erosion scores lower
    assert all(0 < v < 0.9 for v in scores.values()), scores
    assert scores["eroded"] > scores["eroded5"]


def test_pq_hand_case():
    gt = _rects((10, 10), [(0, 0, 4, 4), (5, 5, 9, 9)])
    pred = _rects((10, 10), [(0, 0, 4, 3), (6, 0, 8, 2)])  # IoU 12/16 with GT 1; one FP; GT 2 missed
    r = metrics.panoptic_quality(gt, pred)
    assert (r["tp"], r["fp"], r["fn"]) == (1, 1, 1)
    assert r["sq"] == pytest.approx(0.75)
    assert r["dq"] == pytest.approx(1 / (1 + 0.5 + 0.5))
    assert r["pq"] == pytest.approx(0.375)


def test_pq_threshold_below_half_refused():
    gt = _rects((4, 4), [(0, 0, 2, 2)])
    with pytest.raises(InputError, match="iou_threshold"):
        metrics.panoptic_quality(gt, gt, iou_threshold=0.3)


# --- pixel metrics -------------------------------------------------------------------------


def test_pixel_scores_hand_case():
    gt = np.zeros((4, 5), np.uint8)
    gt[0, :4] = 1  # 4 px foreground
    pred = np.zeros((4, 5), np.uint8)
    pred[0, 2:5] = 3  # 3 px: 2 TP, 1 FP; 2 FN; 15 TN
    r = metrics.pixel_scores(gt, pred)
    assert r["dice"] == pytest.approx(4 / 7)
    assert r["pixel_accuracy"] == pytest.approx(17 / 20)
    assert r["pixel_precision"] == pytest.approx(2 / 3)
    assert r["pixel_recall"] == pytest.approx(2 / 4)
    assert r["mean_class_accuracy"] == pytest.approx(0.5 * (2 / 4 + 15 / 16))
    assert metrics.dice(gt, pred) == pytest.approx(4 / 7)


# --- edge cases ------------------------------------------------------------------------------


def test_identical_labels_score_one():
    gt, _ = _random_pair(3)
    r = metrics.evaluate_pair(gt, gt.copy())
    for key in metrics.SCORE_KEYS:
        assert r[key] == 1.0, key
    assert r["fp"] == r["fn"] == 0 and r["tp"] == r["n_true"] > 0


def test_empty_prediction_scores_zero_without_nan():
    gt, _ = _random_pair(4)
    r = metrics.evaluate_pair(gt, np.zeros_like(gt))
    for key in ("aji", "pq", "dq", "sq", "obj_precision", "obj_recall", "obj_f1", "dice", "pixel_precision", "pixel_recall"):
        assert r[key] == 0.0, key
    assert 0 < r["pixel_accuracy"] < 1
    assert r["mean_class_accuracy"] == pytest.approx(0.5)  # background fully recalled
    assert all(np.isfinite(v) for v in r.values())


def test_both_empty_scores_one_and_empty_gt_scores_zero():
    z = np.zeros((6, 6), np.uint32)
    r = metrics.evaluate_pair(z, z)
    assert all(r[k] == 1.0 for k in metrics.SCORE_KEYS)
    pred = _rects((6, 6), [(0, 0, 2, 2)])
    r = metrics.evaluate_pair(z, pred)
    assert r["aji"] == r["pq"] == r["obj_precision"] == r["obj_recall"] == r["dice"] == 0.0
    assert r["fp"] == 1 and r["fn"] == 0


def test_bad_inputs_raise_one_line_input_errors():
    a = np.zeros((4, 4), np.uint16)
    with pytest.raises(InputError, match="differ in shape"):
        metrics.evaluate_pair(a, np.zeros((4, 5), np.uint16))
    with pytest.raises(InputError, match="integer dtype"):
        metrics.evaluate_pair(a, a.astype(np.float32))
    with pytest.raises(InputError, match="2-D"):
        metrics.evaluate_pair(a[None], a[None])
    with pytest.raises(InputError, match="negative"):
        metrics.evaluate_pair(a.astype(np.int32) - 1, a.astype(np.int32))


def test_large_sparse_label_values():
    gt = _rects((8, 8), [(0, 0, 3, 3)]) * np.uint32(4_000_000_000)
    pred = _rects((8, 8), [(0, 0, 3, 3)])
    assert metrics.aji(gt, pred) == 1.0


# --- aggregation ---------------------------------------------------------------------------


def test_aggregate_mean_and_pooled():
    a = metrics.evaluate_pair(*_random_pair(0))
    b = metrics.evaluate_pair(*_random_pair(1))
    agg = metrics.aggregate({"a": a, "b": b})
    assert agg["n_images"] == 2
    assert agg["aji"] == pytest.approx((a["aji"] + b["aji"]) / 2)
    pooled = (a["aji_intersection_px"] + b["aji_intersection_px"]) / (a["aji_union_px"] + b["aji_union_px"])
    assert agg["aji_pooled"] == pytest.approx(pooled)
    assert agg["tp"] == a["tp"] + b["tp"]
    tp, fp, fn = agg["tp"], agg["fp"], agg["fn"]
    assert agg["dq_pooled"] == pytest.approx(tp / (tp + 0.5 * fp + 0.5 * fn))
    assert agg == metrics.aggregate([a, b])
    empty = metrics.aggregate([])
    assert empty["n_images"] == 0 and empty["aji"] == 0.0 and empty["aji_pooled"] == 0.0


# --- cellsam evaluate ------------------------------------------------------------------------


def _write_labels(directory, stems_seeds):
    import tifffile

    directory.mkdir(parents=True, exist_ok=True)
    for stem, seed in stems_seeds:
        gt, _ = _random_pair(seed)
        tifffile.imwrite(directory / f"{stem}.tif", gt)


def test_cli_evaluate_identical_dirs(tmp_path, capsys):
    import json

    from pipeline.cli import main

    _write_labels(tmp_path / "pred", [("a", 0), ("b", 1), ("c", 2)])
    out = tmp_path / "res.json"
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "pred"), "-o", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert sorted(doc["per_image"]) == ["a", "b", "c"]
    assert doc["overall"]["aji"] == 1.0 and doc["overall"]["aji_pooled"] == 1.0 and doc["overall"]["pq"] == 1.0
    assert doc["overall"]["n_images"] == 3 and doc["schema_version"] == 1
    table = capsys.readouterr().out
    assert "AJI" in table and "overall 1.0000" in table
    # deterministic bytes, sorted keys
    first = out.read_bytes()
    main(["--quiet", "evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "pred"), "-o", str(out)])
    assert out.read_bytes() == first
    assert list(json.loads(first)) == sorted(json.loads(first))
    assert not list(tmp_path.glob("*.tmp-*"))


def test_cli_evaluate_scores_a_perturbed_prediction(tmp_path, capsys):
    import json

    import tifffile

    from pipeline.cli import main

    (tmp_path / "truth").mkdir()
    (tmp_path / "pred").mkdir()
    gt, pred = _random_pair(5)
    tifffile.imwrite(tmp_path / "truth" / "x.tif", gt)
    tifffile.imwrite(tmp_path / "pred" / "x.tif", pred)
    out = tmp_path / "r.json"
    assert main(["--quiet", "evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth"), "-o", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["per_image"]["x"]["aji"] == pytest.approx(metrics.aji(gt, pred))
    assert doc["per_image"]["x"]["pq"] == pytest.approx(metrics.panoptic_quality(gt, pred)["pq"])


@pytest.mark.parametrize(
    "case,pattern",
    [
        ("unpaired", "no ground truth with stem 'c'"),
        ("missing", "does not exist"),
        ("empty", "no prediction files"),
        ("baseline_no_mpp", "needs --baseline-mpp"),
    ],
)
def test_cli_evaluate_bad_inputs_one_line_error(tmp_path, capsys, case, pattern):
    from pipeline.cli import main

    _write_labels(tmp_path / "pred", [("a", 0), ("b", 1), ("c", 2)])
    _write_labels(tmp_path / "truth", [("a", 0), ("b", 1)])
    pred, truth = tmp_path / "pred", tmp_path / "truth"
    extra = []
    if case == "missing":
        truth = tmp_path / "nope"
    elif case == "empty":
        pred = tmp_path / "empty"
        pred.mkdir()
    elif case == "baseline_no_mpp":
        truth = pred
        extra = ["--baseline", str(tmp_path)]
    rc = main(["evaluate", "--pred", str(pred), "--truth", str(truth), *extra])
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert err.startswith("cellsam: error:") and "\n" not in err and "Traceback" not in err
    assert pattern in err


def test_cli_evaluate_monuseg_xml_truth(tmp_path, capsys):
    """XML ground truth is rasterised at the prediction's shape; its own raster scores 1."""
    import json
    import shutil

    import tifffile

    from pipeline.cli import main
    from pipeline.data.readers import read_monuseg_xml

    stem = "TCGA-21-5784-01Z-00-DX1"
    xml = shared_file(f"nuclei/monuseg2018_train/annotations/{stem}.xml")
    (tmp_path / "truth").mkdir()
    (tmp_path / "pred").mkdir()
    shutil.copy(xml, tmp_path / "truth" / xml.name)
    raster = read_monuseg_xml(xml, (1000, 1000))
    assert raster.max() > 100
    tifffile.imwrite(tmp_path / "pred" / f"{stem}.tif", raster)
    out = tmp_path / "r.json"
    assert main(["--quiet", "evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth"), "-o", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["per_image"][stem]["aji"] == 1.0 and doc["per_image"][stem]["truth"] == xml.name


def test_cli_evaluate_with_baseline(tmp_path, capsys):
    import json

    import tifffile

    from pipeline.cli import main

    for d in ("pred", "truth", "images"):
        (tmp_path / d).mkdir()
    gt = tifffile.imread(shared_file("nuclei/cpm15/labels/image06.tif"))
    shutil_src = shared_file("nuclei/cpm15/images/image06.png")
    (tmp_path / "images" / "image06.png").write_bytes(shutil_src.read_bytes())
    tifffile.imwrite(tmp_path / "truth" / "image06.tif", gt)
    tifffile.imwrite(tmp_path / "pred" / "image06.tif", gt)  # a perfect "prediction"
    out = tmp_path / "r.json"
    args = ["--quiet", "evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth")]
    args += ["--baseline", str(tmp_path / "images"), "--baseline-mpp", "0.5", "-o", str(out)]
    assert main(args) == 0
    doc = json.loads(out.read_text())
    base = doc["baseline"]["overall"]
    assert 0.45 < base["aji"] < 1.0 and base["dice"] > 0.7
    assert doc["comparison"]["aji"]["delta"] == pytest.approx(1.0 - base["aji"])
    assert "classical baseline" in capsys.readouterr().out
