"""Where held-out CRCHisto detection F1 is lost, for the shipped default (network + patch typer).

    python benchmarks/exp_detection_ceiling.py   # -> benchmarks/results/detection_ceiling.json

On the 16 held-out tiles (3.3 µm matching), with the default's own decoding and typer:

* the errors: false positives by distance to the nearest point and by the typer's p(not a nucleus)
  (a confident "nucleus" false positive looks like a nucleus to the typer: an unannotated one or a
  hard case); misses inside a predicted mask; points that share a predicted instance (merges);
* oracles on the same candidates: a *perfect filter* (every unmatched prediction removed), and
  instances *split by the true points* (a marker blob holding >= 2 points is replaced by them:
  :func:`exp_centre.hybrid_markers`), with the typer's rejection at 0.7 after it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.spatial import cKDTree

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from exp_centre import at_image_size, decode_marker_image, frozen_features_of, hybrid_markers  # noqa: E402

from pipeline.data.classes import read_point_csv  # noqa: E402
from pipeline.data.readers import read_image  # noqa: E402
from pipeline.metrics import aggregate_point_counts, match_points, point_counts, point_scores  # noqa: E402
from pipeline.model import load_model  # noqa: E402
from pipeline.model.postprocess import instances_from_maps  # noqa: E402
from pipeline.model.typehead import centroids_xy  # noqa: E402
from pipeline.training.typehead import CRCHISTO_MPP, CRCHISTO_VAL_TILES, POINT_RADIUS_UM  # noqa: E402

CRC = ROOT.parent / "shared" / "data" / "nuclei" / "crchisto"
RESULT = ROOT / "benchmarks" / "results" / "detection_ceiling.json"


def det(rows):
    s = point_scores(aggregate_point_counts(rows))
    return {k: round(s[k], 4) for k in ("precision", "recall", "f1")}


def main() -> int:
    torch.set_num_threads(2)
    seg = load_model("default", device="cpu", engine="torch")
    typer, thr = seg.patch_typer, float(seg.patch_typer.cfg["reject_threshold"])
    r = POINT_RADIUS_UM / CRCHISTO_MPP
    rows = {"shipped": [], "perfect_filter": [], "split_by_true_points": []}
    fp_dist, fp_rej, fn_in_mask, n_fn, shared = [], [], 0, 0, 0
    for name in sorted(CRCHISTO_VAL_TILES, key=lambda s: (len(s), s)):
        img = read_image(CRC / "images" / f"{name}.png")[..., :3]
        pts = read_point_csv(CRC / "points" / f"{name}.csv").xy_px
        maps, _, _, size = frozen_features_of(seg, img, CRCHISTO_MPP)
        t = at_image_size(maps, torch.zeros(1, 0, *maps.shape[2:]), size, img.shape[:2])
        prob, hv = t[0], t[1:4]
        for mode in ("shipped", "split_by_true_points"):
            if mode == "shipped":
                lab = instances_from_maps(prob, hv, CRCHISTO_MPP, seg.params)[0]
            else:
                cm = np.zeros(prob.shape, np.float32)
                rc = np.clip(np.round(pts[:, ::-1]).astype(int), 0, np.array(prob.shape) - 1)
                cm[rc[:, 0], rc[:, 1]] = 1
                mk = hybrid_markers(prob, hv[2], cm, CRCHISTO_MPP, seg.params, 0.5, 1)
                lab = decode_marker_image(prob, hv[2], CRCHISTO_MPP, seg.params, mk)
            lab = np.asarray(lab)
            cen = centroids_xy(lab)
            rej = typer.predict(img, cen, CRCHISTO_MPP)[1]
            keep = rej <= thr
            rows[mode].append(point_counts(pts, cen[keep], r))
            if mode != "shipped":
                continue
            cen, rej, = cen[keep], rej[keep]
            gi, pi, _ = match_points(pts, cen, r)
            rows["perfect_filter"].append(point_counts(pts, cen[pi], r))
            fp = np.setdiff1d(np.arange(len(cen)), pi)
            fn = np.setdiff1d(np.arange(len(pts)), gi)
            if len(pts) and len(fp):
                fp_dist += list(cKDTree(pts).query(cen[fp])[0] * CRCHISTO_MPP)
            fp_rej += list(rej[fp])
            kept_lab = np.zeros_like(lab)  # the kept instances only
            ids = np.flatnonzero(keep) + 1
            kept_lab[np.isin(lab, ids)] = lab[np.isin(lab, ids)]
            xy = np.clip(np.round(pts).astype(int), 0, np.array(lab.shape[::-1]) - 1)
            hit = kept_lab[xy[:, 1], xy[:, 0]]
            fn_in_mask += int((hit[fn] > 0).sum())
            n_fn += len(fn)
            u, cnt = np.unique(hit[hit > 0], return_counts=True)
            shared += int((cnt - 1).sum())
    fp_dist, fp_rej = np.asarray(fp_dist), np.asarray(fp_rej)
    res = {
        "model": "default", "reject_threshold": thr, "tiles": len(CRCHISTO_VAL_TILES), "radius_um": POINT_RADIUS_UM,
        "detection": {k: det(v) for k, v in rows.items()},
        "false_positives": {
            "n": int(len(fp_rej)),
            "nearest_point_um_quantiles_10_25_50_75_90": np.percentile(fp_dist, [10, 25, 50, 75, 90]).round(2).tolist(),
            "fraction_within_6_um_of_a_point": round(float((fp_dist < 6).mean()), 3),
            "fraction_typer_p_reject_below_0.3": round(float((fp_rej < 0.3).mean()), 3),
        },
        "misses": {"n": n_fn, "inside_a_kept_mask": fn_in_mask, "points_sharing_an_instance": shared},
    }
    RESULT.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
