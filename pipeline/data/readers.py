"""Readers for annotated nucleus tiles.

All functions return arrays in (row, col) order: images ``uint8 (H, W, 3)`` RGB, instance labels
``uint32 (H, W)`` with 0 = background.
"""

from __future__ import annotations

import gzip
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import tifffile
from skimage.draw import polygon as draw_polygon

from ..errors import InputError

IMAGE_EXTS = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
LABEL_EXTS = (".tif", ".tiff", ".png")


def read_image(path) -> np.ndarray:
    """Read an RGB tile. Returns ``uint8 (H, W, 3)``; RGBA is composited on white, grey is repeated.

    Raises
    ------
    InputError
        If the file is missing or not a readable 8-bit image.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            arr = tifffile.imread(path)
        else:
            from PIL import Image

            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGBA") if im.mode in ("RGBA", "LA", "P") else im.convert("RGB"))
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad input
        raise InputError(f"{path}: cannot read image ({exc.__class__.__name__}: {exc})") from None
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise InputError(f"{path}: expected an RGB image, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise InputError(f"{path}: expected 8-bit RGB, got {arr.dtype}")
    if arr.shape[2] == 4:
        alpha = arr[..., 3:4].astype(np.float32) / 255.0
        arr = np.round(arr[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    return np.ascontiguousarray(arr)


def read_labels(path) -> np.ndarray:
    """Read an instance-label image (TIFF/PNG, integer, 0 = background). Returns ``uint32 (H, W)``."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            arr = tifffile.imread(path)
        else:
            from PIL import Image

            with Image.open(path) as im:
                arr = np.asarray(im)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{path}: cannot read label image ({exc.__class__.__name__}: {exc})") from None
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"{path}: expected a 2-D integer label image, got {arr.dtype} {arr.shape}")
    if arr.min() < 0:
        raise InputError(f"{path}: negative labels")
    return arr.astype(np.uint32)


def _raster_polygons(polys, shape_rc) -> np.ndarray:
    labels = np.zeros(shape_rc, dtype=np.uint32)
    n = 0
    for xy in polys:
        if len(xy) < 3:
            continue
        rr, cc = draw_polygon(xy[:, 1], xy[:, 0], shape=shape_rc)
        if rr.size == 0:
            continue
        n += 1
        labels[rr, cc] = n  # later regions overwrite earlier ones
    return labels


def monuseg_xml_polygons(path) -> list[np.ndarray]:
    """Vertices of each ImageScope XML region as ``float64 (K, 2)`` arrays of (x = col, y = row)."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise InputError(f"{path}: cannot parse ImageScope XML ({exc})") from None
    polys = []
    for region in root.iter("Region"):
        verts = [(float(v.get("X")), float(v.get("Y"))) for v in region.iter("Vertex")]
        if len(verts) >= 3:
            polys.append(np.asarray(verts, dtype=np.float64))
    return polys


def read_monuseg_xml(path, shape_rc) -> np.ndarray:
    """Rasterise MoNuSeg / Aperio ImageScope XML polygons into ``uint32 (H, W)`` instance labels.

    Vertices are (x = column, y = row) in pixels of the tile; later regions overlap earlier ones.
    """
    return _raster_polygons(monuseg_xml_polygons(path), tuple(shape_rc))


def read_qupath_geojson(path, shape_rc) -> np.ndarray:
    """Rasterise QuPath GeoJSON objects (annotations or detections; Polygon/MultiPolygon) exported over
    an image into ``uint32 (H, W)`` labels, in file order (later objects overwrite earlier ones).
    Coordinates are pixels of the image (x = column, y = row). ``.geojson.gz`` is accepted.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot parse GeoJSON ({exc})") from None
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        feats = data.get("features", [])
    elif isinstance(data, dict):
        feats = [data]
    else:
        feats = data
    polys = []
    for feat in feats:
        geom = feat.get("geometry", feat) if isinstance(feat, dict) else None
        if not geom:
            continue
        if geom.get("type") == "Polygon":
            polys.append(np.asarray(geom["coordinates"][0], dtype=np.float64))
        elif geom.get("type") == "MultiPolygon":
            parts = [np.asarray(p[0], dtype=np.float64) for p in geom["coordinates"]]
            if parts:
                polys.append(max(parts, key=len))
    return _raster_polygons(polys, tuple(shape_rc))


def read_truth(path, shape_rc=None) -> np.ndarray:
    """Ground truth from a label image, ImageScope XML or QuPath GeoJSON (the latter two need ``shape_rc``)."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".xml") or name.endswith(".geojson") or name.endswith(".json") or name.endswith(".geojson.gz"):
        if shape_rc is None:
            raise InputError(f"{path}: polygon annotations need the image shape")
        return read_monuseg_xml(path, shape_rc) if name.endswith(".xml") else read_qupath_geojson(path, shape_rc)
    return read_labels(path)
