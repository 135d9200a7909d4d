"""The in-house teacher (a checkpoint averaged over the 8 dihedral transforms) on the validation split.

    python benchmarks/eval_teacher.py [--model CKPT]

Scores, on the same 6 validation tiles as ``benchmarks/eval_model.py`` (native resolution, the
checkpoint's own decoding thresholds), the plain checkpoint and its D4 test-time-augmentation
ensemble (:func:`pipeline.training.joint.teacher_maps`), and times both on one 1152² window.
Writes ``benchmarks/results/teacher.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.data.datasets import builtin_samples, split_samples  # noqa: E402
from pipeline.metrics import aggregate, evaluate_pair  # noqa: E402
from pipeline.model.checkpoint import DEFAULT_WEIGHTS, load_checkpoint  # noqa: E402
from pipeline.model.postprocess import instances_from_maps  # noqa: E402
from pipeline.model.segmenter import Segmenter  # noqa: E402
from pipeline.training.joint import teacher_maps  # noqa: E402

KEYS = ("aji", "pq", "dice", "pixel_precision", "pixel_recall")


def maps(seg, img, mpp, tta: bool):
    # the resampling of Segmenter.predict_maps (bilinear, antialiased when shrinking)
    f = mpp / seg.mpp
    x = torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1)[None].float()
    size = (max(16, int(round(img.shape[0] * f))), max(16, int(round(img.shape[1] * f))))
    x = F.interpolate(x, size=size, mode="bilinear", antialias=f < 1, align_corners=False)
    small = np.ascontiguousarray(x.round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy())
    if tta:
        prob, dist = teacher_maps(seg, small)
    else:
        out = seg.forward(small[None])
        prob, dist = out["prob"][0], out["hv"][0][2]
    t = torch.from_numpy(np.stack([prob, dist]))[None]
    t = F.interpolate(t, size=img.shape[:2], mode="bilinear", align_corners=False)[0].numpy()
    return t[0], t[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEFAULT_WEIGHTS))
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "nuclei"))
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    model, meta = load_checkpoint(args.model)
    seg = Segmenter(model, meta, device="cpu", engine="torch")
    val = split_samples(builtin_samples(args.data))[1]
    res = {"model": Path(args.model).name}
    for name, tta in (("student", False), ("teacher_d4", True)):
        per = {}
        for s in val:
            img, lab = s.load()
            prob, dist = maps(seg, img, s.mpp, tta)
            pred, _ = instances_from_maps(prob, np.stack([dist, dist, dist]), s.mpp, seg.params)
            per[s.name] = evaluate_pair(lab, pred)
        agg = aggregate(per)
        res[name] = {k: round(float(agg[k]), 4) for k in KEYS}
        tile = np.ascontiguousarray(np.tile(val[0].load()[0], (2, 2, 1))[:1152, :1152])
        maps(seg, tile, seg.mpp, tta)
        t0 = time.perf_counter()
        maps(seg, tile, seg.mpp, tta)
        res[name]["mpx_per_s_network"] = round(1152 * 1152 / 1e6 / (time.perf_counter() - t0), 3)
        print(name, res[name], flush=True)
    out = REPO / "benchmarks" / "results" / (f"teacher_{args.tag}" if args.tag else "teacher")
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    lines = [f"# D4 teacher vs student ({res['model']}, 6 validation tiles, torch fp32)", "",
             "| model | AJI | PQ | Dice | pixel P | pixel R | network Mpx/s |", "|---|---|---|---|---|---|---|"]
    for name in ("student", "teacher_d4"):
        r = res[name]
        lines.append(f"| {name} | {r['aji']} | {r['pq']} | {r['dice']} | {r['pixel_precision']} | "
                     f"{r['pixel_recall']} | {r['mpx_per_s_network']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
