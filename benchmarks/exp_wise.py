"""Weight-space interpolation between the shipped network and a fine-tuned one (WiSE-FT).

    python benchmarks/exp_wise.py FINETUNED.pt [--alphas 0,0.5,0.7,1] [--tag NAME] [--save-alpha A --out OUT.pt]

Wortsman et al. (CVPR 2022, "Robust fine-tuning of zero-shot models") interpolate the weights of a
model and of its fine-tuned version, ``(1 - a) * start + a * finetuned``: the mix keeps most of the
start's accuracy where it was good and most of the fine-tune's gain under distribution shift. Here
the start is the shipped default network and the fine-tune is trained with image-quality
degradation (``cellsam train --init default --degrade P``); both share their initialisation, so
every parameter and BatchNorm statistic is interpolated tensor for tensor (integer counters are
taken from the start). For each ``a``: the network alone (no typer) on the 6 validation tiles as
scanned, out of focus, at low resolution and JPEG-compressed (:mod:`eval_degraded`'s conditions),
AJI and PQ with the shipped decoding. Results: ``benchmarks/results/wise[_<tag>].json``.
``--save-alpha A --out OUT.pt`` writes the interpolated network as a training-output checkpoint
(the fine-tune's metadata, for ``benchmarks/graft_network.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
DATA = ROOT.parent / "shared" / "data"

from eval_degraded import CONDITIONS, degrade  # noqa: E402
from pipeline.data.datasets import builtin_samples, split_samples  # noqa: E402
from pipeline.metrics import aji, panoptic_quality  # noqa: E402
from pipeline.model.checkpoint import DEFAULT_WEIGHTS, load_checkpoint, save_checkpoint  # noqa: E402
from pipeline.model.postprocess import instances_from_maps  # noqa: E402
from pipeline.model.segmenter import Segmenter  # noqa: E402


def interpolate(start, tuned, a: float):
    """``tuned``'s architecture with ``(1 - a) * start + a * tuned`` weights on the network (the
    keys both have, same shapes required; non-float tensors from ``start``); the patch typer and
    type head are never mixed (``tuned``'s own are kept)."""
    s0, s1 = start.trainable_state_dict(), tuned.trainable_state_dict()
    out = {}
    for k, v1 in s1.items():
        if k not in s0 or k.startswith(("patch_typer.", "type_head.")):
            continue
        v0 = s0[k]
        if v0.shape != v1.shape:
            raise SystemExit(f"{k}: shapes differ ({tuple(v0.shape)} vs {tuple(v1.shape)})")
        out[k] = (v0 * (1 - a) + v1 * a).to(v1.dtype) if v1.is_floating_point() else v0.clone()
    tuned.load_state_dict(out, strict=False)
    return tuned


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("finetuned", type=Path)
    ap.add_argument("--alphas", default="0,0.5,0.7,1")
    ap.add_argument("--conditions", default=",".join(CONDITIONS))
    ap.add_argument("--tag", default="")
    ap.add_argument("--save-alpha", type=float, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    start, start_meta = load_checkpoint(DEFAULT_WEIGHTS)
    if args.save_alpha is not None:
        tuned, meta = load_checkpoint(args.finetuned)
        model = interpolate(start, tuned, args.save_alpha)
        meta = {**meta, "wise": {"alpha": args.save_alpha, "start_epoch": start_meta.get("epoch"),
                                 "finetuned_epoch": meta.get("epoch")}}
        save_checkpoint(args.out, model.eval(), meta)
        print(f"wrote {args.out}")
        return 0
    _, val = split_samples(builtin_samples(DATA / "nuclei"))
    tiles = [(s.name, *s.load(), s.mpp) for s in val]
    conds = args.conditions.split(",")
    res = {"finetuned": args.finetuned.name, "tiles": [t[0] for t in tiles], "rows": []}
    t0 = time.time()
    for a in (float(x) for x in args.alphas.split(",")):
        tuned, meta = load_checkpoint(args.finetuned)
        model = interpolate(start, tuned, a) if a < 1 else tuned
        model.type_head = model.patch_typer = None  # the network alone
        seg = Segmenter(model, {**meta, "postprocess": start_meta["postprocess"]}, device="cpu", engine="torch")
        row = {"alpha": a}
        for cond in conds:
            per = []
            for _, img, gt, mpp in tiles:
                im, truth, m = degrade(img, gt, mpp, cond)
                prob, hv = seg.predict_maps(im, m)
                lab = instances_from_maps(prob, hv, m, seg.params)[0]
                per.append((aji(truth, lab), panoptic_quality(truth, lab)["pq"]))
            row[cond] = {"aji": round(float(np.mean([p[0] for p in per])), 4),
                         "pq": round(float(np.mean([p[1] for p in per])), 4),
                         "per_tile_aji": [round(p[0], 4) for p in per]}
        print(json.dumps({k: (v if not isinstance(v, dict) else {"aji": v["aji"], "pq": v["pq"]})
                          for k, v in row.items()}), flush=True)
        res["rows"].append(row)
    res["seconds"] = round(time.time() - t0, 1)
    path = ROOT / "benchmarks" / "results" / (f"wise_{args.tag}.json" if args.tag else "wise.json")
    path.write_text(json.dumps(res, indent=1) + "\n")
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
