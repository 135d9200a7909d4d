"""Nucleus classes: a vocabulary of class names and colours, and readers of typed annotations.

Readers (pure parsers, one-line :class:`~pipeline.errors.InputError` naming the file on bad input)
------------------------------------------------------------------------------------------------
:func:`read_point_csv`
    Point CSVs like CRCHisto's ``points/<tile>.csv``: header ``x_px,y_px,class`` (any order,
    extra columns allowed), 0-based pixel coordinates with x = column; the class ``unlabelled``
    (or an empty cell) marks a point without a type (detection only). The same reader reads the
    ``<stem>.nuclei.csv`` of ``cellsam predict`` (``xcol="centroid_x_px"``, ...).
:func:`read_geojson_classes`
    QuPath GeoJSON exports (FeatureCollection, a bare list of features or one feature;
    ``.geojson``/``.json``, optionally ``.gz``). The class is ``properties.classification``:
    ``{"name": ...}``, a derived class ``{"names": [...]}`` (joined with ``": "`` as QuPath
    displays it) or a plain string; no classification = unlabelled. Point/MultiPoint geometries
    become points, Polygon/MultiPolygon become polygons (one object per feature; holes are
    ignored); for ``cell`` objects the ``nucleusGeometry`` is used when present. Objects whose
    class ends in ``*`` (QuPath's ignored classes: ``Ignore*``, ``Region*``) are skipped, and so
    are line geometries.
:func:`read_label_type_pair` / :func:`instances_from_types`
    HoVer-Net / PanNuke style: an instance label image with a per-pixel type map (every pixel of
    one instance must carry the same type; type 0 = unlabelled) or a per-instance type table.

Class names are validated against a :class:`ClassVocabulary` by the ``encode`` methods, which
turn names into indices (``-1`` = unlabelled) or raise one line naming the file and the class.

Colours
-------
Names that are QuPath standard classes take QuPath's standard colour
(``qupath.lib.objects.classes.PathClass.StandardPathClasses``); the four CRCHisto display names
have fixed colours (:data:`FIXED_COLORS`); any other name takes the next unused colour of
:data:`PALETTE` in vocabulary order.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError

#: the class string of CRCHisto point CSVs meaning "no type" (detection only)
UNLABELLED = "unlabelled"

#: QuPath standard classes and their RGB colours (PathClass.StandardPathClasses; Positive and
#: Negative are PathClass.getPositive/getNegative)
QUPATH_STANDARD_COLORS: dict[str, tuple[int, int, int]] = {
    "Tumor": (200, 0, 0),
    "Stroma": (150, 200, 150),
    "Immune cells": (160, 90, 160),
    "Necrosis": (50, 50, 50),
    "Other": (255, 200, 0),
    "Region*": (0, 0, 180),
    "Ignore*": (180, 180, 180),
    "Positive": (200, 50, 50),
    "Negative": (90, 90, 180),
}

#: fixed colours of the shipped model's display names that are not QuPath standard classes
FIXED_COLORS: dict[str, tuple[int, int, int]] = {
    "Epithelial": (220, 40, 120),
    "Inflammatory": (0, 160, 60),
    "Fibroblast": (40, 110, 220),
}

#: colours for other user class names, taken in order, skipping colours already in use
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)

#: CRCHisto class strings -> display names of the shipped model (QuPath conventions)
CRCHISTO_ALIASES: dict[str, str] = {
    "epithelial": "Epithelial",
    "inflammatory": "Inflammatory",
    "fibroblast": "Fibroblast",
    "others": "Other",
}


def _norm(name: str) -> str:
    return " ".join(str(name).split()).casefold()


@dataclass(frozen=True)
class ClassVocabulary:
    """Ordered nucleus class names (index = model output channel) with display colours.

    Attributes
    ----------
    names : tuple of str
        Display names, in index order; unique case-insensitively.
    colors : tuple of (int, int, int)
        RGB 0..255 per name.
    aliases : tuple of (str, str)
        Extra accepted spellings ``(alias, name)``; matching of names and aliases ignores case
        and repeated white space.
    """

    names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]
    aliases: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if not self.names:
            raise InputError("a class vocabulary needs at least one class name")
        if len(self.colors) != len(self.names):
            raise InputError(f"class vocabulary: {len(self.names)} names but {len(self.colors)} colours")
        seen: dict[str, str] = {}
        for name in self.names:
            if not isinstance(name, str) or not name.strip():
                raise InputError(f"class vocabulary: invalid class name {name!r}")
            if _norm(name) == UNLABELLED:
                raise InputError(f"class vocabulary: {name!r} is reserved for points without a type")
            if _norm(name) in seen:
                raise InputError(f"class vocabulary: {name!r} and {seen[_norm(name)]!r} differ only in case")
            seen[_norm(name)] = name
        for alias, name in self.aliases:
            if name not in self.names:
                raise InputError(f"class vocabulary: alias {alias!r} points to unknown class {name!r}")
            if _norm(alias) in seen and seen[_norm(alias)] != name:
                raise InputError(f"class vocabulary: alias {alias!r} is also the class {seen[_norm(alias)]!r}")
        for rgb in self.colors:
            if len(rgb) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in rgb):
                raise InputError(f"class vocabulary: invalid RGB colour {rgb!r}")

    @classmethod
    def from_names(cls, names, aliases=None) -> ClassVocabulary:
        """Vocabulary of ``names`` (in this order) with the colour rules of the module docstring.

        Parameters
        ----------
        names : iterable of str
            Display names.
        aliases : mapping of str -> str, optional
            Extra spellings accepted for a name (e.g. :data:`CRCHISTO_ALIASES`).
        """
        names = tuple(str(n) for n in names)
        colors: list[tuple[int, int, int] | None] = []
        for n in names:
            colors.append(QUPATH_STANDARD_COLORS.get(n) or FIXED_COLORS.get(n))
        used = {c for c in colors if c is not None}
        free = [c for c in PALETTE if c not in used]
        out = []
        for i, c in enumerate(colors):
            if c is None:
                if free:
                    c = free.pop(0)
                else:  # more classes than the palette: a deterministic colour from the index
                    c = ((37 * i + 91) % 256, (83 * i + 47) % 256, (151 * i + 13) % 256)
            out.append(c)
        return cls(names, tuple(out), tuple(sorted((aliases or {}).items())))

    @classmethod
    def crchisto(cls) -> ClassVocabulary:
        """The shipped model's classes: Epithelial, Inflammatory, Fibroblast, Other (CRCHisto order)."""
        return cls.from_names(("Epithelial", "Inflammatory", "Fibroblast", "Other"), CRCHISTO_ALIASES)

    def __len__(self) -> int:
        return len(self.names)

    def color(self, name: str) -> tuple[int, int, int]:
        """RGB colour of a class name (any accepted spelling)."""
        return self.colors[self.index(name)]

    def _lookup(self) -> dict[str, int]:
        table = {_norm(n): i for i, n in enumerate(self.names)}
        for alias, name in self.aliases:
            table.setdefault(_norm(alias), self.names.index(name))
        return table

    def index(self, name: str, source="") -> int:
        """Index of a class name or alias.

        Raises
        ------
        InputError
            ``<source>: unknown class '<name>' (known: ...)`` when the name is not in the vocabulary.
        """
        i = self._lookup().get(_norm(name))
        if i is None:
            where = f"{source}: " if source else ""
            raise InputError(f"{where}unknown class {name!r} (known: {', '.join(self.names)})")
        return i

    def encode(self, class_names, source="") -> np.ndarray:
        """Class indices of a sequence of names; ``None`` -> ``-1`` (unlabelled).

        Returns
        -------
        ndarray of shape (N,), int64

        Raises
        ------
        InputError
            Naming ``source`` and the first unknown class.
        """
        table = self._lookup()
        out = np.empty(len(class_names), dtype=np.int64)
        for k, name in enumerate(class_names):
            if name is None:
                out[k] = -1
                continue
            i = table.get(_norm(name))
            if i is None:
                self.index(name, source)  # raises
            out[k] = i
        return out

    def to_dict(self) -> dict:
        """JSON-able ``{"names": [...], "colors": [[r, g, b], ...]}`` (aliases are not part of a model)."""
        return {"names": list(self.names), "colors": [list(c) for c in self.colors]}


