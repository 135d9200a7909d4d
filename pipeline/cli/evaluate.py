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

``--images DIR [--model CKPT] [--teacher SAM.pth] [--refine] [--mpp MPP]`` first segments every RGB
image ``DIR/X.*`` into ``PRED_DIR/X.tif`` (as ``cellsam predict`` does; ``--teacher`` runs a dual
checkpoint in dual mode), then scores those; the JSON adds ``"model"`` (file name, mode, refine,
teacher file name + sha256 — never a path).

Point scoring (nucleus centres, CRCHisto protocol)::

    cellsam evaluate --pred PRED_DIR --points POINTS_DIR --mpp MPP [--radius-um R]
                     [--classes NAME,NAME,...] [-o RESULT.json]

``POINTS_DIR/X.csv`` holds ground-truth points ``x_px,y_px,class`` (0-based pixels, x = column;
class ``unlabelled`` = detection only; see :mod:`pipeline.data.classes`). Predicted centres are
the rows of ``PRED_DIR/X.nuclei.csv`` (``label,centroid_x_px,centroid_y_px,...,class``, as
``cellsam predict`` writes) when it exists, else the centroids (pixel-centre mean, x = column)
of the labels of ``PRED_DIR/X.tif``. A centre matches a point within ``--radius-um``
(default :attr:`pipeline.config.EvaluateConfig.point_radius_um`; ``/ --mpp`` in pixels),
one-to-one (maximum matching, then minimum total distance: :func:`pipeline.metrics.match_points`).
Scores are pooled over images (summed counts). With predicted classes (a ``class`` column whose
values are not all ``Nucleus``) the report adds per-class precision/recall/F1, the
support-weighted F1 and the confusion matrix of matched pairs. Class names match
case-insensitively, and CRCHisto's ``epithelial, inflammatory, fibroblast, others`` match the
model's ``Epithelial, Inflammatory, Fibroblast, Other``; ``--classes`` fixes the vocabulary (a
name outside it is an error naming the file and the class). JSON::

    {"schema_version": 1, "mode": "points", "pred_dir", "points_dir", "mpp", "radius_um",
     "radius_px", "matching", "classes": [names] | null,
     "per_image": {stem: {counts, precision, recall, f1, mean_dist_px, [weighted_f1,
                          class_f1: {name: f1}], "pred": file, "points": file}},
     "overall": {pooled counts and scores, "f1_mean_over_images",
                 [weighted_f1, macro_f1, type_accuracy,
                  per_class: {name: {tp, fp, fn, support, precision, recall, f1}},
                  confusion: {rows: [gt names..., "unlabelled"],
                              cols: [pred names..., "unclassified"], counts: [[int]]},
                  unmatched_true: {name: n}, unmatched_pred: {name: n},
                  matched_classification: {weighted_f1, class_f1: [f1 per class], pairs}]}}

``matched_classification`` scores classification alone: F1 over the matched pairs whose point is
typed (the setting of SC-CNN's 0.784: patches classified at the true nuclei), where ``weighted_f1``
is end to end (a prediction counts only when matched to a point of its class).
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
    from .argtypes import positive_float

    p = sub.add_parser(
        "evaluate",
        help="score predicted label images against ground truth (AJI, PQ, Dice, ...) or nucleus points (F1)",
        description="Pair PRED/X.tif with TRUTH/X.{tif,tiff,png,xml} by stem and report instance and pixel metrics, "
                    "or with POINTS/X.csv (x_px,y_px,class) and report point detection precision/recall/F1, "
                    "per-class and weighted F1 and the confusion matrix (one-to-one matching within --radius-um).",
    )
    from ..config import EvaluateConfig

    p.add_argument("--pred", required=True, metavar="DIR", help="predicted instance label images (TIFF/PNG)")
    truth = p.add_mutually_exclusive_group(required=True)
    truth.add_argument("--truth", metavar="DIR", help="ground truth: label images or MoNuSeg XML")
    truth.add_argument("--points", metavar="DIR",
                       help="ground-truth nucleus centres: X.csv with x_px,y_px,class (point scoring)")
    p.add_argument("--mpp", type=positive_float, metavar="MPP", help="µm/px of the images (required with --points)")
    p.add_argument("--radius-um", type=positive_float, default=EvaluateConfig.point_radius_um, metavar="R",
                   help="--points: matching radius in µm (default %(default)s)")
    p.add_argument("--classes", metavar="NAMES",
                   help="--points: comma-separated class vocabulary (default: the names in the data)")
    p.add_argument("-o", "--output", metavar="RESULT.json", help="write all results as JSON")
    p.add_argument("--baseline", metavar="IMAGES_DIR", help="also score the classical segmenter on these RGB images")
    p.add_argument("--baseline-mpp", type=positive_float, metavar="MPP", help="µm/px of the --baseline images (required with it)")
    run_model = p.add_argument_group("run a model first (writes PRED/X.tif, then scores it)")
    run_model.add_argument("--images", metavar="DIR", help="RGB images X.{png,tif,jpg} to segment into --pred")
    run_model.add_argument("--model", metavar="CKPT", default=None,
                           help="with --images: checkpoint or shipped model (default, quality); 'classical' = baseline")
    run_model.add_argument("--teacher", metavar="SAM.pth", default=None,
                           help="with --images: official SAM checkpoint for a dual --model (dual mode)")
    run_model.add_argument("--refine", action="store_true", help="with --images: SAM-decoder refinement")
    run_model.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="with --images")
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
    return _pair_by_stem(pred_dir, truth_dir, TRUTH_EXTS, "ground-truth", "ground truth")


