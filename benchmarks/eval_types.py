"""Nucleus detection and typing on held-out CRCHisto tiles (point protocol), and the type head's cost.

    python benchmarks/eval_types.py [--model CKPT] [--fit] [--write OUT.pt] [--curve] [--cost]

* scores the checkpoint's own type head (or, with ``--fit``, a head fitted here on the 64 training
  tiles with the segmenter frozen, as the shipped head was) on the 16 held-out tiles
  (``CRCHISTO_VAL_TILES``): detection precision / recall / F1, per-class and support-weighted type
  F1, type accuracy on matched points, the confusion matrix (3.3 µm matching,
  :func:`pipeline.metrics.point_scores`);
* ``--write OUT.pt``: the checkpoint with the fitted head attached;
* ``--curve``: weighted type F1 against the number of training tiles (1, 2, 5, 10, 40, 64);
* ``--cost``: ``segment_batch`` time on a 1216² real-tissue window with and without the head
  (default engine, interleaved, median of 7).

Results: ``benchmarks/results/types.{json,md}`` (``--tag`` names a variant: ``types_<tag>.*``).
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
from pipeline.metrics import matched_classification  # noqa: E402
from pipeline.model.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from pipeline.model.postprocess import instances_from_maps  # noqa: E402
from pipeline.model.segmenter import Segmenter  # noqa: E402
from pipeline.training.typehead import (CRCHISTO_VAL_TILES, DEFAULT_GROUPS, crchisto_examples, fit_head,  # noqa: E402
                                        score_tiles, stage2_radii_for, with_type_head)


def tile_names(root: Path) -> list[str]:
    return sorted((p.stem for p in (root / "images").glob("*.png")), key=lambda s: (len(s), s))


def summary(res: dict, classes) -> dict:
    out = {k: round(float(res[k]), 4) for k in ("precision", "recall", "f1")}
    if "weighted_f1" in res:
        out.update(weighted_type_f1=round(res["weighted_f1"], 4), type_accuracy=round(res["type_accuracy"], 4),
                   class_f1={c: round(float(v), 4) for c, v in zip(classes, res["class_f1"])})
    return out


def cost(model, meta, image, reps: int = 15) -> dict:
    """Head overhead on one window: ``segment_batch`` with and without the head, interleaved in
    pairs; the overhead is the median of the per-pair ratios (drift of a shared machine cancels
    within a pair), with the medians and the classify step timed alone alongside."""
    with_head = Segmenter(model, meta, device="cpu")
    bare_model = type(model)({**model.arch, "type_head": None})
    bare_model.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("type_head.")},
                               strict=False)
    bare = Segmenter(bare_model, meta, device="cpu")
    t = {"head": [], "bare": [], "classify": []}
    for seg in (with_head, bare):
        seg.segment_batch(image[None])  # warm-up (static-shape compile)
    out = with_head.forward(image[None])
    lab, sc = instances_from_maps(out["prob"][0], out["hv"][0], with_head.mpp, with_head.params)
    for _ in range(reps):
        for name, seg in (("bare", bare), ("head", with_head)):
            t0 = time.perf_counter()
            seg.segment_batch(image[None])
            t[name].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with_head.classify(image, lab, sc, out["embed"], with_head.mpp)
        t["classify"].append(time.perf_counter() - t0)
    b, h, c = (float(np.median(t[k])) for k in ("bare", "head", "classify"))
    pair = float(np.median(np.asarray(t["head"]) / np.asarray(t["bare"]))) - 1
    return {"engine": with_head.engine.name, "precision": with_head.engine.precision, "reps": reps,
            "instances": int(lab.max()), "bare_s": round(b, 4), "head_s": round(h, 4), "classify_s": round(c, 4),
            "overhead": round(pair, 4), "overhead_of_medians": round(h / b - 1, 4),
            "classify_over_bare": round(c / b, 4)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "pipeline" / "weights" / "cellsam_default.pt"))
    ap.add_argument("--fit", action="store_true", help="fit a new head on the 64 training tiles")
    ap.add_argument("--write", help="write the checkpoint with the fitted head here")
    ap.add_argument("--curve", action="store_true")
    ap.add_argument("--cost", action="store_true")
    ap.add_argument("--reject-threshold", type=float, default=None, help="apply rejection at this p (default off)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--groups", default=None,
                    help="feature groups of a fitted head, comma-separated (default: the training default)")
    ap.add_argument("--stage2", default=None,
                    help="box half-sides (µm, comma-separated) of a fitted head's second stage; 'none' = one stage "
                         "(default: the training default)")
    args = ap.parse_args(argv)
    root = DATA / "nuclei" / "crchisto"
    model, meta = load_checkpoint(args.model)
    vocab = ClassVocabulary.crchisto()
    seg = Segmenter(model, meta, device="cpu", engine="torch")
    names = tile_names(root)
    train_names = [n for n in names if n not in CRCHISTO_VAL_TILES]
    val_names = [n for n in names if n in CRCHISTO_VAL_TILES]
    t0 = time.time()
    fitting = args.fit or args.curve or model.type_head is None
    groups = ((tuple(args.groups.split(",")) if args.groups else DEFAULT_GROUPS) if fitting
              else model.type_head.groups)
    radii = (None if args.stage2 is None else  # None: the training rule (stage2_radii_for)
             () if args.stage2 == "none" else tuple(float(r) for r in args.stage2.split(",")))
    val = crchisto_examples(seg, root, vocab, val_names, groups=groups)
    result = {"model": Path(args.model).name, "val_tiles": val_names, "radius_um": 3.3, "feature_groups": list(groups)}
    result["detection"] = summary(score_tiles(None, val, len(vocab), None), vocab.names)
    if fitting:
        train = crchisto_examples(seg, root, vocab, train_names, groups=groups)
        print(f"features of {len(train) + len(val)} tiles in {time.time() - t0:.0f} s", flush=True)
        head = fit_head(train, vocab.names, reject=True, colors=vocab.colors, groups=groups,
                        stage2_radii_um=stage2_radii_for(train) if radii is None else radii)
        result["stage2_radii_um"] = head.radii_um
        head.cfg["reject_threshold"] = args.reject_threshold
        model = with_type_head(model, head)
        if args.write:
            meta = {**meta, "type_head_training": {"data": "crchisto", "tiles": len(train_names),
                                                   "val_tiles": list(val_names)}}
            save_checkpoint(args.write, model, meta)
        if args.curve:
            curve = {}
            for n in (1, 2, 5, 10, 20, 40, len(train)):
                h = fit_head(train[:n], vocab.names, reject=True, groups=groups,
                             stage2_radii_um=stage2_radii_for(train[:n]) if radii is None else radii if n >= 2 else ())
                r = score_tiles(h, val, len(vocab), None)
                curve[n] = {"weighted_type_f1": round(r["weighted_f1"], 4), "type_accuracy": round(r["type_accuracy"], 4)}
                print("curve", n, curve[n], flush=True)
            result["curve"] = curve
    else:
        head = model.type_head
    if head is not None:
        res = score_tiles(head, val, len(vocab), args.reject_threshold)
        result["typed"] = summary(res, vocab.names)
        result["confusion"] = np.asarray(res.get("confusion", [])).tolist() if "confusion" in res else None
        if result["confusion"] is None:
            from pipeline.metrics import aggregate_point_counts, point_counts
            from pipeline.training.typehead import apply_head

            rows = []
            for ex in val:
                cen, cls = apply_head(head, ex, args.reject_threshold)
                rows.append(point_counts(ex.points_xy, cen, 3.3 / 0.55, ex.points_class, cls, len(vocab)))
            result["confusion"] = np.asarray(aggregate_point_counts(rows)["confusion"]).tolist()
    if result.get("confusion") is not None:
        result["matched_classification"] = matched_classification(result["confusion"])
    if args.cost and head is not None:
        import openslide

        sl = openslide.OpenSlide(str(DATA / "slides" / "CMU-1-Small-Region.svs"))
        img = np.asarray(sl.read_region((600, 1400), 0, (1216, 1216)).convert("RGB"))
        result["cost"] = cost(model, meta, img)
    print(json.dumps({k: v for k, v in result.items() if k != "val_tiles"}, indent=1))
    out = ROOT / "benchmarks" / "results" / (f"types_{args.tag}" if args.tag else "types")
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Types on held-out CRCHisto ({len(val_names)} tiles): {result['model']}", "",
             "| | precision | recall | F1 | weighted type F1 | type accuracy |", "|---|---|---|---|---|---|"]
    d = result["detection"]
    lines.append(f"| detection | {d['precision']} | {d['recall']} | {d['f1']} | | |")
    if "typed" in result:
        t = result["typed"]
        lines.append(f"| typed (reject {args.reject_threshold}) | {t['precision']} | {t['recall']} | {t['f1']} | "
                     f"{t['weighted_type_f1']} | {t['type_accuracy']} |")
        lines += ["", "Per-class F1: " + ", ".join(f"{c} {v}" for c, v in t["class_f1"].items())]
    if "matched_classification" in result:
        mc = result["matched_classification"]
        lines += ["", f"Classification alone on the {mc['pairs']} detected typed points (SC-CNN's setting): "
                      f"weighted F1 {mc['weighted_f1']}"]
    if "cost" in result:
        c = result["cost"]
        lines += ["", f"Cost ({c['engine']}/{c['precision']}, 1216² window): {c['bare_s']} s -> {c['head_s']} s "
                      f"(+{100 * c['overhead']:.1f} %)"]
    if "curve" in result:
        lines += ["", "| training tiles | " + " | ".join(str(k) for k in result["curve"]) + " |",
                  "|---" * (len(result["curve"]) + 1) + "|",
                  "| weighted type F1 | " + " | ".join(str(v["weighted_type_f1"]) for v in result["curve"].values()) + " |",
                  "| type accuracy | " + " | ".join(str(v["type_accuracy"]) for v in result["curve"].values()) + " |"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
