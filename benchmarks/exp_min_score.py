"""Experiment: drop instances whose mean nucleus probability (their score) is low.

    python benchmarks/exp_min_score.py [--model CKPT]   # -> benchmarks/results/min_score.json
    python benchmarks/exp_min_score.py --joint          # -> benchmarks/results/min_score_joint.json
    python benchmarks/exp_min_score.py --variants       # -> benchmarks/results/min_score_variants.json

For each minimum score of ``MIN_SCORE_GRID`` (``PostprocessParams.min_score``; the checkpoint's other
thresholds unchanged), with the default engine:

* validation AJI / PQ / Dice / pixel precision / recall on the fixed 6-tile split;
* detection precision / recall / F1 on the 16 held-out CRCHisto tiles (3.3 µm matching);
* detections of ``CMU-1-Small-Region.svs`` more than half inside the hand-drawn negative regions
  (keratin, hair-shaft layers, debris) and outside them.

``--joint``: validation only, the minimum score searched jointly with the foreground and distance
thresholds (4 x 3 x 6 grid, minimum area 6 µm²), rows sorted by AJI + PQ: does the sequential
search of ``tune_postprocess`` miss a better pair (e.g. a lower foreground threshold, fatter masks,
with a higher minimum score)?

``--variants``: validation only, other per-instance scores as the filter, alone and together with
the shipped mean-probability score >= 0.82: the maximum and mean of the distance map, the maximum
and the 75th percentile of the nucleus probability over the mask.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
DATA = REPO.parent / "shared" / "data"

from exp_centre import validation_tiles  # noqa: E402
from pipeline.data.classes import read_point_csv  # noqa: E402
from pipeline.data.readers import read_image  # noqa: E402
from pipeline.data.regions import read_negative_regions  # noqa: E402
from pipeline.metrics import aggregate, aggregate_point_counts, evaluate_pair, point_counts, point_scores  # noqa: E402
from pipeline.model import load_model  # noqa: E402
from pipeline.model.postprocess import drop_low_scores, instances_from_maps, keep_instances  # noqa: E402
from pipeline.training.train import MIN_SCORE_GRID  # noqa: E402
from pipeline.training.typehead import CRCHISTO_MPP, CRCHISTO_VAL_TILES, POINT_RADIUS_UM  # noqa: E402

NEGATIVES = REPO / "pipeline" / "data" / "negatives" / "cmu1_negatives.geojson"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--tag", default="")
    ap.add_argument("--joint", action="store_true", help="validation grid fg x dist x min score")
    ap.add_argument("--variants", action="store_true", help="other per-instance scores as the filter")
    args = ap.parse_args(argv)
    seg = load_model(args.model, device="cpu")
    if args.joint:
        return joint_grid(seg, args)
    if args.variants:
        return score_variants(seg, args)
    seg.params = replace(seg.params, min_score=0.0)  # decode everything once, filter per threshold
    grid = MIN_SCORE_GRID
    val = {t: {} for t in grid}
    for s, img, lab in validation_tiles(DATA / "nuclei"):
        pred, sc = seg.segment(img, s.mpp)[:2]
        for t in grid:
            val[t][s.name] = evaluate_pair(lab, drop_low_scores(pred, sc, t)[0])
    det = {t: [] for t in grid}
    root = DATA / "nuclei" / "crchisto"
    for name in CRCHISTO_VAL_TILES:
        img = read_image(root / "images" / f"{name}.png")
        pts = read_point_csv(root / "points" / f"{name}.csv").xy_px
        pred, sc = seg.segment(img, CRCHISTO_MPP)[:2]
        cen = np.array(ndi.center_of_mass(np.ones_like(pred), pred, np.arange(1, int(pred.max()) + 1)))[:, ::-1]
        for t in grid:
            det[t].append(point_counts(pts, cen[sc >= t], POINT_RADIUS_UM / CRCHISTO_MPP))
    (r,) = read_negative_regions(NEGATIVES, DATA, margin_um=1e6)
    pred, sc = seg.segment(r["image"], r["mpp"])[:2]
    inside = ndi.mean(r["mask"], pred, np.arange(1, int(pred.max()) + 1)) > 0.5
    rows = {}
    for t in grid:
        a, d = aggregate(val[t]), point_scores(aggregate_point_counts(det[t]))
        keep = sc >= t
        rows[str(t)] = {**{k: round(float(a[k]), 4) for k in ("aji", "pq", "dice", "pixel_precision", "pixel_recall")},
                        "aji_plus_pq": round(float(a["aji"] + a["pq"]), 4),
                        **{f"crchisto_det_{k}": round(float(d[k]), 4) for k in ("precision", "recall", "f1")},
                        "cmu1_inside_negatives": int((keep & inside).sum()), "cmu1_outside": int((keep & ~inside).sum())}
        print(t, rows[str(t)], flush=True)
    out = REPO / "benchmarks" / "results" / f"min_score{'_' + args.tag if args.tag else ''}.json"
    out.write_text(json.dumps({"model": args.model or "shipped", "rows": rows}, indent=1))
    return 0


def joint_grid(seg, args) -> int:
    import itertools

    cache = [(s, lab, *seg.predict_maps(img, s.mpp)) for s, img, lab in validation_tiles(DATA / "nuclei")]
    rows = []
    for f, d, ms in itertools.product((0.5, 0.55, 0.6, 0.65), (0.4, 0.45, 0.5), (0.0, 0.78, 0.8, 0.82, 0.84, 0.86)):
        p = replace(seg.params, fg_threshold=f, dist_threshold=d, min_area_um2=6.0, min_score=ms)
        a = aggregate({s.name: evaluate_pair(lab, instances_from_maps(prob, hv, s.mpp, p)[0])
                       for s, lab, prob, hv in cache})
        rows.append({"fg_threshold": f, "dist_threshold": d, "min_score": ms,
                     **{k: round(float(a[k]), 4) for k in ("aji", "pq", "dice", "pixel_precision", "pixel_recall")},
                     "aji_plus_pq": round(float(a["aji"] + a["pq"]), 4)})
    rows.sort(key=lambda r: (-r["aji_plus_pq"], r["fg_threshold"], r["dist_threshold"], r["min_score"]))
    for r in rows[:10]:
        print(r)
    out = REPO / "benchmarks" / "results" / f"min_score_joint{'_' + args.tag if args.tag else ''}.json"
    out.write_text(json.dumps({"model": args.model or "shipped", "rows": rows}, indent=1))
    return 0


def score_variants(seg, args) -> int:
    shipped = seg.params.min_score
    p0 = replace(seg.params, min_score=0.0)
    cache = []
    for s, img, lab in validation_tiles(DATA / "nuclei"):
        prob, hv = seg.predict_maps(img, s.mpp)
        pred, sc = instances_from_maps(prob, hv, s.mpp, p0)
        idx = np.arange(1, int(pred.max()) + 1)
        f = {"mean_p": sc, "max_d": ndi.maximum(hv[2], pred, idx), "mean_d": ndi.mean(hv[2], pred, idx),
             "max_p": ndi.maximum(prob, pred, idx),
             "p75_p": ndi.labeled_comprehension(prob, pred, idx, lambda v: np.percentile(v, 75), float, 0)}
        cache.append((s, lab, pred, {k: np.asarray(v, np.float64) for k, v in f.items()}))

    def run(keepfn):
        per = {}
        for s, lab, pred, f in cache:
            per[s.name] = evaluate_pair(lab, keep_instances(pred, keepfn(f)))
        a = aggregate(per)
        return {"aji": round(float(a["aji"]), 4), "pq": round(float(a["pq"]), 4),
                "aji_plus_pq": round(float(a["aji"] + a["pq"]), 4)}

    rows = [{"score": "mean_p", "min": shipped, "with_shipped": False, **run(lambda f: f["mean_p"] >= shipped)}]
    grids = {"max_d": (0.3, 0.4, 0.5, 0.6, 0.7), "mean_d": (0.15, 0.2, 0.25, 0.3),
             "max_p": (0.85, 0.9, 0.93, 0.95), "p75_p": (0.85, 0.9, 0.93)}
    for key, grid in grids.items():
        for t in grid:
            for both in (False, True):
                rows.append({"score": key, "min": t, "with_shipped": both,
                             **run(lambda f: (f[key] >= t) & ((f["mean_p"] >= shipped) if both else True))})
                print(rows[-1], flush=True)
    out = REPO / "benchmarks" / "results" / f"min_score_variants{'_' + args.tag if args.tag else ''}.json"
    out.write_text(json.dumps({"model": args.model or "shipped", "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
