"""Validation metrics and ablation of a CellSAM checkpoint on the fixed validation split.

Usage::

    python benchmarks/eval_model.py [--model CKPT] [--teacher SAM.pth] [--refined CKPT] [--data ../shared/data/nuclei]
                                    [--out benchmarks/results/model_validation.json]

Scores the 6 validation tiles (3 MoNuSeg-2018 *train* tiles with XML + 3 CPM-15 tiles; see
``pipeline.data.datasets``) at each tile's native resolution (the model resamples internally, as
``cellsam predict --mpp`` does), for:

* ``lite``           the checkpoint as shipped (dense heads + its own decoding: distance-marker
                     watershed for 4-channel checkpoints, HV marker watershed for 3-channel ones);
* ``lite_cc``        same network, connected components of the foreground (no splitting);
* ``lite_hv``        same network, HoVer-Net decoding from the H/V maps instead of the distance map;
* ``refined``        with SAM prompt-encoder/mask-decoder refinement + mask fusion (``--refined``);
* ``classical``      the H-channel watershed baseline (``pipeline.baseline``).

Also measures CPU throughput (Mpx/s at the model's µm/px, model + post-processing) on 1152 x 1152
windows. Writes JSON + a markdown table next to it. The MoNuSeg official test split is not used.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.baseline import segment_classical  # noqa: E402
from pipeline.data.datasets import builtin_samples, split_samples  # noqa: E402
from pipeline.metrics import aggregate, evaluate_pair  # noqa: E402
from pipeline.model import load_model  # noqa: E402
from pipeline.model.postprocess import PostprocessParams, instances_from_maps  # noqa: E402

KEYS = ("aji", "pq", "dq", "sq", "dice", "obj_f1", "pixel_precision", "pixel_recall", "mean_class_accuracy")


def cc_segment(seg, img, mpp):
    prob, _ = seg.predict_maps(img, mpp)
    lab, _ = ndi.label(prob >= seg.params.fg_threshold)
    return lab.astype(np.uint32)


def hv_segment(seg, img, mpp):
    """Same network, HoVer-Net decoding (markers from the H/V map gradients; the distance channel
    ignored), with the thresholds tuned for the previous (HV-only) shipped model."""
    prob, hv = seg.predict_maps(img, mpp)
    p = PostprocessParams(fg_threshold=seg.params.fg_threshold, marker_threshold=0.3, sigma_um=1.0,
                          min_area_um2=seg.params.min_area_um2)
    return instances_from_maps(prob, hv[:2], mpp, p)[0]


def score(method, samples):
    per = {}
    t = time.perf_counter()
    for s in samples:
        img, lab = s.load()
        per[s.name] = evaluate_pair(lab, method(img, s.mpp))
    agg = aggregate(per)
    return {"overall": {k: round(agg[k], 4) for k in KEYS + ("aji_pooled", "pq_pooled")},
            "per_image": {n: {k: round(v[k], 4) for k in KEYS} for n, v in per.items()},
            "seconds": round(time.perf_counter() - t, 1)}


def throughput(seg, reps=3, size=1152, batch=1):
    rng = np.random.default_rng(0)
    samples = split_samples(builtin_samples(ARGS.data))[1]
    img, _ = samples[0].load()
    from pipeline.data.datasets import resample_pair

    img, _ = resample_pair(img, np.zeros(img.shape[:2], np.uint32), samples[0].mpp / seg.mpp)
    tile = np.full((size, size, 3), 255, np.uint8)
    reps_r = int(np.ceil(size / img.shape[0]))
    reps_c = int(np.ceil(size / img.shape[1]))
    big = np.tile(img, (reps_r, reps_c, 1))[:size, :size]
    tile[:] = big
    batch_imgs = np.stack([tile] * batch)
    seg.segment_batch(batch_imgs)  # warm-up
    timings = {}
    t = time.perf_counter()
    for _ in range(reps):
        seg.segment_batch(batch_imgs, timings)
    wall = time.perf_counter() - t
    mpx = reps * batch * size * size / 1e6
    del rng
    return {"window_px": size, "batch": batch, "threads": torch.get_num_threads(),
            "mpx_per_s_total": round(mpx / wall, 3),
            "mpx_per_s_model": round(mpx / timings["model_s"], 3),
            "postprocess_over_model": round(timings["postprocess_s"] / timings["model_s"], 3)}


def main(argv=None):
    global ARGS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint (default: shipped weights)")
    p.add_argument("--refined", default=None, help="checkpoint with a trained SAM decoder (refinement ablation)")
    p.add_argument("--teacher", default=None, metavar="SAM.pth",
                   help="official SAM checkpoint: evaluates a dual --model (teacher + student fused) in dual mode")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "nuclei"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "model_validation.json"))
    p.add_argument("--no-throughput", action="store_true")
    ARGS = p.parse_args(argv)
    _, val = split_samples(builtin_samples(ARGS.data))
    seg = load_model(ARGS.model, device="cpu", teacher=ARGS.teacher)
    res = {"model": Path(ARGS.model).name if ARGS.model else "shipped default", "mode": seg.mode,
           "teacher": ({k: seg.model.teacher.info[k] for k in ("file", "sha256", "type", "tile_px")}
                       if seg.mode == "dual" else None),
           "metadata_version": seg.metadata.get("version"),
           "validation_tiles": [s.name for s in val], "machine": f"{platform.processor() or platform.machine()}, "
           f"{torch.get_num_threads()} torch threads, torch {torch.__version__}", "results": {}}
    res["results"]["lite"] = score(lambda im, m: seg.segment(im, m)[0], val)
    res["results"]["lite_cc"] = score(lambda im, m: cc_segment(seg, im, m), val)
    if seg.model.arch["decoder"].get("out", 3) == 4:
        res["results"]["lite_hv"] = score(lambda im, m: hv_segment(seg, im, m), val)
    if ARGS.refined:
        rseg = load_model(ARGS.refined, device="cpu", refine=True, teacher=ARGS.teacher)
        res["results"]["refined"] = score(lambda im, m: rseg.segment(im, m)[0], val)
        if not ARGS.no_throughput:
            res["throughput_refined"] = throughput(rseg)
    res["results"]["classical"] = score(lambda im, m: segment_classical(im, m)[0], val)
    if not ARGS.no_throughput:
        res["throughput_lite"] = throughput(seg)
    out = Path(ARGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    lines = ["| method | AJI | PQ | DQ | SQ | Dice | obj F1 | pix P | pix R | mean acc |", "|---|" + "---|" * 9]
    for name, r in res["results"].items():
        o = r["overall"]
        lines.append(f"| {name} | " + " | ".join(f"{o[k]:.3f}" for k in KEYS) + " |")
    md = "\n".join(lines) + "\n"
    for k in ("throughput_lite", "throughput_refined"):
        if k in res:
            md += f"\n{k}: {json.dumps(res[k])}\n"
    out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
