"""Experiment: stain normalisation at inference, and the per-tile foreground-threshold oracle.

    python benchmarks/exp_stain.py   # -> benchmarks/results/stain_norm.json

The shipped lite weights on the fixed validation split (the 6 tiles of ``split_samples``), decoded
at foreground thresholds 0.5 / 0.6 / 0.7, on

* the tiles as they are (``shipped``);
* Reinhard normalisation (Reinhard et al. 2001): each tile's CIE-Lab mean and standard deviation over
  its tissue pixels (L < 90) mapped onto the mean of the training tiles' (``reinhard``), or half way
  (``reinhard_half``).

The per-tile best threshold (an oracle: it reads the true labels) bounds what any per-tile
threshold adaptation could gain. Default engine (as the product).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from skimage.color import lab2rgb, rgb2lab

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from exp_centre import validation_tiles, write_rows  # noqa: E402
from pipeline.data.datasets import builtin_samples, split_samples  # noqa: E402
from pipeline.metrics import evaluate_pair  # noqa: E402
from pipeline.model import load_model  # noqa: E402
from pipeline.model.postprocess import PostprocessParams, instances_from_maps  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "nuclei"
TISSUE_L = 90.0


def lab_stats(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std (3,) of CIE-Lab over the tissue pixels (L < 90) of an RGB uint8 image."""
    lab = rgb2lab(img)
    m = lab[..., 0] < TISSUE_L
    return lab[m].mean(0), lab[m].std(0)


def reinhard(img: np.ndarray, mean: np.ndarray, std: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """``img`` (H, W, 3) uint8 with its tissue Lab statistics moved ``alpha`` of the way to ``mean``/``std``."""
    lab = rgb2lab(img)
    m = lab[..., 0] < TISSUE_L
    mu, sd = lab[m].mean(0), lab[m].std(0)
    out = (lab - mu) / sd * (alpha * std + (1 - alpha) * sd) + (alpha * mean + (1 - alpha) * mu)
    out = np.where(m[..., None], out, lab)
    return (lab2rgb(out).clip(0, 1) * 255).round().astype(np.uint8)


def main() -> None:
    seg = load_model(None, device="cpu")
    stats = [lab_stats(s.load()[0][::2, ::2]) for s in split_samples(builtin_samples(DATA))[0]]
    mean, std = np.mean([s[0] for s in stats], 0), np.mean([s[1] for s in stats], 0)
    per: dict = {}
    for s, img, lab in validation_tiles(DATA):
        for name, im in (("shipped", img), ("reinhard", reinhard(img, mean, std)),
                         ("reinhard_half", reinhard(img, mean, std, 0.5))):
            prob, hv = seg.predict_maps(im, s.mpp)
            for fg in (0.5, 0.6, 0.7):
                p = PostprocessParams.from_dict({**seg.params.to_dict(), "fg_threshold": fg})
                per.setdefault(f"{name}_fg{fg}", {})[s.name] = evaluate_pair(lab, instances_from_maps(prob, hv, s.mpp, p)[0])
        print(s.name, {k: round(v[s.name]["aji"], 3) for k, v in per.items()}, flush=True)
    names = list(per["shipped_fg0.6"])
    oracle = float(np.mean([max(per[f"shipped_fg{fg}"][n]["aji"] for fg in (0.5, 0.6, 0.7)) for n in names]))
    out = REPO / "benchmarks" / "results" / "stain_norm.json"
    write_rows(per, out)
    res = json.loads(out.read_text())
    res["per_tile_best_threshold_aji"] = round(oracle, 4)
    res["train_lab_mean"], res["train_lab_std"] = [round(float(v), 3) for v in mean], [round(float(v), 3) for v in std]
    out.write_text(json.dumps(res, indent=1))
    print("per-tile best threshold (oracle) AJI", round(oracle, 4))


if __name__ == "__main__":
    main()
