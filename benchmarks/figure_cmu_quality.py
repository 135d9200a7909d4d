"""Before/after figure of the ``quality`` model's rejection on CMU-1 (docs/img/cmu1_quality.png).

    cellsam segment ../shared/data/slides/CMU-1-Small-Region.svs -o D            # default model
    cellsam segment ../shared/data/slides/CMU-1-Small-Region.svs -o Q --model quality
    python benchmarks/figure_cmu_quality.py D/CMU-1-Small-Region.geojson.gz Q/CMU-1-Small-Region.geojson.gz OUT.png [WHO]

``WHO`` names the model that removes (default "the quality model"; docs/img/cmu1_default_typer.png:
the lite model without its typer against the default with it, WHO "the default's typer").

Draws the default model's nuclei on level-0 pixels: green where the quality model keeps them (a
quality nucleus within 4 px of the centroid), red where it removes them. Two views: the hair
follicle with its keratin (x 850-2000, y 880-1880) and dermis (x 200-1200, y 1900-2800). Prints
the counts.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import numpy as np
import openslide
from PIL import Image, ImageDraw
from scipy.spatial import cKDTree

SLIDE = Path(__file__).resolve().parents[2] / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
VIEWS = {"hair follicle and keratin": (850, 880, 1150, 1000), "dermis": (200, 1900, 1000, 900)}
SCALE = 0.6


def rings(path):
    feats = json.load(gzip.open(path))
    feats = feats["features"] if isinstance(feats, dict) else feats
    out = []
    for f in feats:
        g = f["geometry"]
        out.append(np.asarray((g["coordinates"] if g["type"] == "Polygon" else g["coordinates"][0])[0], np.float64))
    return out


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    before, after, out = args[:3]
    who = args[3] if len(args) > 3 else "the quality model"
    d, q = rings(before), rings(after)
    cd = np.array([r.mean(0) for r in d])
    cq = np.array([r.mean(0) for r in q])
    removed = cKDTree(cq).query(cd)[0] > 4
    print(f"before {len(d)} nuclei, after {len(q)}, removed {int(removed.sum())}")
    sl = openslide.OpenSlide(str(SLIDE))
    panels = []
    for title, (x0, y0, w, h) in VIEWS.items():
        im = sl.read_region((x0, y0), 0, (w, h)).convert("RGB").resize((int(w * SCALE), int(h * SCALE)), Image.LANCZOS)
        dr = ImageDraw.Draw(im)
        n = [0, 0]
        for r, rm in zip(d, removed):
            pts = [((x - x0) * SCALE, (y - y0) * SCALE) for x, y in r]
            if all(-5 < a < w * SCALE + 5 and -5 < b < h * SCALE + 5 for a, b in pts):
                dr.line(pts + [pts[0]], fill=(230, 0, 0) if rm else (0, 190, 0), width=2)
                n[int(rm)] += 1
        dr.rectangle([0, 0, im.width, 18], fill=(255, 255, 255))
        dr.text((4, 3), f"{title}: green kept ({n[0]}), red removed by {who} ({n[1]})", fill=(0, 0, 0))
        bar = 100 / 0.499 * SCALE  # 100 µm at level 0 (0.499 µm/px)
        dr.rectangle([8, im.height - 14, 8 + bar, im.height - 8], fill=(0, 0, 0))
        dr.text((12 + bar, im.height - 18), "100 µm", fill=(0, 0, 0))
        panels.append(im)
        print(title, "kept", n[0], "removed", n[1])
    canvas = Image.new("RGB", (sum(p.width for p in panels) + 8, max(p.height for p in panels)), "white")
    x = 0
    for p in panels:
        canvas.paste(p, (x, 0))
        x += p.width + 8
    canvas.save(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