def _pair_by_stem(pred_dir, other_dir, other_exts, other_kind: str, other_name: str) -> list[tuple[str, Path, Path]]:
    """``(stem, prediction, other)`` for every stem, both ways complete (else one-line InputError)."""
    pred_dir, other_dir = Path(pred_dir), Path(other_dir)
    preds = _files_by_stem(pred_dir, PRED_EXTS, "prediction")
    others = _files_by_stem(other_dir, other_exts, other_kind)
    _unpaired(preds, others, pred_dir, other_dir, other_name)
    _unpaired(others, preds, other_dir, pred_dir, "prediction")
    return [(s, preds[s], others[s]) for s in sorted(preds)]


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


def predict_dir(images_dir, pred_dir, *, model=None, teacher=None, refine=False, device="auto", mpp=None) -> dict:
    """Segment every RGB image ``images_dir/X.*`` into ``pred_dir/X.tif`` (uint32 labels, atomic).

    Parameters
    ----------
    model : str, optional
        Checkpoint (default: shipped weights) or ``"classical"``.
    teacher : path, optional
        SAM checkpoint for a dual ``model`` (:func:`pipeline.model.load_model`).
    mpp : float, optional
        µm/px of the images (default: the model's; required for ``classical``).

    Returns
    -------
    dict
        The model's identity: ``model`` (file name), ``mode``, ``refine``, and for dual mode
        ``teacher_file`` / ``teacher_sha256`` (never a path).
    """
    import numpy as np
    import tifffile

    from ..data.readers import read_image
    from ..errors import InputError
    from ..paths import atomic_write

    if teacher is not None and model == "classical":
        raise InputError("--teacher applies to a dual CellSAM --model, not to the classical baseline")
    images = _files_by_stem(Path(images_dir), IMAGE_EXTS, "image")
    if model == "classical":
        from ..baseline import segment_classical

        if mpp is None:
            raise InputError("--images with --model classical needs --mpp")
        info = {"model": "classical", "mode": "classical", "refine": False}

        def seg(img):
            return segment_classical(img, mpp)[0]
    else:
        from ..model import load_model

        sm = load_model(model, device=device, refine=refine, teacher=teacher)
        info = {"model": Path(model).name if model else "shipped default", "mode": sm.mode, "refine": bool(refine)}
        if sm.mode == "dual":
            info.update(teacher_file=sm.model.teacher.info["file"], teacher_sha256=sm.model.teacher.info["sha256"])

        def seg(img):
            return sm.segment(img, mpp)[0]
    pred_dir = Path(pred_dir)
    for stem, src in images.items():
        labels = np.asarray(seg(read_image(src)), np.uint32)
        atomic_write(pred_dir / f"{stem}.tif", lambda tmp: tifffile.imwrite(tmp, labels, compression="zlib"),
                     "prediction", mkdir=True)
        log.info("%s: %d nuclei", src.name, int(labels.max()))
    return info


def run(args) -> int:
    model_info = None
    if getattr(args, "images", None):
        model_info = predict_dir(args.images, args.pred, model=args.model, teacher=args.teacher, refine=args.refine,
                                 device=args.device, mpp=args.mpp)
    elif any(getattr(args, k, None) for k in ("model", "teacher", "refine")):
        from ..errors import InputError

        raise InputError("--model/--teacher/--refine need --images DIR (the images to segment into --pred)")
    if getattr(args, "points", None):
        return _run_points(args)
    doc = evaluate_dirs(args.pred, args.truth, args.baseline, args.baseline_mpp)
    if model_info is not None:
        doc["model"] = model_info
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


