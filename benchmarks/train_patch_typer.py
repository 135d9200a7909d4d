"""Train the patch typer of the ``quality`` model and measure it against the shipped type head.

    python benchmarks/train_patch_typer.py [--epochs 24] [--width 32] [--crc-unmatched reject|ignore] [--tag TAG]
        [--patch-px 20 --typer-mpp 1.1 --sampler crop] [--distill-from quality --distill-weight W]
    # -> benchmarks/results/patch_typer[_TAG].json, the typer's weights in --state (default /tmp/patch_typer.pt)
    python benchmarks/train_patch_typer.py --compose RULE THRESHOLD [--into default]   # RULE typer|mean, THRESHOLD none|t
    # -> pipeline/weights/cellsam_quality.pt (the shipped default network + this typer; --into default:
    #    cellsam_default.pt, the lite model + this typer)

The shipped network and type head stay frozen (engine torch). Training examples, every one a patch at
0.55 µm/px around a *predicted* instance centroid (the typer sees at training what it sees at inference):

* the 64 CRCHisto training tiles: typed points give the class (:func:`match_targets`), instances touched
  only by an unlabelled point are nuclei of unknown class; instances no point touches are "not a
  nucleus" with ``--crc-unmatched reject`` (default), ignored with ``ignore``;
* the MoNuSeg/CPM training split: false detections (at most 20 % on a ground-truth nucleus) are "not
  a nucleus", matched ones nuclei of unknown class (a random third of them, to keep epochs short);
* the detections inside the hand-drawn CMU-1 negative regions (keratin, hair shaft): "not a nucleus".

Measured on data the typer never saw, for the class rule (head alone, typer alone, their mean) and
the typer's reject threshold: held-out CRCHisto detection P / R / F1 and weighted type F1 (16 tiles,
3.3 µm), classification alone on the detected typed points and on patches at the true points
(SC-CNN's setting), MoNuSeg/CPM validation AJI / PQ after rejection, and CMU-1 detections inside /
outside the negative regions (inside is not held out: those regions are in training). The cost: the
typer's time for the 1,528 nuclei of the type head's cost window, torch fp32, 2 threads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"
CRC = DATA / "nuclei" / "crchisto"
NEGATIVES = ROOT / "pipeline" / "data" / "negatives" / "cmu1_negatives.geojson"
RESULT = ROOT / "benchmarks" / "results" / "patch_typer.json"
QUALITY = ROOT / "pipeline" / "weights" / "cellsam_quality.pt"

from pipeline.data.classes import ClassVocabulary, read_point_csv  # noqa: E402
from pipeline.data.datasets import builtin_samples, split_samples  # noqa: E402
from pipeline.data.readers import read_image  # noqa: E402
from pipeline.data.regions import read_negative_regions  # noqa: E402
from pipeline.metrics import (aggregate_point_counts, aji, matched_classification, panoptic_quality,  # noqa: E402
                              point_counts, point_scores)
from pipeline.model.checkpoint import DEFAULT_WEIGHTS, load_checkpoint, save_checkpoint  # noqa: E402
from pipeline.model.patchtyper import PatchTyper, combine  # noqa: E402
from pipeline.model.segmenter import Segmenter  # noqa: E402
from pipeline.model.typehead import drop_instances  # noqa: E402
from pipeline.training.patchtyper import fit_typer, instance_patches, typer_targets  # noqa: E402
from pipeline.training.typehead import (CRCHISTO_MPP, CRCHISTO_VAL_TILES, IGNORE, NUCLEUS, POINT_RADIUS_UM,  # noqa: E402
                                        REJECT, crchisto_examples, instance_tile_examples,
                                        negative_region_examples)

PATCH_PX, TYPER_MPP = 40, 0.55
THRESHOLDS = (None, 0.9, 0.7, 0.5)


def weighted_f1(yt, yp, k):
    """Support-weighted and per-class F1 of class labels ``yp`` against ``yt`` (both in 0..k-1):
    :func:`pipeline.metrics.matched_classification` of their confusion matrix."""
    conf = np.zeros((k + 1, k + 1), np.int64)
    np.add.at(conf, (np.asarray(yt, np.int64), np.asarray(yp, np.int64)), 1)
    m = matched_classification(conf)
    return m["weighted_f1"], m["class_f1"]


def crc_images(names):
    return [read_image(CRC / "images" / f"{n}.png")[..., :3] for n in names]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=24)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--crc-unmatched", choices=("reject", "ignore"), default="reject")
    ap.add_argument("--state", default="/tmp/patch_typer.pt")
    ap.add_argument("--compose", nargs=2, metavar=("RULE", "THRESHOLD"))
    ap.add_argument("--into", choices=("quality", "default"), default="quality",
                    help="--compose writes this shipped model (default: the lite model gets the typer)")
    ap.add_argument("--tag", default="", help="results in patch_typer_<tag>.json (variants)")
    ap.add_argument("--patch-px", type=int, default=PATCH_PX, help="patch side, patch pixels")
    ap.add_argument("--typer-mpp", type=float, default=TYPER_MPP, help="patch µm/px")
    ap.add_argument("--sampler", choices=("bilinear", "crop"), default="bilinear")
    ap.add_argument("--distill-from", default=None, metavar="MODEL",
                    help="a shipped model (quality) whose patch typer's outputs at the same centroids are soft targets")
    ap.add_argument("--distill-weight", type=float, default=1.0)
    ap.add_argument("--blur", type=float, default=0.0,
                    help="probability of the out-of-focus augmentation per patch (default 0 = off)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    vocab = ClassVocabulary.crchisto()
    cfg = {"classes": list(vocab.names), "patch_px": args.patch_px, "mpp": args.typer_mpp, "width": args.width,
           "sampler": args.sampler, "combine": "typer", "reject_threshold": None}
    if args.compose:
        return compose(args, cfg)
    t0 = time.time()
    model, meta = load_checkpoint(DEFAULT_WEIGHTS)
    seg = Segmenter(model, meta, device="cpu", engine="torch")
    seg.patch_typer = None  # the shipped default's own typer: candidates are the network's, unfiltered
    head = seg.type_head
    names = sorted((p.stem for p in (CRC / "images").glob("*.png")), key=lambda s: (len(s), s))
    tr_names = [n for n in names if n not in CRCHISTO_VAL_TILES]
    va_names = [n for n in names if n in CRCHISTO_VAL_TILES]
    c = len(vocab)

    def cut(img, cen, mpp):
        """This run's patches (``--patch-px`` at ``--typer-mpp``, ``--sampler``) at ``cen`` of ``img``."""
        return instance_patches(img, cen, mpp, args.typer_mpp, args.patch_px, args.sampler)

    xs, ys, ss = [], [], []
    teacher = None
    if args.distill_from:
        from pipeline.model import load_model

        # torch, not OpenVINO: with the OpenVINO typer loaded in the process, training epochs took ~70 s
        # instead of ~8 s here (cause not isolated)
        teacher = load_model(args.distill_from, device="cpu", engine="torch").patch_typer
        if teacher is None:
            ap.error(f"--distill-from {args.distill_from}: that model has no patch typer")

    def add(img, cen, mpp, y):
        """One image's patches, targets and (with --distill-from) the teacher's soft targets."""
        xs.append(cut(img, cen, mpp))
        ys.append(y)
        if teacher is not None:
            cp, rj = teacher.predict(img, cen, mpp)
            ss.append(np.concatenate([cp * (1 - rj)[:, None], rj[:, None]], 1).astype(np.float32))

    for ex, img in zip(crchisto_examples(seg, CRC, vocab, tr_names), crc_images(tr_names)):
        t = ex.target.copy()
        if args.crc_unmatched == "ignore":
            t[t == REJECT] = IGNORE
        add(img, ex.centroids, ex.mpp, typer_targets(t, c))
    tr_s, va_s = split_samples(builtin_samples(DATA / "nuclei"))
    rng = np.random.default_rng(0)
    for ex, smp in zip(instance_tile_examples(seg, tr_s), tr_s):
        t = ex.target.copy()
        t[(t == NUCLEUS) & (rng.random(len(t)) > 1 / 3)] = IGNORE
        keep = t != IGNORE
        add(smp.load()[0], ex.centroids[keep], ex.mpp, typer_targets(t[keep], c))
    for ex, reg in zip(negative_region_examples(seg, NEGATIVES, DATA), read_negative_regions(NEGATIVES, DATA, 64.0)):
        keep = ex.target == REJECT
        add(reg["image"], ex.centroids[keep], ex.mpp, typer_targets(ex.target[keep], c))
    x, y = np.concatenate(xs), np.concatenate(ys)
    counts = {"typed": int(((y >= 0) & (y < c)).sum()),
              "reject": int((y == c).sum()), "nucleus": int((y == NUCLEUS).sum())}
    print(f"training patches in {time.time() - t0:.0f} s: {counts}", flush=True)

    # held-out examples
    crc_va = crchisto_examples(seg, CRC, vocab, va_names)
    va_imgs = crc_images(va_names)
    va_patches = [cut(img, ex.centroids, ex.mpp) for ex, img in zip(crc_va, va_imgs)]
    typed_va = np.concatenate([ex.target for ex in crc_va])
    inst_va = instance_tile_examples(seg, va_s)
    va_loaded = [s.load() for s in va_s]
    (cmu_all,) = negative_region_examples(seg, NEGATIVES, DATA, margin_um=1e6)
    (cmu_reg,) = read_negative_regions(NEGATIVES, DATA, 1e6)

    def run_typer(typer, patch_list):
        out = [typer.predict_patches(torch.from_numpy(p).permute(0, 3, 1, 2).float().div(255)) for p in patch_list]
        return [o[0] for o in out], [o[1] for o in out]

    rows_ep = []

    def on_epoch(ep, typer):
        if ep % 4 == 3 or ep == args.epochs - 1:
            probs, _ = run_typer(typer, va_patches)
            m = typed_va >= 0
            wf, _ = weighted_f1(typed_va[m], np.concatenate(probs).argmax(1)[m], c)
            rows_ep.append({"epoch": ep, "detected_typed_weighted_f1": wf, "s": round(time.time() - t0)})
            print(rows_ep[-1], flush=True)

    typer = fit_typer(x, y, cfg, epochs=args.epochs, on_epoch=on_epoch,
                      soft=np.concatenate(ss) if ss else None, soft_weight=args.distill_weight,
                      blur=args.blur)
    torch.save({"cfg": cfg, "state_dict": typer.state_dict()}, args.state)

    # --- final measurements ---
    ty_p, ty_r = run_typer(typer, va_patches)
    hd_p = [head.predict(ex.features, ex.centroids, ex.mpp)[0] for ex in crc_va]
    res = {"train_patches": counts, "crc_unmatched": args.crc_unmatched, "epochs": args.epochs, "width": args.width,
           "patch_px": args.patch_px, "typer_mpp": args.typer_mpp, "sampler": args.sampler,
           "distill_from": args.distill_from, "distill_weight": args.distill_weight if args.distill_from else None,
           "parameters": sum(p.numel() for p in typer.parameters()), "per_epoch": rows_ep, "rules": []}
    m = typed_va >= 0
    for rule in ("head", "typer", "mean"):
        probs = [hp if rule == "head" else combine(hp, tp, rule) for hp, tp in zip(hd_p, ty_p)]
        cls = np.concatenate(probs).argmax(1)
        wf, per = weighted_f1(typed_va[m], cls[m], c)
        for thr in THRESHOLDS:
            rows = []
            for ex, pr, rj in zip(crc_va, probs, ty_r):
                keep = np.ones(len(rj), bool) if thr is None else rj <= thr
                rows.append(point_counts(ex.points_xy, ex.centroids[keep], POINT_RADIUS_UM / CRCHISTO_MPP,
                                         ex.points_class, pr[keep].argmax(1), c))
            sc = point_scores(aggregate_point_counts(rows))
            res["rules"].append({"rule": rule, "reject_threshold": thr,
                                 "classification_alone_weighted_f1": wf, "per_class_f1": dict(zip(vocab.names, per)),
                                 "det_precision": round(sc["precision"], 4), "det_recall": round(sc["recall"], 4),
                                 "det_f1": round(sc["f1"], 4), "weighted_type_f1": round(sc["weighted_f1"], 4)})
            print(res["rules"][-1], flush=True)
    # SC-CNN's setting: patches at the true typed points
    tp_x, tp_y = [], []
    for img, name in zip(va_imgs, va_names):
        pts = read_point_csv(CRC / "points" / f"{name}.csv")
        cl = pts.encode(vocab)
        tp_x.append(cut(img, pts.xy_px[cl >= 0], CRCHISTO_MPP))
        tp_y.append(cl[cl >= 0])
    pp, _ = run_typer(typer, tp_x)
    res["true_points_weighted_f1"], res["true_points_per_class_f1"] = weighted_f1(
        np.concatenate(tp_y), np.concatenate(pp).argmax(1), c)
    # rejection on the fully annotated validation tiles and on CMU-1
    inst_r = run_typer(typer, [cut(img, ex.centroids, ex.mpp)
                               for ex, (img, _) in zip(inst_va, va_loaded)])[1]
    (cmu_r,) = run_typer(typer, [cut(cmu_reg["image"], cmu_all.centroids, cmu_all.mpp)])[1]
    inside = cmu_all.target == REJECT
    res["reject"] = []
    for thr in THRESHOLDS:
        a, p = [], []
        for ex, rj, (_, gt) in zip(inst_va, inst_r, va_loaded):
            lab = drop_instances(ex.labels, np.ones(len(rj), bool) if thr is None else rj <= thr)
            a.append(aji(gt, lab))
            p.append(panoptic_quality(gt, lab)["pq"])
        k = np.ones(len(cmu_r), bool) if thr is None else cmu_r <= thr
        res["reject"].append({"reject_threshold": thr, "val_aji": round(float(np.mean(a)), 4),
                              "val_pq": round(float(np.mean(p)), 4), "cmu_inside_negatives": int((k & inside).sum()),
                              "cmu_outside": int((k & ~inside).sum())})
        print(res["reject"][-1], flush=True)
    # cost: the typer on 1,528 nuclei (the type head's cost window count), as the segmenter runs it
    img = va_imgs[0]
    cen = np.random.default_rng(1).uniform(20, min(img.shape[:2]) - 20, (1528, 2))
    typer.predict(img, cen[:64], CRCHISTO_MPP)
    t = time.perf_counter()
    typer.predict(img, cen, CRCHISTO_MPP)
    res["typer_s_1528_nuclei_torch_fp32_2_threads"] = round(time.perf_counter() - t, 3)
    res["typer_engine"] = typer.use_engine("auto")  # as the segmenter runs it (OpenVINO bf16 where it can)
    typer.predict(img, cen[:64], CRCHISTO_MPP)
    t = time.perf_counter()
    typer.predict(img, cen, CRCHISTO_MPP)
    res["typer_s_1528_nuclei_engine"] = round(time.perf_counter() - t, 3)
    res["total_s"] = round(time.time() - t0)
    result_path(args.tag).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k not in ("rules", "per_epoch")}))
    return 0


