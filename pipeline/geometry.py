"""Label images -> nucleus polygons, and small vectorised polygon helpers (pure, no I/O).

Frame
-----
All polygons here are in **store pixels, continuous coordinates**: pixel ``(row r, col c)`` of the
store's level 0 covers ``[c, c+1) x [r, r+1)``, so its centre is ``(x=c+0.5, y=r+0.5)``. This is
QuPath's convention for level-0 pixels too, so the export only scales (see ``pipeline/export.py``).

Outline
-------
Each label is outlined with marching squares (``skimage.measure.find_contours`` at level 0.5) on
its own bounding-box crop padded by one pixel. On a binary mask the 0.5 iso-line runs through the
midpoints of the boundary pixel edges: straight runs follow the pixel edges exactly and each
convex (concave) corner is cut (filled) by a 1/8 px triangle, so a simply connected mask of ``n``
pixels gives a polygon of area exactly ``n - 0.5`` px^2 (before simplification) and a perimeter much closer to the true
outline than the pixel staircase. Two labels that touch share their boundary segment exactly.

Then, per polygon: holes are dropped and only the largest part is kept (nuclei are simple
shapes); collinear vertices are removed (Douglas-Peucker with tolerance 0, lossless: the outline
is unchanged, vertex counts drop ~3x). The outline is deliberately *not* simplified further: a
lossy simplification moves the shared boundary of two touching nuclei differently for each of
them, so they would overlap by slivers, and a nucleus would no longer be identical whether it is
extracted from one window or another. (Perimeter-based measurements smooth the outline
themselves, see :mod:`pipeline.measure`.) Finally coordinates are snapped to the 0.01 px grid that QuPath
>= 0.6 reduces to (``GeometryPrecisionReducer`` with ``PrecisionModel(-0.01)``) and validity is
enforced (``make_valid`` then the largest Polygon part).
"""

from __future__ import annotations

import numpy as np
import shapely
from scipy import ndimage
from skimage.measure import find_contours

from .errors import InputError

#: Douglas-Peucker tolerance of the outline simplification, store px: 0 = drop collinear vertices only.
SIMPLIFY_PX = 0.0
#: Grid size coordinates are snapped to (QuPath >= 0.6 reduces geometries to 0.01 px).
PRECISION_PX = 0.01

_EMPTY_POLYGON = shapely.Polygon()