def vocabulary_from_data(class_names) -> ClassVocabulary:
    """Vocabulary of the distinct class names found in annotations, sorted case-insensitively.

    Parameters
    ----------
    class_names : iterable of str or None
        Names as read (``None`` = unlabelled, skipped).

    Raises
    ------
    InputError
        If no typed annotation is present, or two names differ only in case (ambiguous).
    """
    by_norm: dict[str, str] = {}
    for name in class_names:
        if name is None:
            continue
        key = _norm(name)
        if key in by_norm and by_norm[key] != name:
            raise InputError(f"class names {by_norm[key]!r} and {name!r} differ only in case; use one spelling")
        by_norm[key] = name
    if not by_norm:
        raise InputError("no typed annotations: every point/object is unlabelled")
    return ClassVocabulary.from_names(by_norm[k] for k in sorted(by_norm))


# --- typed annotation containers --------------------------------------------------------------


@dataclass(frozen=True)
class TypedPoints:
    """Nucleus points with class names.

    Attributes
    ----------
    xy_px : ndarray of shape (N, 2), float64
        (x = column, y = row), pixels of the image.
    class_name : tuple of (str or None), length N
        ``None`` = unlabelled (detection only).
    source : str
        The file they came from (used in error messages).
    label : ndarray of shape (N,), int64, optional
        Instance label of each point (prediction CSVs), else ``None``.
    """

    xy_px: np.ndarray
    class_name: tuple
    source: str = ""
    label: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.class_name)

    def encode(self, vocab: ClassVocabulary) -> np.ndarray:
        """Class indices, int64 ``(N,)``, ``-1`` = unlabelled; unknown names raise naming the file."""
        return vocab.encode(self.class_name, self.source)


