"""Detections inside the hand-drawn negative regions of CMU-1 (keratin flakes, hair-shaft layers, debris).

    python benchmarks/eval_negatives.py [--model CKPT] [--tag NAME]

Segments the whole of ``CMU-1-Small-Region.svs`` (level 0, 0.499 µm/px) with ``Segmenter.segment``
and counts the predicted nuclei whose mask lies more than half inside the polygons of
``pipeline/data/negatives/cmu1_negatives.geojson`` (no nucleus inside them, checked by hand at full
resolution), and those outside. Results: ``benchmarks/results/negatives[_<tag>].json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"

from pipeline.data.regions import read_negative_regions  # noqa: E402
from pipeline.model.segmenter import load_model  # noqa: E402

NEGATIVES = ROOT / "pipeline" / "data" / "negatives" / "cmu1_negatives.geojson"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the shipped weights)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    seg = load_model(args.model, device="cpu")
    # a margin larger than the slide: the whole of level 0, with the polygons' mask
    (r,) = read_negative_regions(NEGATIVES, DATA, margin_um=1e6)
    neg, mpp = r["mask"], r["mpp"]
    lab = seg.segment(r["image"], mpp)[0]
    k = int(lab.max())
    px = np.bincount(lab.ravel(), minlength=k + 1)[1:]
    inside_px = np.bincount(lab.ravel(), weights=neg.ravel(), minlength=k + 1)[1:]
    inside = inside_px > 0.5 * px
    res = {"model": Path(args.model).name if args.model else "shipped", "slide": "CMU-1-Small-Region.svs",
           "nuclei": k, "inside_negatives": int(inside.sum()), "outside": int((~inside).sum()),
           "negative_area_mm2": round(float(neg.sum()) * mpp * mpp / 1e6, 4)}
    print(json.dumps(res))
    out = ROOT / "benchmarks" / "results" / (f"negatives_{args.tag}.json" if args.tag else "negatives.json")
    out.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