def labels_to_polygons(labels, *, offset_rc=(0, 0)):
    """One polygon per label of a label image.

    Parameters
    ----------
    labels : numpy.ndarray, uint32, shape (H, W)
        Instance labels, 0 = background. Labels need not be consecutive.
    offset_rc : tuple of int
        Global store-px (row, col) of ``labels[0, 0]``; added to every coordinate.

    Returns
    -------
    ids : numpy.ndarray, int64, shape (K,)
        The labels present, ascending.
    polygons : numpy.ndarray of shapely.Polygon, shape (K,)
        Outline of each label in global store px (x = col, y = row, continuous coordinates),
        valid, closed, without holes, on the 0.01 px grid.

    Raises
    ------
    InputError
        If ``labels`` is not a 2-D integer array.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"labels must be a 2-D integer array, got {labels.dtype} {labels.shape}")
    off_r, off_c = (int(v) for v in offset_rc)
    slices = ndimage.find_objects(labels) if labels.size else []
    ids, rings, ring_len, shifts = [], [], [], []
    for index, sl in enumerate(slices):
        if sl is None:
            continue
        label = index + 1
        sub = labels[sl]
        crop = np.zeros((sub.shape[0] + 2, sub.shape[1] + 2), dtype=np.float32)
        crop[1:-1, 1:-1] = sub == label
        contours = [c for c in find_contours(crop, 0.5) if len(c) >= 4]
        best = contours[0] if contours else None
        if len(contours) > 1:  # holes or several parts: keep the largest outline
            areas = [abs(_shoelace(c)) for c in contours]
            best = contours[int(np.argmax(areas))]
        if best is None:  # pragma: no cover - a non-empty mask always has a closed contour
            continue
        if not np.array_equal(best[0], best[-1]):
            best = np.vstack([best, best[:1]])
        ids.append(label)
        rings.append(best[:, ::-1])  # (x=col, y=row), crop-local padded index coordinates
        ring_len.append(len(best))
        # padded index p -> global continuous coordinate p - 1 + start + offset + 0.5
        shifts.append((sl[1].start + off_c - 0.5, sl[0].start + off_r - 0.5))
    if not ids:
        return np.zeros(0, np.int64), np.empty(0, dtype=object)
    coords = np.concatenate(rings)
    ring_index = np.repeat(np.arange(len(ids)), ring_len)
    polys = shapely.polygons(shapely.linearrings(coords, indices=ring_index))
    polys = shapely.simplify(polys, SIMPLIFY_PX, preserve_topology=False)  # validity enforced below
    polys = translate(polys, np.asarray(shifts, dtype=np.float64))
    return np.asarray(ids, dtype=np.int64), clean_polygons(polys, drop_holes=True)


def _shoelace(ring):
    """Signed area of a closed (N, 2) ring."""
    a, b = ring[:, 0], ring[:, 1]
    return 0.5 * (np.dot(a[:-1], b[1:]) - np.dot(b[:-1], a[1:]))


def translate(geoms, shift_xy):
    """Translate each geometry by its own (dx, dy).

    Parameters
    ----------
    geoms : numpy.ndarray of shapely geometries, shape (K,)
    shift_xy : numpy.ndarray, float64, shape (K, 2) or (2,)

    Returns
    -------
    numpy.ndarray of shapely geometries, shape (K,)
    """
    geoms = np.asarray(geoms, dtype=object)
    shift_xy = np.broadcast_to(np.asarray(shift_xy, dtype=np.float64), (len(geoms), 2))
    coords, index = shapely.get_coordinates(geoms, return_index=True)
    return shapely.set_coordinates(geoms.copy(), coords + shift_xy[index])


def scale_translate(geoms, scale_xy, offset_xy=(0.0, 0.0)):
    """Affine map ``x' = x * sx + ox``, ``y' = y * sy + oy`` of every geometry (vectorised)."""
    geoms = np.asarray(geoms, dtype=object)
    coords = shapely.get_coordinates(geoms)
    coords = coords * np.asarray(scale_xy, dtype=np.float64) + np.asarray(offset_xy, dtype=np.float64)
    return shapely.set_coordinates(geoms.copy(), coords)


def largest_polygon(geoms):
    """The largest Polygon part of each geometry (empty Polygon where there is none).

    Parameters
    ----------
    geoms : numpy.ndarray of shapely geometries, shape (K,)

    Returns
    -------
    numpy.ndarray of shapely.Polygon, shape (K,)
    """
    geoms = np.asarray(geoms, dtype=object)
    out = np.full(len(geoms), _EMPTY_POLYGON, dtype=object)
    if not len(geoms):
        return out
    parts, index = shapely.get_parts(geoms, return_index=True)
    # make_valid may return collections nesting multipolygons: flatten twice
    nested = shapely.get_type_id(parts) == 6
    if nested.any():
        sub, sub_index = shapely.get_parts(parts[nested], return_index=True)
        parts = np.concatenate([parts[~nested], sub])
        index = np.concatenate([index[~nested], index[nested][sub_index]])
    is_poly = shapely.get_type_id(parts) == 3
    parts, index = parts[is_poly], index[is_poly]
    if not len(parts):
        return out
    area = shapely.area(parts)
    order = np.lexsort((-area, index))  # per geometry, largest first (stable on ties)
    first = np.ones(len(order), dtype=bool)
    first[1:] = index[order][1:] != index[order][:-1]
    pick = order[first]
    out[index[pick]] = parts[pick]
    return out


def clean_polygons(geoms, *, drop_holes=False):
    """Snap to the 0.01 px grid and make every geometry one valid Polygon.

    Coordinates are rounded to the grid (``shapely.set_precision(g, 0.01, mode="pointwise")``);
    geometries that are invalid after rounding are instead repaired (``make_valid``, largest
    Polygon part) and reduced with GEOS's topology-aware ``set_precision`` (valid-output mode);
    parts that split on the grid keep the largest Polygon. QuPath >= 0.6's precision reduction to the same
    grid cannot fail on the result.

    Parameters
    ----------
    geoms : numpy.ndarray of shapely geometries, shape (K,)
    drop_holes : bool
        Keep only the exterior ring of each polygon.

    Returns
    -------
    numpy.ndarray of shapely.Polygon, shape (K,)
        Valid polygons (possibly empty if a geometry collapsed on the grid).
    """
    geoms = np.array(geoms, dtype=object)  # copy
    # fast path: round every coordinate to the grid and keep what stays valid
    snapped = shapely.set_precision(geoms, PRECISION_PX, mode="pointwise")
    bad = ~shapely.is_valid(snapped)
    if bad.any():  # slow path: repair, then the topology-aware reduction (needs valid input)
        fix = geoms[bad]
        invalid = ~shapely.is_valid(fix)
        if invalid.any():
            fix[invalid] = largest_polygon(shapely.make_valid(fix[invalid]))
        snapped[bad] = shapely.set_precision(fix, PRECISION_PX, mode="valid_output")
    geoms = snapped
    not_poly = shapely.get_type_id(geoms) != 3
    if not_poly.any():
        geoms[not_poly] = largest_polygon(geoms[not_poly])
    if drop_holes:
        holes = shapely.get_num_interior_rings(geoms) > 0
        if holes.any():
            geoms[holes] = shapely.polygons(shapely.get_exterior_ring(geoms[holes]))
    return geoms


def pair_iou(a, b):
    """Intersection over union of polygon pairs (vectorised).

    Parameters
    ----------
    a, b : numpy.ndarray of shapely geometries, shape (P,)

    Returns
    -------
    iou : numpy.ndarray, float64, shape (P,)
        0 where the union is empty.
    inter : numpy.ndarray, float64, shape (P,)
        Intersection areas (same units as the input, squared).
    """
    inter = shapely.area(shapely.intersection(a, b))
    union = shapely.area(a) + shapely.area(b) - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / union, 0.0)
    return iou, inter


def to_wkb(geoms):
    """WKB (little-endian, 2-D) bytes of each geometry, as a numpy object array."""
    return shapely.to_wkb(np.asarray(geoms, dtype=object), hex=False, output_dimension=2, byte_order=1)


def from_wkb(values):
    """Shapely geometries from an iterable/array of WKB bytes (or a pyarrow binary array)."""
    if hasattr(values, "to_numpy"):
        values = values.to_numpy(zero_copy_only=False)
    return shapely.from_wkb(np.asarray(values, dtype=object))
