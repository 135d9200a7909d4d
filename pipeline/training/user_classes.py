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
* point CSVs like crchisto's, ``x_px,y_px,class`` (:func:`pipeline.data.classes.read_point_csv`).

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
            log.info("%s: no annotation file, skipped", img)
            continue
        pairs.append((img, ann))
    if not pairs:
        raise InputError(f"{root}: no image with an annotation (<stem>.geojson or <stem>.csv next to it, "
                         f"or in labels/ points/ annotations/)")
    return pairs


def read_annotation(path, shape_rc) -> tuple[np.ndarray, tuple]:
    """Typed points of one annotation file: ``(xy float64 (N, 2), names)``; polygons become the
    centroid of their rasterised mask (objects with no pixel inside the image are dropped)."""
    from .typehead import centroids_xy

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
                device: str = "cpu", seed: int = 0) -> dict:
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

    Returns
    -------
    dict
        The ``metadata["type_head"]`` summary written (classes, counts of matched instances).
    """
    from ..data.readers import read_image
    from ..model.checkpoint import DEFAULT_WEIGHTS, init_identity, load_checkpoint, save_checkpoint
    from ..model.segmenter import load_model
    from .typehead import fit_head, tile_examples, with_type_head

    if mpp is None or not mpp > 0:
        raise InputError(f"--mpp must be > 0, got {mpp}")
    init = DEFAULT_WEIGHTS if init in (None, "default") else Path(init)
    pairs = find_pairs(data)
    images, annotated = [], []
    for img_path, ann_path in pairs:
        img = read_image(img_path)
        xy, names = read_annotation(ann_path, img.shape[:2])
        images.append(img)
        annotated.append(Annotated(img_path, ann_path, xy, names))
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
    head = fit_head(examples, vocab.names, reject=reject, epochs=epochs, seed=seed, colors=vocab.colors)
    model, meta = load_checkpoint(init)
    new = with_type_head(model, head)
    summary = {"classes": list(vocab.names), "colors": [list(c) for c in vocab.colors],
               "trained_on": {"images": [a.image.name for a in annotated], "mpp": float(mpp),
                              "matched_instances": counts, "reject": bool(reject)}}
    metadata = {**meta, "classes": list(vocab.names), "type_head": summary, **init_identity(init)}
    metadata.pop("metrics", None)  # the inherited head's scores do not describe the new head
    save_checkpoint(out, new, metadata)
    return summary