# --- point scoring (--points) -------------------------------------------------------------------

POINT_COLUMNS = (("precision", "P"), ("recall", "R"), ("f1", "F1"))
MATCHING = ("one-to-one within radius_px: maximum number of pairs, then minimum total distance "
            "(Hungarian, scipy.optimize.linear_sum_assignment); scores pooled over images")
#: predicted class meaning "no type head" (every nucleus is "Nucleus"): detection only
UNTYPED_CLASS = "Nucleus"


def pair_point_files(pred_dir, points_dir) -> list[tuple[str, Path, Path]]:
    """Pair ``PRED_DIR/X.tif|tiff|png`` with ``POINTS_DIR/X.csv`` by stem (both ways).

    Returns
    -------
    list of (stem, pred_path, points_path), sorted by stem.

    Raises
    ------
    InputError
        For a missing/empty directory, duplicate stems or a file without a partner.
    """
    return _pair_by_stem(pred_dir, points_dir, (".csv",), "point", "point CSV")


def label_centroids(labels):
    """Centroid of every label of an instance image.

    Parameters
    ----------
    labels : ndarray of shape (H, W), integer
        Instance labels, 0 = background.

    Returns
    -------
    label : ndarray of shape (N,), int64
        The labels present, increasing.
    xy_px : ndarray of shape (N, 2), float64
        Mean (column, row) of each label's pixels (x = column, pixel centres at integers).
    """
    import numpy as np

    flat = np.asarray(labels).ravel().astype(np.int64)
    n = int(flat.max()) + 1 if flat.size else 1
    rows, cols = np.indices(np.shape(labels))
    count = np.bincount(flat, minlength=n)
    sx = np.bincount(flat, weights=cols.ravel(), minlength=n)
    sy = np.bincount(flat, weights=rows.ravel(), minlength=n)
    present = np.flatnonzero(count)
    present = present[present > 0]
    xy = np.stack([sx[present] / count[present], sy[present] / count[present]], axis=1)
    return present.astype(np.int64), xy.reshape(-1, 2)


def _read_pred_points(pred_path: Path):
    """(TypedPoints of the predicted centres, whether they carry classes, source file)."""
    from ..data.classes import TypedPoints, read_point_csv
    from ..data.readers import read_labels

    table = pred_path.with_name(f"{pred_path.stem}.nuclei.csv")
    if table.exists():
        head = table.read_text(encoding="utf-8").split("\n", 1)[0]
        has_class = "class" in [h.strip().lstrip("\ufeff").strip('"') for h in head.split(",")]
        pts = read_point_csv(table, "centroid_x_px", "centroid_y_px", "class" if has_class else None, "label")
        typed = has_class and any(n is not None and n != UNTYPED_CLASS for n in pts.class_name)
        if not typed:
            pts = TypedPoints(pts.xy_px, (None,) * len(pts), pts.source, pts.label)
        return pts, typed, table
    label, xy = label_centroids(read_labels(pred_path))
    return TypedPoints(xy, (None,) * len(label), str(pred_path), label), False, pred_path


def _canonical(name: str) -> str:
    from ..data.classes import CRCHISTO_ALIASES

    return CRCHISTO_ALIASES.get(" ".join(name.split()).casefold(), name)


def _vocabulary(names_seen, classes_arg):
    from ..data.classes import CRCHISTO_ALIASES, ClassVocabulary, vocabulary_from_data

    if classes_arg:
        names = [n.strip() for n in classes_arg.split(",") if n.strip()]
        return ClassVocabulary.from_names(names, {a: t for a, t in CRCHISTO_ALIASES.items() if t in names})
    canon = {_canonical(n) for n in names_seen}
    crc = ClassVocabulary.crchisto()
    if canon <= set(crc.names):
        return crc
    vocab = vocabulary_from_data(sorted(canon))
    return ClassVocabulary.from_names(vocab.names, {a: t for a, t in CRCHISTO_ALIASES.items() if t in vocab.names})