@dataclass(frozen=True)
class TypedPolygons:
    """Nucleus outlines with class names (one object = one or more polygon parts).

    Attributes
    ----------
    parts : tuple of tuple of ndarray
        Per object, its exterior rings as float64 ``(K, 2)`` arrays of (x, y) pixels.
    class_name : tuple of (str or None)
        One per object; ``None`` = unlabelled.
    source : str
        The file they came from.
    """

    parts: tuple
    class_name: tuple
    source: str = ""

    def __len__(self) -> int:
        return len(self.class_name)

    def encode(self, vocab: ClassVocabulary) -> np.ndarray:
        """Class indices, int64 ``(N,)``, ``-1`` = unlabelled."""
        return vocab.encode(self.class_name, self.source)

    def rasterize(self, shape_rc) -> tuple[np.ndarray, np.ndarray]:
        """Instance labels of the polygons, in file order (later objects overwrite earlier ones).

        Parameters
        ----------
        shape_rc : (int, int)
            Output shape (rows, columns).

        Returns
        -------
        labels : ndarray of shape (H, W), uint32
            Object ``i`` (0-based) has label ``i + 1``; objects entirely outside (or fully
            overwritten) have no pixels.
        object_index : ndarray of shape (max_label + 1,), int64
            Object index of each label, ``-1`` for label 0.
        """
        from skimage.draw import polygon as draw_polygon

        labels = np.zeros(tuple(shape_rc), dtype=np.uint32)
        for i, parts in enumerate(self.parts):
            for xy in parts:
                if len(xy) < 3:
                    continue
                rr, cc = draw_polygon(xy[:, 1], xy[:, 0], shape=labels.shape)
                labels[rr, cc] = i + 1
        return labels, np.arange(-1, len(self.parts), dtype=np.int64)


@dataclass(frozen=True)
class TypedInstances:
    """Instance labels with a class per instance.

    Attributes
    ----------
    labels : ndarray of shape (H, W), uint32
        Instance labels, 0 = background.
    instance_label : ndarray of shape (N,), int64
        The labels present, increasing.
    class_name : tuple of (str or None), length N
        Class of each instance, ``None`` = unlabelled.
    source : str
        The file(s) they came from.
    """

    labels: np.ndarray
    instance_label: np.ndarray
    class_name: tuple
    source: str = ""

    def __len__(self) -> int:
        return len(self.class_name)

    def encode(self, vocab: ClassVocabulary) -> np.ndarray:
        """Class index per instance, int64 ``(N,)``, ``-1`` = unlabelled."""
        return vocab.encode(self.class_name, self.source)

    def class_lut(self, vocab: ClassVocabulary) -> np.ndarray:
        """Lookup table label -> class index: int64 ``(max_label + 1,)``, ``-1`` for background,
        unlabelled instances and absent labels (``lut[labels]`` is a per-pixel class map)."""
        top = int(self.instance_label.max()) if self.instance_label.size else 0
        lut = np.full(top + 1, -1, dtype=np.int64)
        lut[self.instance_label] = self.encode(vocab)
        return lut


