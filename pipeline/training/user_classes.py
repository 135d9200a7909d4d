"""User nucleus classes: fit a new type head on a folder of classified annotations (``cellsam train-types``).

The segmentation network of the initial checkpoint stays frozen and unchanged (same weights, same
post-processing): every image is segmented once, each annotated point (or polygon, through the
centroid of its rasterised mask) is matched to the predicted instance containing it
(:func:`pipeline.training.typehead.match_targets`), and a NEW :class:`~pipeline.model.typehead.TypeHead`
with the annotation's class names is fitted on the pooled features in seconds
(:func:`pipeline.training.typehead.fit_head`). The inherited head, if any, is replaced.

Data layout
-----------
``DIR/<stem>.<png|tif|tiff|jpg|jpeg>`` (or ``DIR/images/<stem>.*``) with one annotation per image,
looked up (first hit) as ``<stem>.geojson``, ``<stem>.geojson.gz``, ``<stem>.json`` or
``<stem>.csv`` in ``DIR/``, ``DIR/labels/``, ``DIR/points/`` or ``DIR/annotations/``:

* QuPath GeoJSON exports with classified objects (:func:`pipeline.data.classes.read_geojson_classes`);
* point CSVs like crchisto's, ``x_px,y_px,class`` (:func:`pipeline.data.classes.read_point_csv`);
* label + type image pairs (HoVer-Net / PanNuke / CoNSeP style): ``labels/<stem>.tif|png`` (instance
  labels) with ``types/<stem>.tif|png`` (per-pixel type ids) or ``types/<stem>.npy|csv``
  (per-instance type ids), or one CoNSeP ``labels/<stem>.mat``; the names of the type ids come
  from ``type_names`` (``--type-names 1=Neoplastic,2=Inflammatory``) or ``DIR/type_names.json``
  (``{"1": "Neoplastic", ...}``). Each instance becomes a point at its centroid.

Images without an annotation file are skipped. Class names are the distinct names found (sorted
case-insensitively; colours from :meth:`pipeline.data.classes.ClassVocabulary.from_names`); with
``classes`` given, any other name is an error naming the file and the class.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.classes import ClassVocabulary, _norm, read_geojson_classes, read_point_csv
from ..data.readers import IMAGE_EXTS
from ..errors import InputError

log = logging.getLogger(__name__)

ANNOTATION_SUFFIXES = (".geojson", ".geojson.gz", ".json", ".csv")
ANNOTATION_DIRS = (".", "labels", "points", "annotations")
LABEL_SUFFIXES = (".tif", ".tiff", ".png")
TYPE_SUFFIXES = (".tif", ".tiff", ".png", ".npy", ".csv")


def _first_file(candidates):
    return next((p for p in candidates if p.is_file()), None)


def _label_type_files(root: Path, stem: str):
    """``(label, type or None)`` of a label + type pair for ``stem``, or None."""
    mat = _first_file(root / d / f"{stem}.mat" for d in ("labels", "."))
    if mat is not None:
        return mat, None
    lab = _first_file(root / "labels" / f"{stem}{s}" for s in LABEL_SUFFIXES)
    typ = _first_file(root / "types" / f"{stem}{s}" for s in TYPE_SUFFIXES)
    return (lab, typ) if lab is not None and typ is not None else None


def read_type_names(data, spec=None) -> dict[int, str] | None:
    """Names of type ids: ``spec`` ``"1=A,2=B"`` or ``DATA/type_names.json``; None if neither."""
    if spec:
        out = {}
        for item in str(spec).split(","):
            key, sep, name = item.partition("=")
            if not sep or not key.strip().isdigit() or not name.strip():
                raise InputError(f"--type-names: expected ID=NAME items like 1=Neoplastic, got {item.strip()!r}")
            out[int(key)] = name.strip()
        return out
    path = Path(data) / "type_names.json"
    if not path.is_file():
        return None
    import json

    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return {int(k): str(v) for k, v in raw.items()}
    except (ValueError, AttributeError, TypeError):
        raise InputError(f"{path}: expected a JSON object {{\"1\": \"Name\", ...}}") from None


@dataclass(frozen=True)
class Annotated:
    """One training image and its typed points (polygons already reduced to centroids).

    ``points_xy`` float64 (N, 2) (x, y) image pixels; ``names`` N class names (``None`` = unlabelled)."""

    image: Path
    annotation: Path
    points_xy: np.ndarray
    names: tuple


def find_pairs(data) -> list[tuple[Path, Path]]:
    """(image, annotation) pairs of a data folder (see the module docstring), sorted by image stem."""
    root = Path(data)
    if not root.is_dir():
        raise InputError(f"{root}: not a directory")
    img_dir = root / "images" if (root / "images").is_dir() else root
    images = sorted((p for p in img_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS),
                    key=lambda p: p.name)
    pairs = []
    for img in images:
        ann = next((root / d / f"{img.stem}{s}" for d in ANNOTATION_DIRS for s in ANNOTATION_SUFFIXES
                    if (root / d / f"{img.stem}{s}").is_file()), None)
        if ann is None:
            ann = _label_type_files(root, img.stem)
        if ann is None:
            log.info("%s: no annotation file, skipped", img)
            continue
        pairs.append((img, ann))
    if not pairs:
        raise InputError(f"{root}: no image with an annotation (<stem>.geojson or <stem>.csv next to it, "
                         f"or in labels/ points/ annotations/, or labels/<stem>.tif + types/<stem>.png)")
    return pairs


def read_annotation(path, shape_rc, type_names=None) -> tuple[np.ndarray, tuple]:
    """Typed points of one annotation file: ``(xy float64 (N, 2), names)``; polygons become the
    centroid of their rasterised mask (objects with no pixel inside the image are dropped).
    ``path`` may be a ``(label, type)`` pair (:func:`find_pairs`; needs ``type_names``): every
    instance becomes a point at its centroid."""
    from ..data.classes import read_label_type_pair
    from .typehead import centroids_xy

    if isinstance(path, tuple):
        if not type_names:
            raise InputError(f"{path[0]}: label + type pairs need the names of the type ids "
                             f"(--type-names 1=Name,2=Name or type_names.json in the data folder)")
        inst = read_label_type_pair(path[0], path[1], type_names)
        if inst.labels.shape != tuple(shape_rc):
            raise InputError(f"{path[0]}: labels are {inst.labels.shape[1]}x{inst.labels.shape[0]} px, "
                             f"the image {shape_rc[1]}x{shape_rc[0]}")
        if not len(inst):
            return np.zeros((0, 2)), ()
        cen = centroids_xy(inst.labels)
        return cen[np.asarray(inst.instance_label, np.int64) - 1], tuple(inst.class_name)
    path = Path(path)
    if path.name.lower().endswith(".csv"):
        pts = read_point_csv(path)
        return np.asarray(pts.xy_px, np.float64).reshape(-1, 2), tuple(pts.class_name)
    pts, polys = read_geojson_classes(path)
    xy, names = [np.asarray(pts.xy_px, np.float64).reshape(-1, 2)], list(pts.class_name)
    if len(polys):
        lab, obj = polys.rasterize(shape_rc)
        if lab.max() > 0:
            cen = centroids_xy(lab)
            present = np.bincount(lab.ravel(), minlength=int(lab.max()) + 1)[1:] > 0
            keep = np.nonzero(present)[0]
            xy.append(cen[keep])
            names.extend(polys.class_name[int(obj[k + 1])] for k in keep)
    return np.concatenate(xy), tuple(names)


def classes_found(data, type_names=None) -> list[str]:
    """Distinct class names of a data folder's annotations (:func:`find_pairs`), sorted
    case-insensitively; [] when it has no typed annotation (or no annotation this reader knows).
    Label + type pairs count only when their type names are known."""
    try:
        pairs = find_pairs(data)
    except InputError:
        return []
    if not isinstance(type_names, dict):
        type_names = read_type_names(data, type_names)
    names: set[str] = set()
    for _, ann in pairs:
        if isinstance(ann, tuple):
            if type_names:
                names.update(v for v in type_names.values() if v)
            continue
        if ann.name.lower().endswith(".csv"):
            names.update(n for n in read_point_csv(ann).class_name if n)
        else:
            pts, polys = read_geojson_classes(ann)
            names.update(n for n in tuple(pts.class_name) + tuple(polys.class_name) if n)
    return sorted(names, key=lambda n: (_norm(n), n))


def user_vocabulary(items, classes=None) -> ClassVocabulary:
    """The class vocabulary of annotations ``[(source, names), ...]``.

    Without ``classes``: the distinct names (sorted case-insensitively). With ``classes`` (the
    expected names, in order) every name must be one of them.

    Raises
    ------
    InputError
        ``<file>: unknown class 'X' (known: ...)``, ``<file>: class 'x' differs only in case from 'X'
        (in <other file>)``, or no typed annotation at all.
    """
    if classes:
        vocab = ClassVocabulary.from_names(classes)
        for source, names in items:
            vocab.encode(names, source)  # raises naming the file and the class
        return vocab
    seen: dict[str, tuple[str, str]] = {}
    for source, names in items:
        for name in names:
            if name is None:
                continue
            key = _norm(name)
            if key in seen and seen[key][0] != name:
                raise InputError(f"{source}: class {name!r} differs only in case from {seen[key][0]!r} "
                                 f"(in {seen[key][1]}); use one spelling")
            seen.setdefault(key, (name, source))
    if not seen:
        raise InputError("no typed annotations: every point/object is unlabelled")
    if len(seen) < 2:
        name, source = next(iter(seen.values()))
        raise InputError(f"{source}: only one class found ({name!r}); a type head needs at least two classes")
    return ClassVocabulary.from_names(seen[k][0] for k in sorted(seen))


def train_types(data, out, mpp: float, init=None, classes=None, reject: bool = False, epochs: int = 300,
                device: str = "cpu", seed: int = 0, type_names=None) -> dict:
    """Fit a new type head for the classes of ``data`` on the frozen network of ``init`` and write
    the checkpoint ``out`` (atomically).

    Parameters
    ----------
    data : path
        Data folder (module docstring).
    out : path
        Output checkpoint.
    mpp : float
        µm/px of the images.
    init : path, optional
        Checkpoint whose network is kept (default: the shipped weights).
    classes : sequence of str, optional
        Expected class names (others are errors); default: those found.
    reject : bool
        Also learn a "not a nucleus" output from predicted instances no annotation touches: only
        for annotations that mark every nucleus of each image.
    type_names : str or mapping of int -> str, optional
        Names of the type ids of label + type pairs (``"1=A,2=B"``; default ``DATA/type_names.json``).

    Returns
    -------
    dict
        The ``metadata["type_head"]`` summary written (classes, counts of matched instances).
    """
    from ..data.readers import read_image
    from ..model.checkpoint import init_identity, load_checkpoint, resolve_weights, save_checkpoint
    from ..model.segmenter import load_model
    from .typehead import fit_head, stage2_radii_for, tile_examples, with_type_head

    if mpp is None or not mpp > 0:
        raise InputError(f"--mpp must be > 0, got {mpp}")
    init = resolve_weights(init)  # None or a shipped model's name ("default", "quality") -> its file
    pairs = find_pairs(data)
    if not isinstance(type_names, dict):
        type_names = read_type_names(data, type_names)
    images, annotated = [], []
    for img_path, ann_path in pairs:
        img = read_image(img_path)
        xy, names = read_annotation(ann_path, img.shape[:2], type_names)
        images.append(img)
        annotated.append(Annotated(img_path, ann_path[0] if isinstance(ann_path, tuple) else ann_path, xy, names))
    vocab = user_vocabulary([(str(a.annotation), a.names) for a in annotated], classes)
    seg = load_model(init, device=device, engine="torch", precision="fp32")
    examples = []
    for img, a in zip(images, annotated):
        examples.append(tile_examples(seg, a.image.stem, img, a.points_xy, vocab.encode(a.names, str(a.annotation)), mpp))
    target = np.concatenate([e.target for e in examples])
    counts = {n: int((target == i).sum()) for i, n in enumerate(vocab.names)}
    if not any(counts.values()):
        raise InputError(f"{data}: no annotated nucleus matched a segmented nucleus (check --mpp {mpp})")
    for n, c in counts.items():
        if c == 0:
            log.warning("class %r: no annotation matched a segmented nucleus; the head cannot learn it", n)
    head = fit_head(examples, vocab.names, reject=reject, epochs=epochs, seed=seed, colors=vocab.colors,
                    stage2_radii_um=stage2_radii_for(examples))
    model, meta = load_checkpoint(init)
    new = with_type_head(model, head)
    summary = {"classes": list(vocab.names), "colors": [list(c) for c in vocab.colors],
               "trained_on": {"images": [a.image.name for a in annotated], "mpp": float(mpp),
                              "matched_instances": counts, "reject": bool(reject)},
               "stage2_radii_um": list(head.radii_um)}
    metadata = {**meta, "classes": list(vocab.names), "type_head": summary, **init_identity(init)}
    metadata.pop("metrics", None)  # the inherited head's scores do not describe the new head
    save_checkpoint(out, new, metadata)
    return summary