def _jsonable_scores(counts: dict, scores: dict, names) -> dict:
    """Per-image / overall JSON row: scalar counts and scores, per-class tables keyed by name."""
    row = {k: v for k, v in counts.items() if not hasattr(v, "shape")}
    row.update({k: v for k, v in scores.items() if not hasattr(v, "shape")})
    if names is None or "confusion" not in counts:
        return row
    row["class_f1"] = {n: float(f) for n, f in zip(names, scores["class_f1"])}
    return row


def _overall_classes(counts: dict, scores: dict, names) -> dict:
    from ..metrics import matched_classification

    conf = counts["confusion"]
    return {
        "per_class": {
            n: {
                "tp": int(scores["class_tp"][i]),
                "fp": int(scores["class_fp"][i]),
                "fn": int(scores["class_fn"][i]),
                "support": int(scores["class_support"][i]),
                "precision": float(scores["class_precision"][i]),
                "recall": float(scores["class_recall"][i]),
                "f1": float(scores["class_f1"][i]),
            }
            for i, n in enumerate(names)
        },
        "confusion": {
            "rows": [*names, "unlabelled"],
            "cols": [*names, "unclassified"],
            "counts": [[int(v) for v in r] for r in conf],
        },
        # classification alone on the matched, typed pairs (the SC-CNN 2016 classification setting)
        "matched_classification": matched_classification(conf),
        "unmatched_true": {n: int(v) for n, v in zip([*names, "unlabelled"], counts["unmatched_true"])},
        "unmatched_pred": {n: int(v) for n, v in zip([*names, "unclassified"], counts["unmatched_pred"])},
    }


def evaluate_points_dirs(pred_dir, points_dir, mpp, radius_um=None, classes=None) -> dict:
    """Point-based detection (and classification) scores of every prediction.

    Parameters
    ----------
    pred_dir, points_dir : path
        See the module docstring.
    mpp : float
        µm/px of the images, > 0.
    radius_um : float, optional
        Matching radius in µm (default :attr:`pipeline.config.EvaluateConfig.point_radius_um`).
    classes : str, optional
        Comma-separated class vocabulary; default: the names found in the data.

    Returns
    -------
    dict
        The JSON document described in the module docstring.

    Raises
    ------
    InputError
        For a bad ``mpp``/radius, missing or unpaired files, malformed CSVs, predictions with
        classes next to predictions without, or a class outside ``classes``.
    """
    import math

    from ..config import EvaluateConfig
    from ..errors import InputError
    from ..metrics import aggregate_point_counts, point_counts, point_scores
    from ..data.classes import read_point_csv

    if mpp is None or not (math.isfinite(mpp) and mpp > 0):
        raise InputError(f"--points needs --mpp (µm/px of the images, > 0; 0.55 for CRCHisto), got {mpp}")
    radius_um = EvaluateConfig.point_radius_um if radius_um is None else float(radius_um)
    if not (math.isfinite(radius_um) and radius_um > 0):
        raise InputError(f"--radius-um must be > 0, got {radius_um}")
    radius_px = radius_um / float(mpp)
    pairs = pair_point_files(pred_dir, points_dir)
    loaded = []
    for stem, pred_path, pts_path in pairs:
        truth = read_point_csv(pts_path)
        pred, typed, pred_src = _read_pred_points(pred_path)
        loaded.append((stem, pred_path, pts_path, truth, pred, typed, pred_src))
    typed_flags = {typed for *_, typed, _ in loaded}
    if len(typed_flags) > 1:
        odd = next(src for *_, typed, src in loaded if not typed)
        raise InputError(f"{odd}: predictions without classes next to predictions with classes; "
                         f"write <stem>.nuclei.csv with a class column for every image")
    with_classes = typed_flags == {True}
    vocab = None
    if with_classes:
        seen = [n for *_, truth, pred, _, _ in loaded for n in (*truth.class_name, *pred.class_name) if n is not None]
        vocab = _vocabulary(seen, classes)
    names = list(vocab.names) if vocab else None
    per_counts, per_image = {}, {}
    for stem, pred_path, pts_path, truth, pred, typed, pred_src in loaded:
        if vocab is not None:
            c = point_counts(truth.xy_px, pred.xy_px, radius_px, truth.encode(vocab), pred.encode(vocab), len(vocab))
        else:
            gcls = [-1 if n is None else 0 for n in truth.class_name]
            c = point_counts(truth.xy_px, pred.xy_px, radius_px, gcls)
        s = point_scores(c)
        per_counts[stem] = c
        row = _jsonable_scores(c, s, names)
        row.update(pred=Path(pred_src).name, points=pts_path.name)
        per_image[stem] = row
        log.info("%s: P %.4f R %.4f F1 %.4f (%d points, %d predicted)", stem, s["precision"], s["recall"], s["f1"],
                 c["n_true"], c["n_pred"])
    pooled = aggregate_point_counts(list(per_counts.values()))
    pooled_scores = point_scores(pooled)
    overall = _jsonable_scores(pooled, pooled_scores, None)
    overall["f1_mean_over_images"] = (sum(r["f1"] for r in per_image.values()) / len(per_image)) if per_image else 0.0
    if vocab is not None:
        overall.update(_overall_classes(pooled, pooled_scores, names))
    return {
        "schema_version": SCHEMA_VERSION,
        "mode": "points",
        "pred_dir": str(pred_dir),
        "points_dir": str(points_dir),
        "mpp": float(mpp),
        "radius_um": radius_um,
        "radius_px": radius_px,
        "matching": MATCHING,
        "classes": names,
        "per_image": per_image,
        "overall": overall,
    }