# --- point CSVs -------------------------------------------------------------------------------


def parse_point_csv(text: str, source="", xcol="x_px", ycol="y_px", classcol="class", labelcol=None) -> TypedPoints:
    """Parse a point CSV (see the module docstring). Pure: ``text`` is the file content.

    Parameters
    ----------
    text : str
        CSV text with a header row.
    source : str
        File name for error messages.
    xcol, ycol, classcol : str
        Column names; ``classcol=None`` reads untyped points (all unlabelled).
    labelcol : str, optional
        Integer instance-label column (prediction CSVs).

    Returns
    -------
    TypedPoints

    Raises
    ------
    InputError
        For a missing column, a non-numeric or non-finite coordinate or a bad label, naming the
        file and the line.
    """
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None:
        raise InputError(f"{source}: empty point CSV (expected a header {xcol},{ycol},{classcol})")
    header = [h.strip().lstrip("\ufeff") for h in header]
    need = [c for c in (xcol, ycol, classcol, labelcol) if c]
    missing = [c for c in need if c not in header]
    if missing:
        raise InputError(f"{source}: point CSV lacks column(s) {', '.join(missing)} (header: {','.join(header)})")
    ix, iy = header.index(xcol), header.index(ycol)
    ic = header.index(classcol) if classcol else None
    il = header.index(labelcol) if labelcol else None
    xy, names, labels = [], [], []
    for lineno, row in enumerate(reader, start=2):
        if not row or all(not v.strip() for v in row):
            continue
        if len(row) < len(header):
            raise InputError(f"{source}:{lineno}: {len(row)} fields, header has {len(header)}")
        try:
            x, y = float(row[ix]), float(row[iy])
        except ValueError:
            raise InputError(f"{source}:{lineno}: non-numeric coordinate ({row[ix]!r}, {row[iy]!r})") from None
        if not (math.isfinite(x) and math.isfinite(y)):
            raise InputError(f"{source}:{lineno}: non-finite coordinate ({row[ix]!r}, {row[iy]!r})")
        xy.append((x, y))
        if ic is not None:
            name = " ".join(row[ic].split())
            names.append(None if not name or name.casefold() == UNLABELLED else name)
        else:
            names.append(None)
        if il is not None:
            try:
                labels.append(int(row[il]))
            except ValueError:
                raise InputError(f"{source}:{lineno}: non-integer label {row[il]!r}") from None
    arr = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    lab = np.asarray(labels, dtype=np.int64) if il is not None else None
    if lab is not None and np.unique(lab).size != lab.size:
        vals, counts = np.unique(lab, return_counts=True)
        raise InputError(f"{source}: label {int(vals[counts > 1][0])} appears on more than one row")
    return TypedPoints(arr, tuple(names), str(source), lab)


