"""Point-based scoring (pipeline.metrics.match_points / point_counts / point_scores) and
``cellsam evaluate --points``: hand-computed cases, ties, empty inputs, the radius edge, and a
brute-force check of the matching."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from conftest import shared_file
from pipeline import metrics
from pipeline.errors import InputError


def _scores(gt, pred, r, gc=None, pc=None, k=0):
    c = metrics.point_counts(np.asarray(gt, float), np.asarray(pred, float), r, gc, pc, k)
    return c, metrics.point_scores(c)


# --- matching ------------------------------------------------------------------------------


def test_detection_hand_computed():
    gt = [(0, 0), (10, 0), (20, 0)]
    pred = [(1, 0), (10, 5), (50, 50)]
    c, s = _scores(gt, pred, 6.0)
    assert (c["tp"], c["fp"], c["fn"], c["n_true"], c["n_pred"]) == (2, 1, 1, 3, 3)
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 / 3)
    assert s["mean_dist_px"] == pytest.approx((1 + 5) / 2)
    g, p, d = metrics.match_points(gt, pred, 6.0)
    assert g.tolist() == [0, 1] and p.tolist() == [0, 1] and d.tolist() == pytest.approx([1, 5])


def test_radius_edge_is_inclusive():
    gt, pred = [(0.0, 0.0)], [(3.0, 4.0)]  # distance exactly 5
    assert metrics.point_counts(gt, pred, 5.0)["tp"] == 1
    assert metrics.point_counts(gt, pred, 4.999)["tp"] == 0
    c = metrics.point_counts(gt, pred, 4.999)
    assert (c["fp"], c["fn"]) == (1, 1)


def test_one_to_one_beats_greedy_nearest_pair():
    # greedy nearest pair takes P-B (2.5) first and leaves A and Q unmatched (one match);
    # the optimal matching pairs P-A (3.5) and Q-B (3.0)
    gt = [(0, 0), (6, 0)]  # A, B
    pred = [(3.5, 0), (9, 0)]  # P, Q
    g, p, d = metrics.match_points(gt, pred, 4.0)
    assert list(zip(g.tolist(), p.tolist())) == [(0, 0), (1, 1)]
    assert d.tolist() == pytest.approx([3.5, 3.0])


def test_minimum_total_distance_among_maximum_matchings():
    # both assignments match 2 pairs; the chosen one has the smaller total distance
    gt = [(0, 0), (4, 0)]
    pred = [(1, 0), (5, 0)]
    g, p, d = metrics.match_points(gt, pred, 10.0)
    assert list(zip(g.tolist(), p.tolist())) == [(0, 0), (1, 1)] and d.sum() == pytest.approx(2.0)


def test_ties_are_counted_once_and_deterministic():
    # one point, two predictions at the same distance: one match, one false positive
    gt = [(0, 0)]
    pred = [(2, 0), (-2, 0)]
    c, s = _scores(gt, pred, 3.0)
    assert (c["tp"], c["fp"], c["fn"]) == (1, 1, 0)
    first = metrics.match_points(gt, pred, 3.0)
    again = metrics.match_points(gt, pred, 3.0)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    # two points equidistant from one prediction
    c, _ = _scores([(0, 0), (4, 0)], [(2, 0)], 3.0)
    assert (c["tp"], c["fp"], c["fn"]) == (1, 0, 1)
    # coincident duplicates: each prediction matched at most once
    c, _ = _scores([(5, 5), (5, 5)], [(5, 5), (5, 5), (5, 5)], 1.0)
    assert (c["tp"], c["fp"], c["fn"]) == (2, 1, 0)


def test_empty_inputs():
    none = np.zeros((0, 2))
    c, s = _scores(none, none, 6.0)
    assert (c["tp"], c["fp"], c["fn"]) == (0, 0, 0) and s["f1"] == s["precision"] == s["recall"] == 1.0
    c, s = _scores(none, [(1, 1), (2, 2)], 6.0)
    assert (c["tp"], c["fp"], c["fn"]) == (0, 2, 0) and s["precision"] == 0.0 and s["f1"] == 0.0
    c, s = _scores([(1, 1)], none, 6.0)
    assert (c["tp"], c["fp"], c["fn"]) == (0, 0, 1) and s["recall"] == 0.0 and s["f1"] == 0.0
    # far apart: nothing within the radius
    c, s = _scores([(0, 0)], [(100, 100)], 6.0)
    assert (c["tp"], c["fp"], c["fn"]) == (0, 1, 1) and s["f1"] == 0.0
    # classes with empty arrays
    c, s = _scores(none, none, 6.0, [], [], 2)
    assert s["weighted_f1"] == 1.0 and c["confusion"].shape == (3, 3)


def _brute_force(gt, pred, r):
    """Max #pairs, then min total distance, over all injective assignments (tiny inputs only)."""
    gt, pred = np.asarray(gt, float), np.asarray(pred, float)
    d = np.linalg.norm(gt[:, None] - pred[None], axis=2)
    best = (0, 0.0)
    n, m = len(gt), len(pred)
    for k in range(min(n, m), 0, -1):
        found = None
        for gs in itertools.combinations(range(n), k):
            for ps in itertools.permutations(range(m), k):
                dd = d[list(gs), list(ps)]
                if (dd <= r).all() and (found is None or dd.sum() < found):
                    found = dd.sum()
        if found is not None:
            return (k, found)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_matching_is_optimal_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    gt = rng.uniform(0, 12, size=(rng.integers(1, 6), 2))
    pred = rng.uniform(0, 12, size=(rng.integers(1, 6), 2))
    g, p, d = metrics.match_points(gt, pred, 4.0)
    assert len(set(g.tolist())) == g.size and len(set(p.tolist())) == p.size
    assert (d <= 4.0).all()
    assert np.allclose(d, np.linalg.norm(gt[g] - pred[p], axis=1))
    k, total = _brute_force(gt, pred, 4.0)
    assert g.size == k and d.sum() == pytest.approx(total)


