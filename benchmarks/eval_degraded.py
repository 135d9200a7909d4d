"""How often the patch typers reject *real* nuclei when the image is worse than the training tiles.

    python benchmarks/eval_degraded.py [--models default,quality] [--tag NAME]

The six fully annotated validation tiles (MoNuSeg / CPM-15, never trained on) are degraded the way
slides nobody here has seen are: a low-resolution scan (resampled to 1.0 µm/px and segmented at
that µm/px, so the model upsamples it 2x, like a slide run with ``--slide-mpp 1.0``), out of focus
(Gaussian blur, sigma 1 µm), and JPEG quality 30. For each model and condition the network's
instances (before rejection) are matched to the true nuclei (IoU > 0.5): ``true_rejected`` is the
fraction of the matched ones, real nuclei, that the typer removes (p(not a nucleus) above the
model's threshold); ``false_rejected`` the fraction of the unmatched ones it removes; AJI before and
after the removal. Results: ``benchmarks/results/degraded[_<tag>].json``.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"

from pipeline.data.datasets import builtin_samples, split_samples  # noqa: E402
from pipeline.metrics import aji, overlap_table  # noqa: E402
from pipeline.model.postprocess import instances_from_maps  # noqa: E402
from pipeline.model.resample import resample_image, resample_labels  # noqa: E402
from pipeline.model.segmenter import load_model  # noqa: E402
from pipeline.model.typehead import drop_instances  # noqa: E402

LOWRES_MPP = 1.0
BLUR_UM = 1.0
JPEG_QUALITY = 30
CONDITIONS = ("native", "lowres", "blur", "jpeg")


def degrade(img: np.ndarray, gt: np.ndarray, mpp: float, cond: str) -> tuple[np.ndarray, np.ndarray, float]:
    """``(image uint8 (H', W', 3), truth labels (H', W'), µm/px)`` of one condition."""
    if cond == "native":
        return img, gt, mpp
    if cond == "lowres":
        small = resample_image(img, mpp / LOWRES_MPP)  # the truth by nearest neighbour, on the same grid
        truth, _ = resample_labels(gt, np.zeros(int(gt.max()), np.float32), small.shape[:2])
        return small, truth, LOWRES_MPP
    if cond == "blur":
        from scipy.ndimage import gaussian_filter

        sigma = BLUR_UM / mpp
        out = np.stack([gaussian_filter(img[..., c].astype(np.float32), sigma) for c in range(3)], -1)
        return np.clip(np.round(out), 0, 255).astype(np.uint8), gt, mpp
    if cond == "jpeg":
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=JPEG_QUALITY)
        return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")), gt, mpp
    raise ValueError(cond)


def score(seg, img, gt, mpp) -> dict:
    prob, hv, embed, scale = seg.predict_maps(img, mpp, return_embed=True)
    lab, sc = instances_from_maps(prob, hv, mpp, seg.params)
    lab, sc, _, pnot, rej = seg.classify(img, lab, sc, embed, mpp, scale, keep_rejected=True)
    ov = overlap_table(gt, lab)
    matched = np.zeros(int(lab.max()), bool)
    matched[ov.pred_idx[ov.iou > 0.5]] = True
    return {"instances": int(lab.max()), "matched": int(matched.sum()),
            "true_rejected_n": int((rej & matched).sum()), "false_rejected_n": int((rej & ~matched).sum()),
            "unmatched": int((~matched).sum()),
            "aji_all": aji(gt, lab), "aji_kept": aji(gt, drop_instances(lab, ~rej))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="default,quality")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    _, val = split_samples(builtin_samples(DATA / "nuclei"))
    tiles = [(s.name, *s.load(), s.mpp) for s in val]
    t0 = time.time()
    res = {"conditions": {"lowres_mpp": LOWRES_MPP, "blur_sigma_um": BLUR_UM, "jpeg_quality": JPEG_QUALITY},
           "tiles": [t[0] for t in tiles], "models": {}}
    for name in args.models.split(","):
        seg = load_model(name, device="cpu")
        out = {"reject_threshold": seg.reject_threshold}
        for cond in CONDITIONS:
            rows = [score(seg, *degrade(img, gt, mpp, cond)) for _, img, gt, mpp in tiles]
            tot = {k: sum(r[k] for r in rows) for k in ("instances", "matched", "unmatched", "true_rejected_n",
                                                        "false_rejected_n")}
            out[cond] = {**tot,
                         "true_rejected": round(tot["true_rejected_n"] / max(tot["matched"], 1), 4),
                         "false_rejected": round(tot["false_rejected_n"] / max(tot["unmatched"], 1), 4),
                         "aji_all": round(float(np.mean([r["aji_all"] for r in rows])), 4),
                         "aji_kept": round(float(np.mean([r["aji_kept"] for r in rows])), 4),
                         "per_tile_true_rejected": [round(r["true_rejected_n"] / max(r["matched"], 1), 4) for r in rows]}
            print(name, cond, json.dumps({k: v for k, v in out[cond].items() if k != "per_tile_true_rejected"}),
                  flush=True)
        res["models"][name] = out
    res["seconds"] = round(time.time() - t0, 1)
    path = ROOT / "benchmarks" / "results" / (f"degraded_{args.tag}.json" if args.tag else "degraded.json")
    path.write_text(json.dumps(res, indent=1) + "\n")
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