def read_point_csv(path, xcol="x_px", ycol="y_px", classcol="class", labelcol=None) -> TypedPoints:
    """Read a point CSV file (see :func:`parse_point_csv`).

    Raises
    ------
    InputError
        For a missing/unreadable file or a malformed CSV, naming the file.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read point CSV ({exc.__class__.__name__}: {exc})") from None
    return parse_point_csv(text, str(path), xcol, ycol, classcol, labelcol)


# --- QuPath GeoJSON -----------------------------------------------------------------------------


def _class_of(props, source, k) -> str | None:
    cls = props.get("classification") if isinstance(props, dict) else None
    if cls is None:
        return None
    if isinstance(cls, str):
        name = cls
    elif isinstance(cls, dict):
        if isinstance(cls.get("names"), list) and cls["names"]:
            name = ": ".join(str(n) for n in cls["names"])
        elif "name" in cls:
            name = cls["name"]
        else:
            raise InputError(f"{source}: feature {k}: classification without 'name' or 'names'")
    else:
        raise InputError(f"{source}: feature {k}: classification must be an object or a string, got {type(cls).__name__}")
    if not isinstance(name, str):
        raise InputError(f"{source}: feature {k}: class name must be a string, got {name!r}")
    name = " ".join(name.split())
    return name or None


def _coords(obj, depth, source, k) -> np.ndarray:
    try:
        arr = np.asarray(obj, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{source}: feature {k}: malformed coordinates") from None
    if depth == 0:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2 or arr.shape[1] < 2 or (arr.size and not np.isfinite(arr[:, :2]).all()):
        raise InputError(f"{source}: feature {k}: malformed coordinates")
    return arr[:, :2]


def _geometry_items(geom, source, k):
    """Yield ('point', (P, 2)) or ('polygon', [rings]) items of a GeoJSON geometry."""
    if not isinstance(geom, dict):
        raise InputError(f"{source}: feature {k}: geometry must be an object")
    gtype = geom.get("type")
    coords = geom.get("coordinates")
    if gtype == "Point":
        yield "point", _coords(coords, 0, source, k)
    elif gtype == "MultiPoint":
        yield "point", _coords(coords, 1, source, k).reshape(-1, 2)
    elif gtype == "Polygon":
        if not coords:
            raise InputError(f"{source}: feature {k}: Polygon without coordinates")
        yield "polygon", [_coords(coords[0], 1, source, k)]
    elif gtype == "MultiPolygon":
        if not coords:
            raise InputError(f"{source}: feature {k}: MultiPolygon without coordinates")
        yield "polygon", [_coords(p[0], 1, source, k) for p in coords if p]
    elif gtype == "GeometryCollection":
        for g in geom.get("geometries") or []:
            yield from _geometry_items(g, source, k)
    elif gtype in ("LineString", "MultiLineString"):
        return
    else:
        raise InputError(f"{source}: feature {k}: unsupported geometry type {gtype!r}")


def parse_geojson_classes(data, source="") -> tuple[TypedPoints, TypedPolygons]:
    """Typed points and polygons of parsed QuPath GeoJSON (see the module docstring). Pure.

    Parameters
    ----------
    data : dict or list
        ``json.load`` of the file: FeatureCollection, list of features, one Feature or a bare
        geometry.
    source : str
        File name for error messages.

    Returns
    -------
    (TypedPoints, TypedPolygons)
        In file order. A feature with a Point and a Polygon part (GeometryCollection) yields both.

    Raises
    ------
    InputError
        For a structure that is not GeoJSON features, or malformed geometry/classification.
    """
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        feats = data.get("features")
        if not isinstance(feats, list):
            raise InputError(f"{source}: FeatureCollection without a 'features' list")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        feats = [data]
    elif isinstance(data, dict) and ("coordinates" in data or data.get("type") == "GeometryCollection"):
        feats = [{"type": "Feature", "geometry": data, "properties": {}}]
    elif isinstance(data, list):
        feats = data
    else:
        raise InputError(f"{source}: not GeoJSON features (expected a FeatureCollection, a list of features or a Feature)")
    pts, pt_names, polys, poly_names = [], [], [], []
    for k, feat in enumerate(feats):
        if not isinstance(feat, dict):
            raise InputError(f"{source}: feature {k} is not an object")
        props = feat.get("properties") or {}
        name = _class_of(props, source, k)
        if name is not None and name.endswith("*"):
            continue  # QuPath's ignored classes (Ignore*, Region*)
        geom = feat.get("geometry")
        if props.get("objectType") == "cell" and isinstance(feat.get("nucleusGeometry"), dict):
            geom = feat["nucleusGeometry"]
        if geom is None:
            continue
        for kind, item in _geometry_items(geom, source, k):
            if kind == "point":
                pts.append(item)
                pt_names.extend([name] * len(item))
            else:
                polys.append(tuple(item))
                poly_names.append(name)
    xy = np.concatenate(pts).astype(np.float64) if pts else np.zeros((0, 2), np.float64)
    return (TypedPoints(xy, tuple(pt_names), str(source)), TypedPolygons(tuple(polys), tuple(poly_names), str(source)))


def read_geojson_classes(path) -> tuple[TypedPoints, TypedPolygons]:
    """Read a QuPath GeoJSON export (``.geojson``, ``.json``, or either ``.gz``); see
    :func:`parse_geojson_classes`.

    Raises
    ------
    InputError
        For a missing/unreadable/non-JSON file or a malformed structure, naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot parse GeoJSON ({exc.__class__.__name__}: {exc})") from None
    return parse_geojson_classes(data, str(path))


