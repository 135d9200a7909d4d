"""The type head's "not a nucleus" output trained on fully annotated tiles and hand-drawn negatives.

    python benchmarks/eval_reject.py [--no-cmu] [--model CKPT] [--write OUT.pt] [--tag NAME]

The network (``--model``, default the shipped one) stays frozen. A type head is fitted (shipped recipe: stage 1 + stage 2,
``fit_head``) on three kinds of examples:

* the 64 CRCHisto training tiles: typed points give the class; instances touched only by an
  unlabelled point are nuclei of unknown class; instances no point touches are **ignored** (the
  points are sampled: most of those are real, unmarked nuclei);
* the MoNuSeg/CPM training split (every nucleus outlined): predicted instances matched to a
  ground-truth nucleus (IoU >= 0.5) are nuclei, those with at most 20 % of their pixels on any
  ground-truth nucleus are false detections: the reject class (``instance_targets``);
* unless ``--no-cmu``: the detections inside the hand-drawn negative regions of CMU-1 (keratin
  flakes, hair-shaft layers, debris) as more reject examples.

Then, for each reject threshold (instances with p_reject above it are removed), on data the head
never saw: MoNuSeg/CPM **validation** AJI / PQ (6 tiles, native µm/px), held-out CRCHisto detection
and type F1 (16 tiles, 3.3 µm), and on CMU-1 the detections inside / outside the negative regions
(inside is held out only with ``--no-cmu``). Results: ``benchmarks/results/reject[_<tag>].{json,md}``.
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
DATA = ROOT.parent / "shared" / "data"

from pipeline.data.classes import ClassVocabulary  # noqa: E402
from pipeline.data.datasets import builtin_samples, split_samples  # noqa: E402
from pipeline.metrics import aji, panoptic_quality  # noqa: E402
from pipeline.model.checkpoint import DEFAULT_WEIGHTS, load_checkpoint, save_checkpoint  # noqa: E402
from pipeline.model.segmenter import Segmenter  # noqa: E402
from pipeline.model.typehead import drop_instances  # noqa: E402
from pipeline.training.typehead import (CRCHISTO_VAL_TILES, IGNORE, REJECT, crchisto_examples, fit_head,  # noqa: E402
                                        instance_tile_examples, negative_region_examples, score_tiles,
                                        stage2_radii_for, with_type_head)

NEGATIVES = ROOT / "pipeline" / "data" / "negatives" / "cmu1_negatives.geojson"
THRESHOLDS = (None, 0.95, 0.9, 0.8, 0.7, 0.5)


def kept(rej: np.ndarray, thr) -> np.ndarray:
    """Boolean (K,) of the instances kept at reject threshold ``thr`` (None = all) given p_reject."""
    return np.ones(len(rej), bool) if thr is None else rej <= thr


def p_reject(head, ex) -> np.ndarray:
    return head.predict(ex.features, ex.centroids, ex.mpp)[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-cmu", action="store_true", help="do not train on the CMU-1 negative regions")
    ap.add_argument("--write", help="write the shipped network with this head here")
    ap.add_argument("--threshold", type=float, default=None, help="reject threshold stored with --write")
    ap.add_argument("--one-stage", action="store_true", help="fit without the second stage (ablation)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--model", default=str(DEFAULT_WEIGHTS), help="the frozen network (default: the shipped weights)")
    args = ap.parse_args(argv)
    t0 = time.time()
    model, meta = load_checkpoint(args.model)
    seg = Segmenter(model, meta, device="cpu", engine="torch")
    vocab = ClassVocabulary.crchisto()
    root = DATA / "nuclei" / "crchisto"
    names = sorted((p.stem for p in (root / "images").glob("*.png")), key=lambda s: (len(s), s))
    crc_tr = crchisto_examples(seg, root, vocab, [n for n in names if n not in CRCHISTO_VAL_TILES])
    for e in crc_tr:
        e.target[e.target == REJECT] = IGNORE  # sampled points: untouched instances are not negatives
    crc_va = crchisto_examples(seg, root, vocab, [n for n in names if n in CRCHISTO_VAL_TILES])
    tr_s, va_s = split_samples(builtin_samples(DATA / "nuclei"))
    inst_tr = instance_tile_examples(seg, tr_s)
    inst_va = instance_tile_examples(seg, va_s)
    truth_va = [s.load()[1] for s in va_s]
    cmu = [] if args.no_cmu else negative_region_examples(seg, NEGATIVES, DATA)
    (cmu_all,) = negative_region_examples(seg, NEGATIVES, DATA, margin_um=1e6)  # the whole slide
    train = crc_tr + inst_tr + cmu
    n_rej = sum(int((e.target == REJECT).sum()) for e in train)
    print(f"examples in {time.time() - t0:.0f} s: {len(train)} tiles, {n_rej} reject examples", flush=True)
    head = fit_head(train, vocab.names, reject=True, colors=vocab.colors,
                    stage2_radii_um=() if args.one_stage else stage2_radii_for(train))
    rej_va = [p_reject(head, ex) for ex in inst_va]
    rej_cmu = p_reject(head, cmu_all)
    inside = cmu_all.target == REJECT
    rows = []
    for thr in THRESHOLDS:
        a, p = [], []
        for ex, rej, gt in zip(inst_va, rej_va, truth_va):
            lab = drop_instances(ex.labels, kept(rej, thr))
            a.append(aji(gt, lab))
            p.append(panoptic_quality(gt, lab)["pq"])
        crc = score_tiles(head, crc_va, len(vocab), thr)
        k = kept(rej_cmu, thr)
        rows.append({"threshold": thr, "val_aji": round(float(np.mean(a)), 4), "val_pq": round(float(np.mean(p)), 4),
                     "crc_det_precision": round(crc["precision"], 4), "crc_det_recall": round(crc["recall"], 4),
                     "crc_det_f1": round(crc["f1"], 4), "crc_weighted_type_f1": round(crc["weighted_f1"], 4),
                     "cmu_inside_negatives": int((k & inside).sum()), "cmu_outside": int((k & ~inside).sum())})
        print(rows[-1], flush=True)
    res = {"train_tiles": len(train), "reject_examples": n_rej, "cmu_negatives_in_training": not args.no_cmu,
           "stage2_radii_um": list(head.radii_um), "rows": rows}
    out = ROOT / "benchmarks" / "results" / (f"reject_{args.tag}" if args.tag else "reject")
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    lines = ["| reject threshold | val AJI | val PQ | CRCHisto det P / R / F1 | CRCHisto weighted type F1 | "
             "CMU-1 inside negatives | CMU-1 outside |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['threshold'] if r['threshold'] is not None else 'off'} | {r['val_aji']} | {r['val_pq']} | "
              f"{r['crc_det_precision']} / {r['crc_det_recall']} / {r['crc_det_f1']} | {r['crc_weighted_type_f1']} | "
              f"{r['cmu_inside_negatives']} | {r['cmu_outside']} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.write:
        head.cfg["reject_threshold"] = args.threshold
        save_checkpoint(args.write, with_type_head(model, head), meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
