"""Engine x precision benchmark: speed and parity of every installed inference engine.

Writes ``benchmarks/results/engines.json`` + ``engines.md``. All ratios are measured in one run,
interleaved (A, B, C, A, B, C, ...), against ``--engine torch --precision fp32`` (the reference).

``forward``
    The network alone (``Segmenter.forward``) on one real-tissue window of the pipeline's size
    (1216² px = chunk 1024 + 2 x halo 96; validation tiles resampled to 0.5 µm/px and tiled), and
    ``segment_batch`` (network + watershed decoding): median seconds, Mpx/s, speed-up.
``parity``
    On the 6 validation tiles (``pipeline.data.datasets.split_samples``, each at its own µm/px as
    ``cellsam predict --mpp`` runs it): nucleus-level F1 of each engine's instances against the
    reference's at IoU 0.5 (budget >= 0.995), and the validation AJI against the ground truth
    (budget: within 0.005 of the reference's).
``e2e``
    ``cellsam segment`` on the 10k² benchmark slide (``benchmarks/make_slide.py``), reference vs
    the default engine (``auto``), interleaved ``--e2e-repeats`` times: wall, s/mm², overhead
    ratio, peak RSS, CPU share (``benchmarks/run.py`` measurement).

Usage::

    python benchmarks/engines.py [--quick] [--skip-e2e] [--e2e-size 10000] [--e2e-repeats 1]
        [--repeats 5] [--threads 2] [--out benchmarks/results/engines.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from pipeline.data.datasets import builtin_samples, resample_pair, split_samples  # noqa: E402
from pipeline.metrics import aji, object_scores  # noqa: E402
from pipeline.model import load_model  # noqa: E402
from pipeline.model.engine import available  # noqa: E402

SHARED = Path(os.environ.get("CELLSAM_SHARED_DATA", ROOT.parent / "shared" / "data"))
COMBOS = (("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16"))
REFERENCE = ("torch", "fp32")
PARITY_F1 = 0.995
PARITY_AJI = 0.005
log = logging.getLogger("benchmarks.engines")


def _label(engine: str, precision: str) -> str:
    return f"{engine}/{precision}"


def tissue_window(mpp: float, size: int) -> np.ndarray:
    """``uint8 (size, size, 3)``: a validation tile resampled to ``mpp``, tiled to ``size``²."""
    s = split_samples(builtin_samples(SHARED / "nuclei"))[1][0]
    img, _ = s.load()
    img, _ = resample_pair(img, np.zeros(img.shape[:2], np.uint32), s.mpp / mpp)
    reps = int(np.ceil(size / min(img.shape[:2])))
    return np.ascontiguousarray(np.tile(img, (reps, reps, 1))[:size, :size])


def forward_bench(segs: dict, repeats: int, size: int) -> dict:
    ref = segs[_label(*REFERENCE)]
    win = tissue_window(ref.mpp, size)[None]
    for seg in segs.values():  # warm-up (lazy init, OpenVINO's compile for this shape)
        seg.forward(win)
    fwd = {k: [] for k in segs}
    full = {k: [] for k in segs}
    for _ in range(repeats):
        for k, seg in segs.items():
            t = time.perf_counter()
            seg.forward(win)
            fwd[k].append(time.perf_counter() - t)
            t = time.perf_counter()
            seg.segment_batch(win)
            full[k].append(time.perf_counter() - t)
    mpx = size * size / 1e6
    rk = _label(*REFERENCE)
    out = {}
    for k in segs:
        f, g = statistics.median(fwd[k]), statistics.median(full[k])
        out[k] = {"forward_s": round(f, 4), "forward_mpx_per_s": round(mpx / f, 3),
                  "forward_speedup": round(statistics.median(fwd[rk]) / f, 3),
                  "with_decoding_s": round(g, 4), "with_decoding_mpx_per_s": round(mpx / g, 3),
                  "with_decoding_speedup": round(statistics.median(full[rk]) / g, 3)}
    return {"window_px": size, "repeats": repeats, "results": out}


def parity(segs: dict) -> dict:
    val = split_samples(builtin_samples(SHARED / "nuclei"))[1]
    rk = _label(*REFERENCE)
    per = {k: {} for k in segs}
    for s in val:
        img, gt = s.load()
        ref_lab = segs[rk].segment(img, s.mpp)[0]
        for k, seg in segs.items():
            lab = ref_lab if k == rk else seg.segment(img, s.mpp)[0]
            per[k][s.name] = {"f1_vs_reference": float(object_scores(ref_lab, lab)["obj_f1"]),
                              "aji": float(aji(gt, lab))}
    out = {}
    ref_aji = float(np.mean([v["aji"] for v in per[rk].values()]))
    for k, rows in per.items():
        f1 = float(np.mean([v["f1_vs_reference"] for v in rows.values()]))
        f1_min = float(min(v["f1_vs_reference"] for v in rows.values()))
        a = float(np.mean([v["aji"] for v in rows.values()]))
        out[k] = {"f1_vs_reference_mean": round(f1, 4), "f1_vs_reference_min": round(f1_min, 4),
                  "aji": round(a, 4), "aji_diff": round(a - ref_aji, 4),
                  "within_budget": bool(f1_min >= PARITY_F1 and abs(a - ref_aji) <= PARITY_AJI),
                  "per_tile": {n: {kk: round(vv, 4) for kk, vv in v.items()} for n, v in rows.items()}}
    return {"tiles": [s.name for s in val], "budget": {"f1_min": PARITY_F1, "aji_abs_diff": PARITY_AJI},
            "results": out}


def e2e_bench(size: int, repeats: int, default_label: str, workdir: Path) -> dict:
    import make_slide
    import run as suite

    slide, info = make_slide.ensure_slide(size) if hasattr(make_slide, "ensure_slide") else (None, None)
    if slide is None:
        raise SystemExit("benchmarks/make_slide.py has no ensure_slide()")
    args = argparse.Namespace(device="cpu", batch_size=None, workers=None, keep=False)
    variants = {"torch/fp32": ("--engine", "torch", "--precision", "fp32"), f"auto ({default_label})": ()}
    runs = {k: [] for k in variants}
    for _ in range(repeats):
        for k, extra in variants.items():
            runs[k].append(suite.e2e(Path(slide), info, "default", args, workdir, extra=extra,
                                     tag="_" + k.split(" ")[0].replace("/", "_")))
    out = {}
    for k, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            out[k] = {"error": rs[-1].get("error")}
            continue
        med = lambda key: statistics.median(r[key] for r in ok if r.get(key) is not None)  # noqa: E731
        out[k] = {"wall_s": round(med("wall_s"), 2), "s_per_mm2": round(med("s_per_mm2"), 3),
                  "overhead_ratio": round(med("overhead_ratio"), 3), "peak_rss_gb": round(med("peak_rss_gb"), 3),
                  "cpu_share": round(med("cpu_share"), 3), "tissue_area_mm2": ok[0]["tissue_area_mm2"],
                  "nuclei": ok[0]["nuclei"], "model_s": ok[0]["timings_s"].get("model_s"),
                  "runs_wall_s": [r["wall_s"] for r in ok]}
    keys = list(out)
    if all("wall_s" in out[k] for k in keys):
        out["speedup_wall"] = round(out[keys[0]]["wall_s"] / out[keys[1]]["wall_s"], 3)
    return {"slide_px": size, "repeats": repeats, "results": out}


def markdown(res: dict) -> str:
    lines = [f"Machine: {res['machine']}", ""]
    f = res.get("forward")
    p = res.get("parity")
    if f:
        lines += [f"Forward on a {f['window_px']}² real-tissue window, median of {f['repeats']} interleaved runs; "
                  f"parity on the {len(p['tiles']) if p else 0} validation tiles against torch/fp32 "
                  f"(budget: nucleus F1 >= {PARITY_F1} on every tile, |Δ AJI| <= {PARITY_AJI}).", "",
                  "| engine/precision | forward s | forward Mpx/s | x torch | + decoding Mpx/s | x torch | "
                  "nucleus F1 vs torch (min) | AJI | Δ AJI | in budget |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for k, r in f["results"].items():
            q = (p or {}).get("results", {}).get(k, {})
            lines.append(f"| {k} | {r['forward_s']:.3f} | {r['forward_mpx_per_s']:.2f} | {r['forward_speedup']:.2f} | "
                         f"{r['with_decoding_mpx_per_s']:.2f} | {r['with_decoding_speedup']:.2f} | "
                         f"{q.get('f1_vs_reference_min', float('nan')):.4f} | {q.get('aji', float('nan')):.4f} | "
                         f"{q.get('aji_diff', float('nan')):+.4f} | {'yes' if q.get('within_budget') else 'no'} |")
    e = res.get("e2e")
    if e:
        lines += ["", f"End to end, `cellsam segment` on the {e['slide_px']}² benchmark slide "
                  f"({e['repeats']} interleaved run(s) each):", "",
                  "| engine | wall s | s/mm² | overhead ratio | peak RSS GB | CPU share | nuclei |", "|---|---|---|---|---|---|---|"]
        for k, r in e["results"].items():
            if isinstance(r, dict) and "wall_s" in r:
                lines.append(f"| {k} | {r['wall_s']:.1f} | {r['s_per_mm2']:.2f} | {r['overhead_ratio']:.3f} | "
                             f"{r['peak_rss_gb']:.2f} | {r['cpu_share']:.2f} | {r['nuclei']} |")
        if "speedup_wall" in e["results"]:
            lines += ["", f"End-to-end speed-up of the default over torch/fp32: **{e['results']['speedup_wall']:.2f}x**"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 repeats, no end-to-end run")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--skip-parity", action="store_true")
    ap.add_argument("--e2e-size", type=int, default=10_000)
    ap.add_argument("--e2e-repeats", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--window", type=int, default=1216)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "engines.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats, args.skip_e2e = 3, True
    combos = [c for c in COMBOS if available(c[0])]
    segs = {_label(e, p): load_model(device="cpu", engine=e, precision=p) for e, p in combos}
    default = load_model(device="cpu")
    default_label = _label(default.engine.name, default.engine.precision)
    del default
    load = os.getloadavg()
    res = {"machine": f"{os.cpu_count()} CPUs visible, {args.threads} threads, torch {torch.__version__}, "
                      f"load average {load[0]:.2f} at start", "default_engine": default_label,
           "combos": [_label(*c) for c in combos]}
    log.info("forward: %s", ", ".join(segs))
    res["forward"] = forward_bench(segs, args.repeats, args.window)
    if not args.skip_parity:
        log.info("parity on the validation tiles")
        res["parity"] = parity(segs)
    del segs
    if not args.skip_e2e:
        with tempfile.TemporaryDirectory(prefix="cellsam-engines-") as tmp:
            res["e2e"] = e2e_bench(args.e2e_size, args.e2e_repeats, default_label, Path(tmp))
    res["loadavg_end"] = round(os.getloadavg()[0], 2)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    md = markdown(res)
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