def format_points_table(doc: dict) -> str:
    """Fixed-width text: one row per image, the pooled row, and with classes the per-class table
    and the confusion matrix."""
    per_image, overall = doc["per_image"], doc["overall"]
    typed = doc["classes"] is not None
    width = max([len("image"), len("pooled"), *(len(s) for s in per_image)])
    extra = f" {'wF1':>6}" if typed else ""
    head = (f"{'image':<{width}} {'n_true':>7} {'n_pred':>7} {'tp':>6} {'fp':>6} {'fn':>6} "
            + " ".join(f"{h:>6}" for _, h in POINT_COLUMNS) + extra)

    def row(name, r):
        out = (f"{name:<{width}} {r['n_true']:7d} {r['n_pred']:7d} {r['tp']:6d} {r['fp']:6d} {r['fn']:6d} "
               + " ".join(f"{r[k]:6.4f}" for k, _ in POINT_COLUMNS))
        return out + (f" {r['weighted_f1']:6.4f}" if typed else "")

    lines = [f"points: radius {doc['radius_um']:g} µm = {doc['radius_px']:.2f} px at {doc['mpp']:g} µm/px",
             head, "-" * len(head)]
    lines += [row(s, r) for s, r in per_image.items()]
    lines += ["-" * len(head), row("pooled", overall)]
    lines.append(f"{len(per_image)} images; detection F1 {overall['f1']:.4f} (mean over images "
                 f"{overall['f1_mean_over_images']:.4f}); mean match distance {overall['mean_dist_px']:.2f} px")
    if typed:
        names = doc["classes"]
        w = max(len("unlabelled"), *(len(n) for n in names))
        lines += ["", f"{'class':<{w}} {'support':>7} {'tp':>6} {'fp':>6} {'fn':>6} {'P':>6} {'R':>6} {'F1':>6}"]
        for n in names:
            c = overall["per_class"][n]
            lines.append(f"{n:<{w}} {c['support']:7d} {c['tp']:6d} {c['fp']:6d} {c['fn']:6d} "
                         f"{c['precision']:6.4f} {c['recall']:6.4f} {c['f1']:6.4f}")
        lines.append(f"weighted F1 {overall['weighted_f1']:.4f}, macro F1 {overall['macro_f1']:.4f}, "
                     f"type accuracy of matched pairs {overall['type_accuracy']:.4f}")
        mc = overall["matched_classification"]
        lines.append(f"classification alone on the {mc['pairs']} matched typed pairs: weighted F1 {mc['weighted_f1']:.4f}")
        conf = overall["confusion"]
        cw = max(6, *(len(c) for c in conf["cols"]))
        lines += ["", "confusion (rows: ground truth, columns: prediction; matched pairs)",
                  f"{'':<{w}} " + " ".join(f"{c:>{cw}}" for c in conf["cols"])]
        for rname, r in zip(conf["rows"], conf["counts"]):
            lines.append(f"{rname:<{w}} " + " ".join(f"{v:{cw}d}" for v in r))
    return "\n".join(lines) + "\n"


def _run_points(args) -> int:
    from ..errors import InputError

    if args.baseline is not None:
        raise InputError("--baseline works with --truth (label images), not with --points")
    doc = evaluate_points_dirs(args.pred, args.points, args.mpp, args.radius_um, args.classes)
    sys.stdout.write(format_points_table(doc))
    if args.output:
        _write_json_atomic(doc, Path(args.output))
        log.info("wrote %s", args.output)
    return 0
