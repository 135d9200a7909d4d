"""`cellsam predict`: segment an ordinary image tile (PNG/TIFF) into a uint32 instance-label TIFF."""

from __future__ import annotations


def register(sub):
    from .argtypes import positive_float

    p = sub.add_parser("predict", help="segment an image tile into a uint32 instance-label TIFF",
                       description="Segment an RGB image (PNG/TIFF/JPEG) with CellSAM. The output has "
                                   "the input's size; the model resamples internally to its own µm/px.")
    p.add_argument("image", nargs="+", help="input image(s)")
    p.add_argument("-o", "--output", required=True,
                   help="output label TIFF (one input) or output folder (several inputs: <stem>.tif)")
    p.add_argument("--mpp", type=positive_float, default=None, help="µm/px of the image (default: the model's)")
    p.add_argument("--model", default=None, help="checkpoint or shipped model (default, quality: + patch-CNN typing); 'classical' = "
                                                  "H-channel watershed baseline")
    p.add_argument("--teacher", default=None, help="official SAM checkpoint for dual mode")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--refine", action="store_true", help="SAM-decoder refinement + mask fusion")
    p.add_argument("--min-score", type=float, default=None, metavar="P",
                   help="drop nuclei whose score (mean nucleus probability) is below P; 0 keeps all "
                   "(default: the checkpoint's, 0.82 for the shipped model)")
    p.add_argument("--reject-threshold", type=float, default=None, metavar="P",
                   help="drop nuclei whose 'not a nucleus' probability (the model's patch typer) is above P; "
                   "1 keeps all (default: the checkpoint's, 0.7 for the shipped models)")
    p.add_argument("--engine", default="auto", choices=["auto", "torch", "onnxruntime", "openvino"],
                   help="network runner (default: auto = fastest installed engine passing parity)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="network precision")
    p.set_defaults(func=run)


def run(args):
    import logging
    from pathlib import Path

    import numpy as np
    import tifffile

    from ..data.readers import read_image
    from ..errors import InputError
    from ..paths import atomic_write

    log = logging.getLogger("cellsam.predict")
    if args.mpp is not None and args.mpp <= 0:
        raise InputError(f"--mpp must be > 0, got {args.mpp}")
    if args.model == "classical":
        from ..baseline import segment_classical

        if args.mpp is None:
            raise InputError("--model classical needs --mpp")

        def seg(img):
            return segment_classical(img, args.mpp)
    else:
        from ..model import load_model
        from ..model.segmenter import remove_rejected

        from ..config import SegmentConfig, with_overrides

        kwargs = {"teacher": args.teacher} if args.teacher else {}
        checked = with_overrides(SegmentConfig(), min_score=args.min_score,  # ranges checked there
                                 reject_threshold=args.reject_threshold)
        model = load_model(args.model, device=args.device, refine=args.refine, engine=args.engine,
                           precision=args.precision, min_score=checked.min_score,
                           reject_threshold=checked.reject_threshold, **kwargs)

        def seg(img):
            res = model.segment(img, args.mpp, keep_rejected=True)
            # a model that rejects: remove them here, keep the probability of the rest
            return remove_rejected(res) if len(res) == 5 else res

    out = Path(args.output)
    many = len(args.image) > 1
    if many:
        out.mkdir(parents=True, exist_ok=True)
    for src in args.image:
        img = read_image(src)
        res = seg(img)
        labels, scores = res[0], res[1]
        probs = res[2] if len(res) >= 3 else None
        not_nucleus = res[3] if len(res) == 4 else None
        names = list(getattr(model, "class_names", [])) if args.model != "classical" else []
        dst = out / f"{Path(src).stem}.tif" if many else out
        atomic_write(dst, lambda tmp: tifffile.imwrite(tmp, labels.astype(np.uint32), compression="zlib"), mkdir=True)
        table = nuclei_csv(labels, scores, probs, names, not_nucleus)
        csv_path = dst.with_name(dst.name[:-len(dst.suffix)] + ".nuclei.csv" if dst.suffix else dst.name + ".nuclei.csv")
        atomic_write(csv_path, lambda tmp: Path(tmp).write_text(table, encoding="utf-8", newline=""), mkdir=True)
        log.info("%s: %d nuclei -> %s", src, int(labels.max()), dst)
    return 0


def nuclei_csv(labels, scores, class_probs=None, class_names=(), not_nucleus=None) -> str:
    """The ``<stem>.nuclei.csv`` text of ``cellsam predict``: one row per label 1..K, columns
    ``label, centroid_x_px, centroid_y_px, area_px, score, class`` (+ ``p_<class>`` per class of a
    type head; class ``Nucleus`` without one; + ``not_nucleus_prob`` for a model that rejects).
    Centroids are pixel (column, row) means, 0-based."""
    import numpy as np

    k = int(labels.max()) if labels.size else 0
    rr, cc = np.nonzero(labels)
    ll = labels[rr, cc].astype(np.int64) - 1
    area = np.bincount(ll, minlength=k)
    n = np.maximum(area, 1)
    cx, cy = np.bincount(ll, cc, minlength=k) / n, np.bincount(ll, rr, minlength=k) / n
    names = list(class_names) if class_probs is not None else []
    head = ["label", "centroid_x_px", "centroid_y_px", "area_px", "score", "class"] + [f"p_{c}" for c in names]
    head += ["not_nucleus_prob"] if not_nucleus is not None else []
    lines = [",".join(head)]
    for i in range(k):
        cls = names[int(np.argmax(class_probs[i]))] if names else "Nucleus"
        row = [str(i + 1), f"{cx[i]:.2f}", f"{cy[i]:.2f}", str(int(area[i])), f"{float(scores[i]):.4f}", cls]
        row += [f"{float(p):.4f}" for p in (class_probs[i] if names else ())]
        row += [f"{float(not_nucleus[i]):.4f}"] if not_nucleus is not None else []
        lines.append(",".join(row))
    return "\n".join(lines) + "\n"
