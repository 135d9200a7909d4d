"""Candidate networks with the shipped default's type head and patch typer, on held-out data.

    python benchmarks/compare_networks.py CKPT [CKPT ...] [--tag NAME]

Each candidate (a ``cellsam train`` output, or ``shipped`` for the shipped default) gets the shipped
default's type head and patch typer (:func:`graft_network.graft`, in memory) and is scored like the
shipped model (default engine):

* the 16 held-out CRCHisto tiles (real 20x scans at 0.55 µm/px; never used to train a network):
  detection P / R / F1 within 3.3 µm, weighted type F1; sharp and out of focus (sigma 1 µm);
* the 6 validation tiles (native resolution): AJI, PQ, Dice after rejection;
* the whole of ``CMU-1-Small-Region.svs``: nuclei inside / outside the hand-drawn negatives, removed.

Results: ``benchmarks/results/compare_networks[_<tag>].json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
DATA = ROOT.parent / "shared" / "data"
CRC = DATA / "nuclei" / "crchisto"
NEGATIVES = ROOT / "pipeline" / "data" / "negatives" / "cmu1_negatives.geojson"

from eval_degraded import degrade  # noqa: E402
from graft_network import graft  # noqa: E402
from pipeline.data.classes import ClassVocabulary, read_point_csv  # noqa: E402
from pipeline.data.datasets import builtin_samples, split_samples  # noqa: E402
from pipeline.data.readers import read_image  # noqa: E402
from pipeline.data.regions import read_negative_regions  # noqa: E402
from pipeline.metrics import aggregate, aggregate_point_counts, evaluate_pair, point_counts, point_scores  # noqa: E402
from pipeline.model.checkpoint import DEFAULT_WEIGHTS  # noqa: E402
from pipeline.model.segmenter import load_model  # noqa: E402
from pipeline.model.typehead import centroids_xy  # noqa: E402
from pipeline.training.typehead import CRCHISTO_MPP, CRCHISTO_VAL_TILES, POINT_RADIUS_UM  # noqa: E402


def crchisto(seg, tiles, vocab, cond: str) -> dict:
    rows = []
    for img, pts in tiles:
        im = degrade(img, np.zeros(img.shape[:2], np.int32), CRCHISTO_MPP, cond)[0]
        lab, _, probs = seg.segment(im, CRCHISTO_MPP)
        rows.append(point_counts(pts.xy_px, centroids_xy(lab), POINT_RADIUS_UM / CRCHISTO_MPP, pts.encode(vocab),
                                 probs.argmax(1) if len(probs) else np.zeros(0, np.int64), len(vocab)))
    sc = point_scores(aggregate_point_counts(rows))
    return {"det_precision": round(sc["precision"], 4), "det_recall": round(sc["recall"], 4),
            "det_f1": round(sc["f1"], 4), "weighted_type_f1": round(sc["weighted_f1"], 4)}


def cmu_negatives(seg) -> dict:
    """Nuclei more than half inside / outside the CMU-1 negatives (as ``eval_negatives.py``)."""
    (r,) = read_negative_regions(NEGATIVES, DATA, margin_um=1e6)
    lab = seg.segment(r["image"], r["mpp"])[0]
    k = int(lab.max())
    px = np.bincount(lab.ravel(), minlength=k + 1)[1:]
    inside = np.bincount(lab.ravel(), weights=r["mask"].ravel(), minlength=k + 1)[1:] > 0.5 * px
    return {"inside": int(inside.sum()), "outside": int((~inside).sum())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpts", nargs="+")
    ap.add_argument("--tag", default="")
    ap.add_argument("--no-cmu", action="store_true")
    args = ap.parse_args(argv)
    vocab = ClassVocabulary.crchisto()
    names = sorted(CRCHISTO_VAL_TILES, key=lambda s: (len(s), s))
    tiles = [(read_image(CRC / "images" / f"{n}.png")[..., :3], read_point_csv(CRC / "points" / f"{n}.csv"))
             for n in names]
    _, va = split_samples(builtin_samples(DATA / "nuclei"))
    loaded = [(s, *s.load()) for s in va]
    res = {"candidates": {}}
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for ck in args.ckpts:
            if ck == "shipped":
                path = DEFAULT_WEIGHTS
            else:
                path = Path(tmp) / (Path(ck).stem + ".pt")
                graft(Path(ck), DEFAULT_WEIGHTS, path)
            seg = load_model(str(path), device="cpu")
            out = {"crchisto_native": crchisto(seg, tiles, vocab, "native"),
                   "crchisto_blur": crchisto(seg, tiles, vocab, "blur")}
            agg = aggregate([evaluate_pair(gt, seg.segment(img, smp.mpp)[0]) for smp, img, gt in loaded])
            out["validation"] = {k: round(float(agg[k]), 4) for k in ("aji", "pq", "dice", "pixel_precision",
                                                                       "pixel_recall")}
            if not args.no_cmu:
                out["cmu1_negatives"] = cmu_negatives(seg)
            res["candidates"][ck] = out
            print(ck, json.dumps(out), flush=True)
    res["seconds"] = round(time.time() - t0, 1)
    path = ROOT / "benchmarks" / "results" / (f"compare_networks_{args.tag}.json" if args.tag
                                             else "compare_networks.json")
    path.write_text(json.dumps(res, indent=1) + "\n")
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
