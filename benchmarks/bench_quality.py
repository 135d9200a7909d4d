"""The shipped models side by side, as users run them: ``default`` (lite) against ``quality``,
and the lite model without its small patch typer (``lite_no_typer``, the default until 2026-12-03).

    python benchmarks/bench_quality.py [--reps 5]   # -> benchmarks/results/quality_model.{json,md}

Both are loaded with :func:`pipeline.model.load_model` and their default engine (what ``cellsam
segment --model NAME`` runs), then:

* held-out CRCHisto (the 16 ``CRCHISTO_VAL_TILES``, 0.55 µm/px, 3.3 µm matching radius):
  detection P / R / F1, support-weighted type F1, type accuracy and the confusion matrix;
* MoNuSeg/CPM validation (6 tiles at their own µm/px): AJI, PQ, Dice;
* the patch typers alone on 1,528 centroids of that window, in torch fp32 and with their default engine;
* cost: ``segment_batch`` on the 1216² real-tissue CMU-1 window of the type head's cost benchmark
  (at the models' 0.5 µm/px: 0.37 mm²), the models interleaved ``--reps`` times on the same
  machine; medians as s per window, Mpx/s and s/mm².
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
CRC = DATA / "nuclei" / "crchisto"

from pipeline.data.classes import ClassVocabulary, read_point_csv  # noqa: E402
from pipeline.data.datasets import builtin_samples, split_samples  # noqa: E402
from pipeline.data.readers import read_image  # noqa: E402
from pipeline.metrics import (aggregate, aggregate_point_counts, evaluate_pair, matched_classification,  # noqa: E402
                              point_counts, point_scores)
from pipeline.model import load_model  # noqa: E402
from pipeline.model.typehead import centroids_xy  # noqa: E402
from pipeline.training.typehead import CRCHISTO_MPP, CRCHISTO_VAL_TILES, POINT_RADIUS_UM  # noqa: E402

MODELS = ("lite_no_typer", "default", "quality")
#: ``lite_no_typer``: the default model with its patch typer removed (the default until 2026-12-03 evening)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    import openslide

    vocab = ClassVocabulary.crchisto()
    segs = {m: load_model("default" if m == "lite_no_typer" else m, device="cpu") for m in MODELS}
    segs["lite_no_typer"].patch_typer = None
    segs["lite_no_typer"].metadata["patch_typer_engine"] = None
    res = {"models": {m: {"engine": s.metadata["engine"], "precision": s.metadata["precision"],
                          "patch_typer_engine": s.metadata.get("patch_typer_engine")} for m, s in segs.items()}}
    names = sorted(CRCHISTO_VAL_TILES, key=lambda s: (len(s), s))
    tiles = [(read_image(CRC / "images" / f"{n}.png")[..., :3], read_point_csv(CRC / "points" / f"{n}.csv"))
             for n in names]
    _, va = split_samples(builtin_samples(DATA / "nuclei"))
    loaded = [(s, *s.load()) for s in va]
    for m, seg in segs.items():
        rows = []
        for img, pts in tiles:
            lab, _, probs = seg.segment(img, CRCHISTO_MPP)
            rows.append(point_counts(pts.xy_px, centroids_xy(lab), POINT_RADIUS_UM / CRCHISTO_MPP, pts.encode(vocab),
                                     probs.argmax(1) if len(probs) else np.zeros(0, np.int64), len(vocab)))
        sc = point_scores(aggregate_point_counts(rows))
        out = res["models"][m]
        out["crchisto_val"] = {"det_precision": round(sc["precision"], 4), "det_recall": round(sc["recall"], 4),
                               "det_f1": round(sc["f1"], 4), "weighted_type_f1": round(sc["weighted_f1"], 4),
                               "type_accuracy": round(sc["type_accuracy"], 4),
                               "classification_alone": round(matched_classification(
                                   aggregate_point_counts(rows)["confusion"])["weighted_f1"], 4),
                               "class_f1": {c: round(float(v), 4) for c, v in zip(vocab.names, sc["class_f1"])},
                               "confusion": np.asarray(aggregate_point_counts(rows)["confusion"]).tolist()}
        per = [evaluate_pair(gt, seg.segment(img, smp.mpp)[0]) for smp, img, gt in loaded]
        agg = aggregate(per)
        out["validation"] = {k: round(float(agg[k]), 4) for k in ("aji", "pq", "dice")}
        print(m, out["crchisto_val"]["det_f1"], out["crchisto_val"]["weighted_type_f1"], out["validation"], flush=True)
    sl = openslide.OpenSlide(str(DATA / "slides" / "CMU-1-Small-Region.svs"))
    win = np.asarray(sl.read_region((600, 1400), 0, (1216, 1216)).convert("RGB"))
    times = {m: [] for m in MODELS}
    for seg in segs.values():
        seg.segment_batch(win[None])  # warm-up
    for _ in range(args.reps):
        for m, seg in segs.items():
            t0 = time.perf_counter()
            lab = seg.segment_batch(win[None])[0][0]
            times[m].append(time.perf_counter() - t0)
    mm2 = win.shape[0] * win.shape[1] * 0.5 ** 2 / 1e6
    for m in MODELS:
        s = float(np.median(times[m]))
        res["models"][m]["cost"] = {"s_per_window": round(s, 3), "mpx_per_s": round(win.shape[0] * win.shape[1] / s / 1e6, 3),
                                    "s_per_mm2": round(s / mm2, 3)}
    res["cost_window"] = {"slide": "CMU-1-Small-Region.svs", "origin_xy": [600, 1400], "size_px": 1216, "mm2": round(mm2, 4),
                          "instances": int(lab.max()), "reps": args.reps}
    # the typers alone, as the segmenter runs them, and in torch fp32: 1,528 nuclei (the window's count)
    cen = np.random.default_rng(1).uniform(20, win.shape[0] - 20, (1528, 2))
    res["typer_s_1528_nuclei"] = {}
    for m in ("default", "quality"):
        ty = segs[m].patch_typer
        row = {}
        for eng in ("torch", "auto"):
            name = ty.use_engine(eng)
            ty.predict(win, cen, 0.5)  # warm-up (compiles the padded shape)
            ts = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                ty.predict(win, cen, 0.5)
                ts.append(time.perf_counter() - t0)
            row[name] = round(float(np.median(ts)), 4)
        res["typer_s_1528_nuclei"][m] = row
    res["quality_over_default_time"] = round(float(np.median(np.asarray(times["quality"]) / np.asarray(times["default"]))), 3)
    res["default_over_lite_no_typer_time"] = round(float(np.median(
        np.asarray(times["default"]) / np.asarray(times["lite_no_typer"]))), 3)
    out = ROOT / "benchmarks" / "results" / "quality_model"
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    lines = ["| model | CRCHisto det P / R / F1 | weighted type F1 | type accuracy | classification alone | "
             "val AJI / PQ / Dice | s per 1216² window | Mpx/s | s/mm² |", "|---|---|---|---|---|---|---|---|---|"]
    for m in MODELS:
        r = res["models"][m]
        c, v, k = r["crchisto_val"], r["validation"], r["cost"]
        lines.append(f"| {m} | {c['det_precision']} / {c['det_recall']} / {c['det_f1']} | {c['weighted_type_f1']} | "
                     f"{c['type_accuracy']} | {c['classification_alone']} | {v['aji']} / {v['pq']} / {v['dice']} | {k['s_per_window']} | "
                     f"{k['mpx_per_s']} | {k['s_per_mm2']} |")
    lines.append(f"\nquality / default time per window (median of paired ratios): {res['quality_over_default_time']}; "
                 f"default / lite_no_typer: {res['default_over_lite_no_typer_time']}")
    lines.append(f"\npatch typer alone, 1,528 nuclei of the window (s): {res['typer_s_1528_nuclei']}")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