# --- label image + type image (HoVer-Net / PanNuke style) ---------------------------------------


def _type_names_lookup(type_names, source):
    """Mapping type id (int > 0) -> class name from a sequence (index = id) or a mapping."""
    if isinstance(type_names, dict):
        table = {int(k): v for k, v in type_names.items()}
    else:
        table = dict(enumerate(type_names))
    table.pop(0, None)  # type 0 is background / unlabelled
    for k, v in table.items():
        if k < 0:
            raise InputError(f"{source}: negative type id {k} in the type names")
        if v is not None and not isinstance(v, str):
            raise InputError(f"{source}: type {k} has a non-string name {v!r}")
    return table


def instances_from_types(labels, types, type_names, source="") -> TypedInstances:
    """Class of each instance from a per-pixel type map or a per-instance type table. Pure.

    Parameters
    ----------
    labels : ndarray of shape (H, W), integer
        Instance labels, 0 = background.
    types : ndarray of shape (H, W), integer, or mapping label -> type id, or ndarray (N,)
        A per-pixel type map (HoVer-Net ``type_map``), or per-instance type ids: a mapping, or an
        array whose entry ``i`` is the type of label ``i + 1`` (CoNSeP ``inst_type``). Type 0 =
        unlabelled.
    type_names : sequence of str or mapping of int -> str
        Class name of each type id (sequence index = id; entry 0, the background, is ignored).
    source : str
        File name(s) for error messages.

    Returns
    -------
    TypedInstances

    Raises
    ------
    InputError
        For a shape mismatch, a type id without a name, or an instance whose pixels carry two
        different non-zero types (naming the label and both classes).
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.dtype.kind not in "iu":
        raise InputError(f"{source}: instance labels must be a 2-D integer image, got {labels.dtype} {labels.shape}")
    if labels.size and labels.min() < 0:
        raise InputError(f"{source}: negative instance labels")
    labels = labels.astype(np.uint32)
    names = _type_names_lookup(type_names, source)
    present = np.unique(labels)
    present = present[present > 0].astype(np.int64)
    if isinstance(types, dict):
        per = {int(k): int(v) for k, v in types.items()}
        inst_type = np.array([per.get(int(lab), 0) for lab in present], dtype=np.int64)
    else:
        types = np.asarray(types)
        if types.dtype.kind not in "iuf":
            raise InputError(f"{source}: type ids must be integers, got {types.dtype}")
        if types.dtype.kind == "f":
            if not np.all(np.isfinite(types)) or np.any(types != np.round(types)):
                raise InputError(f"{source}: type ids must be integers")
            types = types.astype(np.int64)
        if types.ndim == 2 and types.shape == labels.shape:
            inst_type = _types_from_map(labels, types.astype(np.int64), present, names, source)
        elif types.ndim == 2 and 1 in types.shape or types.ndim == 1:
            flat = types.astype(np.int64).ravel()
            if present.size and present.max() > flat.size:
                raise InputError(f"{source}: {flat.size} instance types for labels up to {int(present.max())}")
            inst_type = flat[present - 1] if present.size else np.zeros(0, np.int64)
        else:
            raise InputError(f"{source}: type image shape {types.shape} differs from the labels' {labels.shape}")
    if inst_type.size and inst_type.min() < 0:
        raise InputError(f"{source}: negative type id {int(inst_type.min())}")
    out_names = []
    for lab, t in zip(present, inst_type):
        if t == 0:
            out_names.append(None)
        elif int(t) not in names:
            raise InputError(f"{source}: instance {int(lab)} has type {int(t)}, which has no class name (known: "
                             f"{', '.join(f'{k}={v}' for k, v in sorted(names.items()))})")
        else:
            out_names.append(names[int(t)])
    return TypedInstances(labels, present, tuple(out_names), str(source))


def _types_from_map(labels, types, present, names, source) -> np.ndarray:
    fg = labels > 0
    lab = labels[fg].astype(np.int64)
    typ = types[fg]
    typed = typ > 0
    pairs = np.unique(np.stack([lab[typed], typ[typed]], axis=1), axis=0) if typed.any() else np.zeros((0, 2), np.int64)
    inst_type = np.zeros(present.size, dtype=np.int64)
    if pairs.size:
        first = np.r_[True, pairs[1:, 0] != pairs[:-1, 0]]
        if not first.all():
            k = int(np.flatnonzero(~first)[0])
            bad = int(pairs[k, 0])
            t1, t2 = int(pairs[k - 1, 1]), int(pairs[k, 1])
            n1, n2 = names.get(t1, f"type {t1}"), names.get(t2, f"type {t2}")
            raise InputError(f"{source}: instance {bad} has two types, {n1!r} ({t1}) and {n2!r} ({t2}); "
                             f"give every pixel of an instance one type")
        idx = np.searchsorted(present, pairs[:, 0])
        inst_type[idx] = pairs[:, 1]
    return inst_type


def read_label_type_pair(label_path, type_path, type_names) -> TypedInstances:
    """Read an instance label image and its type image (TIFF/PNG, or one ``.npy``/``.mat`` file).

    Parameters
    ----------
    label_path : path
        Instance label image (TIFF/PNG), or a HoVer-Net/CoNSeP ``.mat`` holding ``inst_map`` and
        ``type_map`` or ``inst_type``, or a HoVer-Net ``.npy`` patch ``(H, W, 5)`` (RGB, instance,
        type), in which case ``type_path`` is ``None``.
    type_path : path or None
        Per-pixel type image (TIFF/PNG) or a per-instance type ``.npy`` / ``.csv``
        (``label,type`` rows).
    type_names : sequence of str or mapping of int -> str
        See :func:`instances_from_types`.

    Raises
    ------
    InputError
        For missing/unreadable files or inconsistent types, naming the file(s).
    """
    from .readers import read_labels

    label_path = Path(label_path)
    if not label_path.exists():
        raise InputError(f"{label_path}: no such file")
    suffix = label_path.suffix.lower()
    if suffix == ".mat":
        from scipy.io import loadmat

        try:
            mat = loadmat(label_path)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad input
            raise InputError(f"{label_path}: cannot read .mat ({exc.__class__.__name__}: {exc})") from None
        if "inst_map" not in mat:
            raise InputError(f"{label_path}: .mat has no 'inst_map'")
        types = mat.get("type_map", mat.get("inst_type"))
        if types is None:
            raise InputError(f"{label_path}: .mat has neither 'type_map' nor 'inst_type'")
        return instances_from_types(np.asarray(mat["inst_map"]).astype(np.int64), np.asarray(types),
                                    type_names, str(label_path))
    if suffix == ".npy" and type_path is None:
        try:
            arr = np.load(label_path, allow_pickle=False)
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"{label_path}: cannot read .npy ({exc.__class__.__name__}: {exc})") from None
        if arr.ndim != 3 or arr.shape[2] < 5:
            raise InputError(f"{label_path}: expected a (H, W, 5) RGB+instance+type array, got {arr.shape}")
        return instances_from_types(arr[..., 3].astype(np.int64), arr[..., 4].astype(np.int64), type_names,
                                    str(label_path))
    if type_path is None:
        raise InputError(f"{label_path}: a label image needs a type image or per-instance type file")
    type_path = Path(type_path)
    labels = read_labels(label_path)
    source = f"{label_path} + {type_path.name}"
    tsuf = type_path.suffix.lower()
    if tsuf == ".csv":
        try:
            rows = list(csv.DictReader(io.StringIO(type_path.read_text(encoding="utf-8"))))
        except FileNotFoundError:
            raise InputError(f"{type_path}: no such file") from None
        try:
            types = {int(r["label"]): int(r["type"]) for r in rows}
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{type_path}: expected integer columns label,type") from None
    elif tsuf == ".npy":
        try:
            types = np.load(type_path, allow_pickle=False)
        except FileNotFoundError:
            raise InputError(f"{type_path}: no such file") from None
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"{type_path}: cannot read .npy ({exc.__class__.__name__}: {exc})") from None
    else:
        types = read_labels(type_path)
    return instances_from_types(labels, types, type_names, source)