def result_path(tag: str) -> Path:
    """``results/patch_typer.json``, or ``patch_typer_<tag>.json`` for a variant."""
    return RESULT.with_name(f"patch_typer_{tag}.json") if tag else RESULT


def compose(args, cfg) -> int:
    """The shipped default network and type head + the trained typer -> ``cellsam_quality.pt``
    (``--into default``: -> ``cellsam_default.pt``, the lite model with its own small typer)."""
    rule, thr = args.compose
    saved = torch.load(args.state, map_location="cpu", weights_only=True)
    cfg = {**saved["cfg"], "combine": rule, "reject_threshold": None if thr == "none" else float(thr)}
    model, meta = load_checkpoint(DEFAULT_WEIGHTS)
    model.arch = {**model.arch, "patch_typer": cfg}
    model.patch_typer = PatchTyper(cfg)
    model.patch_typer.load_state_dict(saved["state_dict"])
    meta = {**meta, "patch_typer_training": {"script": "benchmarks/train_patch_typer.py",
                                             "results": f"benchmarks/results/{result_path(args.tag).name}"}}
    out = DEFAULT_WEIGHTS if args.into == "default" else QUALITY
    if out == QUALITY:
        meta["name"] = "quality"
    save_checkpoint(out, model.eval(), meta)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