def test_many_points_components():
    """A larger random scene: cardinality equals scipy's maximum bipartite matching."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import maximum_bipartite_matching

    rng = np.random.default_rng(3)
    gt = rng.uniform(0, 500, size=(400, 2))
    pred = np.concatenate([gt[:300] + rng.normal(0, 3, size=(300, 2)), rng.uniform(0, 500, size=(150, 2))])
    g, p, d = metrics.match_points(gt, pred, 6.0)
    dist = np.linalg.norm(gt[:, None] - pred[None], axis=2)
    m = maximum_bipartite_matching(csr_matrix(dist <= 6.0), perm_type="column")
    assert g.size == int((m >= 0).sum())


def test_bad_inputs():
    with pytest.raises(InputError, match="shape"):
        metrics.match_points(np.zeros((3, 3)), np.zeros((1, 2)), 6)
    with pytest.raises(InputError, match="radius"):
        metrics.match_points([(0, 0)], [(0, 0)], 0)
    with pytest.raises(InputError, match="non-finite"):
        metrics.match_points([(np.nan, 0)], [(0, 0)], 1)
    with pytest.raises(InputError, match="classes must be in"):
        metrics.point_counts([(0, 0)], [(0, 0)], 1, [2], [0], 2)
    with pytest.raises(InputError, match="integer array"):
        metrics.point_counts([(0, 0)], [(0, 0)], 1, [0.5], [0], 2)


# --- classes -------------------------------------------------------------------------------

# two classes a=0, b=1; -1 = unlabelled point / unclassified prediction
GT = [(0, 0), (20, 0), (40, 0), (60, 0), (80, 0), (120, 0)]
GC = [0, 0, 1, -1, 1, 1]
PRED = [(1, 0), (21, 0), (41, 0), (61, 0), (100, 0), (121, 0)]
PC = [0, 1, 1, 0, 0, 1]


def test_class_scores_hand_computed():
    c, s = _scores(GT, PRED, 6.0, GC, PC, 2)
    # detection: g0..g3 and g5 matched; p4 unmatched (FP), g4 unmatched (FN)
    assert (c["tp"], c["fp"], c["fn"], c["n_true_unlabelled"]) == (5, 1, 1, 1)
    assert s["f1"] == pytest.approx(10 / 12)
    # rows GT a, b, unlabelled; cols pred a, b, unclassified
    assert c["confusion"].tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert c["unmatched_true"].tolist() == [0, 1, 0] and c["unmatched_pred"].tolist() == [1, 0, 0]
    # a: tp g0p0; fp p4 (unmatched); fn g1 (matched to a b). p3 on the unlabelled point counts nowhere
    # b: tp g2p2, g5p5; fp p1 (on an a point); fn g4 (unmatched)
    assert s["class_tp"].tolist() == [1, 2] and s["class_fp"].tolist() == [1, 1] and s["class_fn"].tolist() == [1, 1]
    assert s["class_support"].tolist() == [2, 3]
    assert s["class_f1"].tolist() == pytest.approx([0.5, 4 / 6])
    assert s["class_precision"].tolist() == pytest.approx([0.5, 2 / 3])
    assert s["weighted_f1"] == pytest.approx((2 * 0.5 + 3 * 4 / 6) / 5)
    assert s["macro_f1"] == pytest.approx((0.5 + 4 / 6) / 2)
    assert s["type_accuracy"] == pytest.approx(3 / 4)


def test_unclassified_prediction_is_a_class_miss():
    c, s = _scores([(0, 0)], [(0, 1)], 6.0, [0], [-1], 2)
    assert c["tp"] == 1 and c["confusion"][0, 2] == 1
    assert s["class_fn"].tolist() == [1, 0] and s["class_fp"].tolist() == [0, 0]
    assert s["class_f1"].tolist() == [0.0, 1.0] and s["weighted_f1"] == 0.0


def test_aggregate_pools_counts():
    a = metrics.point_counts(GT, PRED, 6.0, GC, PC, 2)
    b = metrics.point_counts([(0, 0)], [(0, 1), (30, 30)], 6.0, [1], [1, 0], 2)
    pooled = metrics.aggregate_point_counts([a, b])
    assert pooled["n_images"] == 2 and (pooled["tp"], pooled["fp"], pooled["fn"]) == (6, 2, 1)
    assert pooled["confusion"].tolist() == [[1, 1, 0], [0, 3, 0], [1, 0, 0]]
    s = metrics.point_scores(pooled)
    assert s["f1"] == pytest.approx(12 / 15)
    # b: b-tp 1, a-fp 1 -> class a tp1 fp2 fn1, class b tp3 fp1 fn1
    assert s["class_f1"].tolist() == pytest.approx([2 / 5, 6 / 8])
    with pytest.raises(InputError, match="different class sets"):
        metrics.aggregate_point_counts([a, metrics.point_counts(GT, PRED, 6.0)])
    empty = metrics.aggregate_point_counts([])
    assert empty["n_images"] == 0 and metrics.point_scores(empty)["f1"] == 1.0


# --- cellsam evaluate --points ---------------------------------------------------------------


def _disk_labels(shape, centres, r=3):
    lab = np.zeros(shape, dtype=np.uint32)
    yy, xx = np.indices(shape)
    for i, (x, y) in enumerate(centres):
        lab[(xx - x) ** 2 + (yy - y) ** 2 <= r * r] = i + 1
    return lab


def _write_points(path, rows):
    path.write_text("x_px,y_px,class\n" + "".join(f"{x},{y},{c}\n" for x, y, c in rows))


def test_cli_points_detection_from_label_centroids(tmp_path, capsys):
    import tifffile

    from pipeline.cli import main

    (tmp_path / "pred").mkdir()
    (tmp_path / "pts").mkdir()
    # centroids at (10,10), (30,10), (50,40); points: two within 6 px, one 7 px away, one missed
    tifffile.imwrite(tmp_path / "pred" / "t.tif", _disk_labels((64, 64), [(10, 10), (30, 10), (50, 40)]))
    _write_points(tmp_path / "pts" / "t.csv", [(12, 10, "epithelial"), (30, 15.5, "unlabelled"),
                                                (57, 40, "fibroblast"), (5, 60, "others")])
    out = tmp_path / "r.json"
    argv = ["--quiet", "evaluate", "--pred", str(tmp_path / "pred"), "--points", str(tmp_path / "pts"),
            "--mpp", "0.5", "--radius-um", "3", "-o", str(out)]
    assert main(argv) == 0  # radius 6 px
    doc = json.loads(out.read_text())
    r = doc["overall"]
    assert (r["tp"], r["fp"], r["fn"], r["n_true_unlabelled"]) == (2, 1, 2, 1)
    assert doc["radius_px"] == pytest.approx(6.0) and doc["classes"] is None and doc["mode"] == "points"
    assert "per_class" not in r and doc["per_image"]["t"]["pred"] == "t.tif"
    assert "pooled" in capsys.readouterr().out
    first = out.read_bytes()
    assert main(argv) == 0 and out.read_bytes() == first  # deterministic bytes
    # a larger radius takes the 7 px point too
    assert main([*argv[:-6], "--mpp", "0.5", "--radius-um", "3.6", "-o", str(out)]) == 0
    assert json.loads(out.read_text())["overall"]["tp"] == 3


def test_cli_points_with_predicted_classes(tmp_path, capsys):
    import tifffile

    from pipeline.cli import main

    (tmp_path / "pred").mkdir()
    (tmp_path / "pts").mkdir()
    tifffile.imwrite(tmp_path / "pred" / "t.tif", _disk_labels((64, 64), [(10, 10), (30, 10), (50, 40)]))
    (tmp_path / "pred" / "t.nuclei.csv").write_text(
        "label,centroid_x_px,centroid_y_px,area_px,score,class,p_Epithelial\n"
        "1,10,10,29,0.9,Epithelial,0.9\n2,30,10,29,0.8,Fibroblast,0.1\n3,50,40,29,0.7,Other,0.2\n")
    _write_points(tmp_path / "pts" / "t.csv", [(11, 10, "epithelial"), (31, 10, "inflammatory"),
                                                (50, 41, "others"), (5, 60, "fibroblast")])
    out = tmp_path / "r.json"
    argv = ["--quiet", "evaluate", "--pred", str(tmp_path / "pred"), "--points", str(tmp_path / "pts"),
            "--mpp", "0.55", "-o", str(out)]
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["classes"] == ["Epithelial", "Inflammatory", "Fibroblast", "Other"]
    o = doc["overall"]
    assert (o["tp"], o["fp"], o["fn"]) == (3, 0, 1)
    pc = o["per_class"]
    assert pc["Epithelial"]["f1"] == 1.0 and pc["Other"]["f1"] == 1.0
    assert (pc["Inflammatory"]["fn"], pc["Inflammatory"]["f1"]) == (1, 0.0)
    assert (pc["Fibroblast"]["fp"], pc["Fibroblast"]["fn"], pc["Fibroblast"]["f1"]) == (1, 1, 0.0)
    assert o["weighted_f1"] == pytest.approx(0.5)  # supports 1,1,1,1: (1 + 0 + 0 + 1) / 4
    assert o["confusion"]["counts"][1] == [0, 0, 1, 0, 0]  # inflammatory point matched as Fibroblast
    # classification alone on the 3 matched typed pairs (E->E, I->F, O->O): (1 + 0 + 1) / 3
    mc = o["matched_classification"]
    assert mc["pairs"] == 3 and mc["weighted_f1"] == pytest.approx(2 / 3, abs=1e-4)
    text = capsys.readouterr().out
    assert "confusion" in text and "weighted F1 0.5000" in text
    assert "classification alone on the 3 matched typed pairs: weighted F1 0.6667" in text
    # a fixed vocabulary without Other: the file and the class are named
    rc = main([*argv, "--classes", "Epithelial,Inflammatory,Fibroblast"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert "t.csv: unknown class 'others'" in err


@pytest.mark.parametrize(
    "case,pattern",
    [("no_mpp", "needs --mpp"), ("unpaired", "no point CSV with stem 'b'"), ("bad_csv", "lacks column"),
     ("mixed", "without classes next to predictions with classes"), ("baseline", "works with --truth")],
)
def test_cli_points_errors_one_line(tmp_path, capsys, case, pattern):
    import tifffile

    from pipeline.cli import main

    (tmp_path / "pred").mkdir()
    (tmp_path / "pts").mkdir()
    for stem in ("a", "b"):
        tifffile.imwrite(tmp_path / "pred" / f"{stem}.tif", _disk_labels((32, 32), [(10, 10)]))
        _write_points(tmp_path / "pts" / f"{stem}.csv", [(10, 10, "epithelial")])
    extra = ["--mpp", "0.5"]
    if case == "no_mpp":
        extra = []
    elif case == "unpaired":
        (tmp_path / "pts" / "b.csv").unlink()
    elif case == "bad_csv":
        (tmp_path / "pts" / "a.csv").write_text("x,y\n1,2\n")
    elif case == "mixed":
        (tmp_path / "pred" / "a.nuclei.csv").write_text("label,centroid_x_px,centroid_y_px,class\n1,10,10,Epithelial\n")
    elif case == "baseline":
        extra += ["--baseline", str(tmp_path)]
    rc = main(["evaluate", "--pred", str(tmp_path / "pred"), "--points", str(tmp_path / "pts"), *extra])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and err.startswith("cellsam: error:") and "\n" not in err and "Traceback" not in err
    assert pattern in err


def test_cli_points_on_crchisto_truth_against_itself(tmp_path):
    """Real CRCHisto CSVs: ground truth as its own prediction (rows -> nuclei.csv) scores 1.0."""
    from pipeline.cli import main
    from pipeline.data.classes import read_point_csv

    (tmp_path / "pred").mkdir()
    (tmp_path / "pts").mkdir()
    import tifffile

    n_typed = 0
    for stem in ("img1", "img10"):
        src = shared_file(f"nuclei/crchisto/points/{stem}.csv")
        (tmp_path / "pts" / f"{stem}.csv").write_bytes(src.read_bytes())
        pts = read_point_csv(src)
        rows = [(i + 1, x, y, c or "Nucleus") for i, ((x, y), c) in enumerate(zip(pts.xy_px, pts.class_name))]
        # the unlabelled points get some class; they count for detection only
        rows = [(lab, x, y, "epithelial" if c == "Nucleus" else c) for lab, x, y, c in rows]
        n_typed += sum(c is not None for c in pts.class_name)
        (tmp_path / "pred" / f"{stem}.nuclei.csv").write_text(
            "label,centroid_x_px,centroid_y_px,class\n" + "".join(f"{a},{x},{y},{c}\n" for a, x, y, c in rows))
        tifffile.imwrite(tmp_path / "pred" / f"{stem}.tif", np.zeros((500, 500), np.uint32))
    out = tmp_path / "r.json"
    assert main(["--quiet", "evaluate", "--pred", str(tmp_path / "pred"), "--points", str(tmp_path / "pts"),
                 "--mpp", "0.55", "-o", str(out)]) == 0
    o = json.loads(out.read_text())["overall"]
    assert o["f1"] == 1.0 and o["weighted_f1"] == 1.0 and o["fp"] == 0
    assert sum(c["support"] for c in o["per_class"].values()) == n_typed
    assert o["confusion"]["counts"][-1][0] == o["n_true_unlabelled"] > 0  # unlabelled -> predicted epithelial


def test_predict_then_evaluate_points_on_crchisto(tmp_path, capsys):
    """End to end with the shipped model: ``cellsam predict`` on two CRCHisto tiles, then
    ``evaluate --points``. The shipped model (not trained on CRCHisto) reaches detection F1 ~0.77
    on these two tiles; the bound leaves room for model changes but catches a broken frame
    (x/y swapped, 1 px offsets do not matter at 6 px, a scale error does)."""
    from pipeline.cli import main

    (tmp_path / "pts").mkdir()
    images = []
    for stem in ("img10", "img17"):
        images.append(str(shared_file(f"nuclei/crchisto/images/{stem}.png")))
        (tmp_path / "pts" / f"{stem}.csv").write_bytes(shared_file(f"nuclei/crchisto/points/{stem}.csv").read_bytes())
    assert main(["--quiet", "predict", *images, "-o", str(tmp_path / "pred"), "--mpp", "0.55", "--device", "cpu"]) == 0
    for name in list((tmp_path / "pred").glob("*.nuclei.csv")):
        name.unlink()  # score the label images' centroids (the class table, if any, is tested above)
    out = tmp_path / "r.json"
    assert main(["--quiet", "evaluate", "--pred", str(tmp_path / "pred"), "--points", str(tmp_path / "pts"),
                 "--mpp", "0.55", "-o", str(out)]) == 0
    o = json.loads(out.read_text())["overall"]
    assert o["n_true"] == 700 and o["n_images"] == 2
    assert o["f1"] > 0.65 and o["recall"] > 0.75 and o["mean_dist_px"] < 3.0
    # transposed centres would score far lower: the frame (x = column) is right
    from pipeline.cli.evaluate import label_centroids
    from pipeline.data.classes import read_point_csv
    from pipeline.data.readers import read_labels

    _, xy = label_centroids(read_labels(tmp_path / "pred" / "img10.tif"))
    gt = read_point_csv(tmp_path / "pts" / "img10.csv").xy_px
    right = metrics.point_scores(metrics.point_counts(gt, xy, 6.0))["f1"]
    swapped = metrics.point_scores(metrics.point_counts(gt, xy[:, ::-1], 6.0))["f1"]
    assert right > 0.65 > 0.3 > swapped


def test_matched_classification_hand_case():
    # 2 classes + the unlabelled/unclassified row and column, which are left out
    conf = [[2, 1, 7], [0, 3, 0], [5, 5, 0]]
    r = metrics.matched_classification(conf)
    # class 0: P = 2/2, R = 2/3 -> F1 0.8; class 1: P = 3/4, R = 3/3 -> F1 6/7; support 3 and 3
    assert r["pairs"] == 6
    np.testing.assert_allclose(r["class_f1"], [0.8, 0.8571], atol=1e-4)
    np.testing.assert_allclose(r["weighted_f1"], (0.8 + 6 / 7) / 2, atol=1e-4)
    with pytest.raises(ValueError, match="square"):
        metrics.matched_classification([[1, 2, 3]])
