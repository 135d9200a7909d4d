"""``cellsam evaluate``: score predicted nucleus label images against ground truth.

Usage::

    cellsam evaluate --pred PRED_DIR --truth TRUTH_DIR [-o RESULT.json]
                     [--baseline IMAGES_DIR --baseline-mpp MPP]

Files are paired by stem: ``PRED_DIR/X.tif`` (or ``.tiff``/``.png``, uint label image) with
``TRUTH_DIR/X.tif|.tiff|.png`` (label image) or ``TRUTH_DIR/X.xml`` (MoNuSeg / Aperio ImageScope
polygons, rasterised at the shape of the predicted label image). Every file must have a partner.

Prints a fixed-width table (one row per image, then the mean over images) and optionally writes
JSON (sorted keys, atomically)::

    {"schema_version": 1, "pred_dir": ..., "truth_dir": ...,
     "per_image": {stem: {metric: value, "pred": file name, "truth": file name}},
     "overall": pipeline.metrics.aggregate(per_image),
     "baseline": {"images_dir", "mpp", "per_image", "overall"},          # with --baseline
     "comparison": {metric: {"pred", "baseline", "delta"}}}              # with --baseline

``--baseline`` runs :func:`pipeline.baseline.segment_classical` on ``IMAGES_DIR/X.*`` (RGB,
matched by stem, pixel size ``--baseline-mpp`` µm/px) and scores it against the same truth.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
PRED_EXTS = (".tif", ".tiff", ".png")
TRUTH_EXTS = (".tif", ".tiff", ".png", ".xml")
IMAGE_EXTS = (".tif", ".tiff", ".png", ".jpg", ".jpeg")

#: (JSON key, column header) of the printed table
COLUMNS = (
    ("aji", "AJI"),
    ("pq", "PQ"),
    ("dq", "DQ"),
    ("sq", "SQ"),
    ("obj_precision", "objP"),
    ("obj_recall", "objR"),
    ("obj_f1", "objF1"),
    ("dice", "Dice"),
    ("pixel_accuracy", "pxAcc"),
    ("pixel_precision", "pxPrec"),
    ("pixel_recall", "pxRec"),
    ("mean_class_accuracy", "mAcc"),
)


def register(sub):
    p = sub.add_parser(
        "evaluate",
        help="score predicted label images against ground truth (AJI, PQ, Dice, ...)",
        description="Pair PRED/X.tif with TRUTH/X.{tif,tiff,png,xml} by stem and report instance and pixel metrics.",
    )
    p.add_argument("--pred", required=True, metavar="DIR", help="predicted instance label images (TIFF/PNG)")
    p.add_argument("--truth", required=True, metavar="DIR", help="ground truth: label images or MoNuSeg XML")
    p.add_argument("-o", "--output", metavar="RESULT.json", help="write all results as JSON")
    p.add_argument("--baseline", metavar="IMAGES_DIR", help="also score the classical segmenter on these RGB images")
    p.add_argument("--baseline-mpp", type=float, metavar="MPP", help="µm/px of the --baseline images (required with it)")
    p.set_defaults(func=run)


def _files_by_stem(directory: Path, exts: tuple[str, ...], what: str) -> dict[str, Path]:
    from ..errors import InputError

    if not directory.is_dir():
        raise InputError(f"{directory}: {what} directory does not exist")
    out: dict[str, Path] = {}
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".") or not path.is_file() or path.suffix.lower() not in exts:
            continue
        stem = path.stem
        if stem in out:
            raise InputError(f"{directory}: two {what} files for {stem!r} ({out[stem].name}, {path.name}); keep one")
        out[stem] = path
    if not out:
        raise InputError(f"{directory}: no {what} files ({', '.join(exts)})")
    return out


def _unpaired(a: dict, b: dict, a_dir: Path, b_dir: Path, b_what: str) -> None:
    from ..errors import InputError

    missing = sorted(set(a) - set(b))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise InputError(f"{a_dir / a[missing[0]].name}: no {b_what} with stem {missing[0]!r} in {b_dir}{more}")


def pair_files(pred_dir, truth_dir) -> list[tuple[str, Path, Path]]:
    """Pair prediction and truth files by stem.

    Returns
    -------
    list of (stem, pred_path, truth_path), sorted by stem.

    Raises
    ------
    InputError
        For a missing/empty directory, duplicate stems or a file without a partner.
    """
    pred_dir, truth_dir = Path(pred_dir), Path(truth_dir)
    preds = _files_by_stem(pred_dir, PRED_EXTS, "prediction")
    truths = _files_by_stem(truth_dir, TRUTH_EXTS, "ground-truth")
    _unpaired(preds, truths, pred_dir, truth_dir, "ground truth")
    _unpaired(truths, preds, truth_dir, pred_dir, "prediction")
    return [(s, preds[s], truths[s]) for s in sorted(preds)]


def _read_truth(path: Path, shape_rc):
    from ..data.readers import read_labels, read_monuseg_xml
    from ..errors import InputError

    if path.suffix.lower() == ".xml":
        return read_monuseg_xml(path, shape_rc)
    truth = read_labels(path)
    if truth.shape != tuple(shape_rc):
        raise InputError(f"{path}: ground truth shape {truth.shape} differs from the prediction's {tuple(shape_rc)}")
    return truth


def evaluate_dirs(pred_dir, truth_dir, baseline_dir=None, baseline_mpp=None) -> dict:
    """Score every prediction against its ground truth (and optionally the classical baseline).

    Parameters
    ----------
    pred_dir, truth_dir : path
        See the module docstring.
    baseline_dir : path, optional
        RGB images (matched by stem) to run :func:`pipeline.baseline.segment_classical` on.
    baseline_mpp : float, optional
        µm/px of the baseline images; required with ``baseline_dir``.

    Returns
    -------
    dict
        The JSON document described in the module docstring.

    Raises
    ------
    InputError
        For missing directories, unpaired files, unreadable files or shape mismatches.
    """
    from ..data.readers import read_image, read_labels
    from ..errors import InputError
    from ..metrics import SCORE_KEYS, aggregate, evaluate_pair

    if baseline_dir is not None and (baseline_mpp is None or not baseline_mpp > 0):
        raise InputError(f"--baseline {baseline_dir} needs --baseline-mpp (µm/px of those images, > 0)")
    pairs = pair_files(pred_dir, truth_dir)
    images = None
    if baseline_dir is not None:
        images = _files_by_stem(Path(baseline_dir), IMAGE_EXTS, "image")
        _unpaired({s: p for s, p, _ in pairs}, images, Path(pred_dir), Path(baseline_dir), "image")
    per_image: dict[str, dict] = {}
    base_per_image: dict[str, dict] = {}
    for stem, pred_path, truth_path in pairs:
        pred = read_labels(pred_path)
        truth = _read_truth(truth_path, pred.shape)
        row = evaluate_pair(truth, pred)
        row.update(pred=pred_path.name, truth=truth_path.name)
        per_image[stem] = row
        log.info("%s: AJI %.4f PQ %.4f (%d true, %d predicted)", stem, row["aji"], row["pq"], row["n_true"], row["n_pred"])
        if images is not None:
            from ..baseline import segment_classical

            image = read_image(images[stem])
            if image.shape[:2] != truth.shape:
                raise InputError(f"{images[stem]}: image shape {image.shape[:2]} differs from the ground truth's {truth.shape}")
            labels, _ = segment_classical(image, baseline_mpp)
            brow = evaluate_pair(truth, labels)
            brow.update(image=images[stem].name, truth=truth_path.name)
            base_per_image[stem] = brow
    doc = {
        "schema_version": SCHEMA_VERSION,
        "pred_dir": str(pred_dir),
        "truth_dir": str(truth_dir),
        "per_image": per_image,
        "overall": aggregate(per_image),
    }
    if images is not None:
        base_overall = aggregate(base_per_image)
        doc["baseline"] = {
            "method": "classical H-channel Otsu + distance-transform watershed (pipeline.baseline)",
            "images_dir": str(baseline_dir),
            "mpp": float(baseline_mpp),
            "per_image": base_per_image,
            "overall": base_overall,
        }
        doc["comparison"] = {
            key: {
                "pred": doc["overall"][key],
                "baseline": base_overall[key],
                "delta": doc["overall"][key] - base_overall[key],
            }
            for key in (*SCORE_KEYS, "aji_pooled", "pq_pooled")
        }
    return doc


def format_table(per_image: dict, overall: dict, title: str = "") -> str:
    """Fixed-width text table: one row per image, then "overall" (score means, count sums) and pooled AJI/PQ."""
    width = max([len("image"), len("overall"), *(len(s) for s in per_image)])
    head = f"{'image':<{width}} " + " ".join(f"{h:>6}" for _, h in COLUMNS) + f" {'n_true':>7} {'n_pred':>7}"
    lines = [title] if title else []
    lines += [head, "-" * len(head)]

    def row(name, r):
        return f"{name:<{width}} " + " ".join(f"{r[k]:6.4f}" for k, _ in COLUMNS) + f" {r['n_true']:7d} {r['n_pred']:7d}"

    lines += [row(s, r) for s, r in per_image.items()]
    lines += ["-" * len(head), row("overall", overall)]
    lines.append(f"{overall['n_images']} images; pooled AJI {overall['aji_pooled']:.4f}, pooled PQ {overall['pq_pooled']:.4f}")
    return "\n".join(lines) + "\n"


def _write_json_atomic(doc: dict, path: Path) -> None:
    from ..paths import atomic_write

    text = json.dumps(doc, sort_keys=True, indent=1, allow_nan=False, ensure_ascii=False) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), "results")


def run(args) -> int:
    doc = evaluate_dirs(args.pred, args.truth, args.baseline, args.baseline_mpp)
    out = format_table(doc["per_image"], doc["overall"], "prediction")
    if "baseline" in doc:
        b = doc["baseline"]
        out += "\n" + format_table(b["per_image"], b["overall"], f"classical baseline ({b['mpp']} µm/px)")
        c = doc["comparison"]
        out += "\nprediction - baseline (mean): " + "  ".join(f"{h} {c[k]['delta']:+.4f}" for k, h in COLUMNS) + "\n"
    sys.stdout.write(out)
    if args.output:
        _write_json_atomic(doc, Path(args.output))
        log.info("wrote %s", args.output)
    return 0
