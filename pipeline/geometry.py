"""Label images -> nucleus polygons, and small vectorised polygon helpers (pure, no I/O).

Frame
-----
All polygons here are in **store pixels, continuous coordinates**: pixel ``(row r, col c)`` of the
store's level 0 covers ``[c, c+1) x [r, r+1)``, so its centre is ``(x=c+0.5, y=r+0.5)``. This is
QuPath's convention for level-0 pixels too, so the export only scales (see ``pipeline/export.py``).

Outline
-------
Every label is outlined with marching squares at level 0.5 of its own binary mask (the contour
``skimage.measure.find_contours(mask, 0.5)`` gives on a one-pixel padded crop), for all labels of
the image at once: the boundary cells of the label image are found with array shifts, each yields
its oriented segments from a 16-case table (per label present in the cell), and segments are
linked into rings by pointer jumping (no per-object loop). On a binary mask the 0.5 iso-line runs
through the midpoints of the boundary pixel edges: straight runs follow the pixel edges exactly and
each convex (concave) corner is cut (filled) by a 1/8 px triangle, so a simply connected mask of
``n`` pixels gives a polygon of area exactly ``n - 0.5`` px^2 and a perimeter much closer to the
true outline than the pixel staircase. Two labels that touch share their boundary segment exactly.
At a saddle (two diagonal pixels) a label's pixels stay apart (``fully_connected="low"``), so a
ring is the outline of one 4-connected part.

Per label, only the largest ring is kept: the outline of its largest part, without holes (nuclei
are simple shapes). Collinear vertices are removed (lossless: the outline is unchanged, vertex
counts drop ~3x). The outline is deliberately *not* simplified further: a lossy simplification
moves the shared boundary of two touching nuclei differently for each of them, so they would
overlap by slivers, and a nucleus would no longer be identical whether it is extracted from one
window or another. (Perimeter-based measurements smooth the outline themselves, see
:mod:`pipeline.measure`.) A ring starts in its first boundary cell in raster order (a choice that
depends on the label's own pixels only), so a nucleus gets identical coordinates, vertex for
vertex, from any window that sees it whole.

Validity holds by construction: vertices are pixel-edge midpoints (multiples of 0.5 px, on the
0.01 px grid QuPath >= 0.6 reduces to with ``GeometryPrecisionReducer``), a ring passes each
midpoint at most once and marching-squares segments do not cross, so every ring is simple.
:func:`clean_polygons` (snap + repair) is for geometries computed later (clipping, rescaling).
"""

from __future__ import annotations

import numpy as np
import shapely

from .errors import InputError

#: Grid size coordinates are snapped to (QuPath >= 0.6 reduces geometries to 0.01 px).
PRECISION_PX = 0.01

_EMPTY_POLYGON = shapely.Polygon()


# Marching-squares cases of one label in a 2x2 cell of pixel centres. Corners: 0 TL, 1 TR, 2 BL,
# 3 BR at (x, y) = (0, 0), (1, 0), (0, 1), (1, 1) (x right, y down); edge midpoints: 0 top, 1 bottom,
# 2 left, 3 right. ``_EDGE_CORNERS[e]`` = (first, second) pixel of the midpoint (left/right or
# top/bottom), so a midpoint plus "which of its two pixels is the label" is a unique boundary key.
_CORNER_XY = np.array([(0, 0), (1, 0), (0, 1), (1, 1)], dtype=np.float64)
_EDGE_XY = np.array([(0.5, 0), (0.5, 1), (0, 0.5), (1, 0.5)])
_EDGE_CORNERS = ((0, 1), (2, 3), (0, 2), (1, 3))


def _case_table():
    """Segments of one label in a cell, per configuration ``cfg`` (bit k = corner k is the label).

    Returns ``n_seg`` (16,) and ``seg`` (4, 16, 2): start edge, end edge, start side, end side of
    segment j. Segments are oriented so that the label lies on the same side of every segment
    (exterior rings come out counter-clockwise in shapely's sense, holes clockwise). A saddle (two
    diagonal corners) keeps the label's corners apart, as ``find_contours``' default
    ``fully_connected="low"``: a label's outline follows its 4-connected pixels.
    """
    n_seg = np.zeros(16, np.int64)
    seg = np.zeros((4, 16, 2), np.int64)
    for cfg in range(1, 15):
        high = [k for k in range(4) if cfg >> k & 1]
        crossing = [e for e, (a, b) in enumerate(_EDGE_CORNERS) if (a in high) != (b in high)]
        if len(crossing) == 4:
            pairs = [([e for e in crossing if h in _EDGE_CORNERS[e]], _CORNER_XY[h]) for h in high]
        else:
            pairs = [(crossing, _CORNER_XY[high].mean(axis=0))]
        for j, ((e0, e1), inside) in enumerate(pairs):
            d, v = _EDGE_XY[e1] - _EDGE_XY[e0], inside - _EDGE_XY[e0]
            if d[0] * v[1] - d[1] * v[0] < 0:
                e0, e1 = e1, e0
            seg[:, cfg, j] = (e0, e1, int(_EDGE_CORNERS[e0][0] not in high), int(_EDGE_CORNERS[e1][0] not in high))
        n_seg[cfg] = len(pairs)
    return n_seg, seg


_N_SEG, _SEG = _case_table()


def _boundary_segments(labels, ids):
    """Oriented marching-squares segments of every label (in ``ids`` if given), all at once.

    Returns ``start`` and ``end`` boundary keys (int64, (S,)) and the label of each segment. The
    key of a pixel-edge midpoint is ``4 * k + 2 * e + side`` in the padded image (``k`` = flat
    index of its first pixel, ``e`` = 0 between horizontal neighbours, 1 between vertical ones,
    ``side`` = 0 if the label is the first pixel), so segment ``i`` is followed by the segment
    whose ``start`` equals ``end[i]``.
    """
    h, w = labels.shape
    wp = w + 2
    pad = np.zeros((h + 2, wp), dtype=labels.dtype)
    pad[1:-1, 1:-1] = labels
    f = pad.ravel()
    # cell k (TL pixel k, padded flat index) is a boundary cell iff its four pixels are not all equal;
    # row wrap-around compares padding with padding (equal), so flat shifts are exact
    dh = f[1:] != f[:-1]
    dv = f[wp:] != f[:-wp]
    n_cell = len(f) - wp - 1
    cell = dh[:n_cell] | dv[:n_cell]
    cell |= dh[wp : wp + n_cell]
    cell |= dv[1 : 1 + n_cell]
    k = np.flatnonzero(cell)
    corner = (f[k], f[k + 1], f[k + wp], f[k + wp + 1])
    eq = {(s, t): corner[s] == corner[t] for s in range(4) for t in range(s + 1, 4)}
    wanted = None
    if ids is not None:
        wanted = np.zeros(int(f.max()) + 1, dtype=bool)
        wanted[ids[ids <= f.max()]] = True
    m = len(k)
    first = np.empty((m, 4), dtype=bool)  # (cell, slot): slot s handles its label if no earlier corner has it
    cfg = np.zeros((m, 4), dtype=np.int64)  # that label's configuration in the cell
    for s in range(4):
        fs = corner[s] != 0
        for t in range(s):
            fs &= ~eq[t, s]
        if wanted is not None:
            fs &= wanted[corner[s]]
        first[:, s] = fs
        cfg[:, s] = 1 << s
        for t in range(s + 1, 4):
            cfg[:, s] |= eq[s, t].astype(np.int64) << t
    sel = np.flatnonzero(first)  # cell-major: segments come in raster order of their cells
    cell_i, slot = np.divmod(sel, 4)
    k, cfg = k[cell_i], cfg.ravel()[sel]
    lab = np.stack(corner, axis=1).ravel()[sel]
    n = _N_SEG[cfg]
    k, lab, cfg = np.repeat(k, n), np.repeat(lab, n), np.repeat(cfg, n)
    j = np.zeros(len(k), dtype=np.int64)
    j[np.cumsum(n)[n == 2] - 1] = 1  # second segment of a saddle
    e0, e1, s0, s1 = _SEG[:, cfg, j]
    key_off = np.array([0, 4 * wp, 2, 6])  # midpoint key offset of edges T, B, L, R from 4 * k
    return 4 * k + key_off[e0] + s0, 4 * k + key_off[e1] + s1, lab


def _trace_rings(start, end, n_keys):
    """Link segments into closed rings (pointer jumping, vectorised).

    Returns ``succ`` (next segment), ``ring`` (ring number, in order of the ring's smallest
    segment index) and ``rank`` (position along the ring, 0 at that smallest segment), int64.
    """
    n = len(start)
    if n >= np.iinfo(np.int32).max:  # pragma: no cover - a 46k x 46k window of nuclei
        raise InputError(f"label image too large to outline ({n} boundary segments)")
    pos = np.empty(n_keys, dtype=np.int32)
    idx = np.arange(n, dtype=np.int32)
    pos[start] = idx
    succ = pos[end]
    # rep = smallest index over the ring: the window of 2^k segments doubles each round; once a round
    # changes nothing, every window holds its ring's minimum
    rep, jump, tmp = idx.copy(), succ.copy(), np.empty_like(idx)
    while True:
        nxt = np.minimum(rep, np.take(rep, jump, out=tmp))
        if np.array_equal(nxt, rep):
            break
        rep = nxt
        np.take(jump, jump, out=tmp)
        jump, tmp = tmp, jump
    is_rep = rep == idx
    ring = np.take(np.cumsum(is_rep) - 1, rep)
    # steps from each segment forward to its ring's rep (list ranking)
    jump = np.where(is_rep, idx, succ)
    dist = (~is_rep).astype(np.int32)
    d_tmp = np.empty_like(dist)
    while True:
        np.take(jump, jump, out=tmp)
        if np.array_equal(tmp, jump):
            break
        np.take(dist, jump, out=d_tmp)
        dist += d_tmp
        jump, tmp = tmp, jump
    length = np.bincount(ring)[ring]
    rank = (length - dist) % length
    return succ.astype(np.int64), ring, rank


def labels_to_polygons(labels, *, offset_rc=(0, 0), ids=None):
    """One polygon per label of a label image.

    Parameters
    ----------
    labels : numpy.ndarray, uint32, shape (H, W)
        Instance labels, 0 = background. Labels need not be consecutive.
    offset_rc : tuple of int
        Global store-px (row, col) of ``labels[0, 0]``; added to every coordinate.
    ids : numpy.ndarray of int, optional
        Outline only these labels (the others are ignored, not treated as background).

    Returns
    -------
    ids : numpy.ndarray, int64, shape (K,)
        The labels present (and requested), ascending.
    polygons : numpy.ndarray of shapely.Polygon, shape (K,)
        Outline of each label in global store px (x = col, y = row, continuous coordinates),
        valid, closed, counter-clockwise, without holes, on the 0.01 px grid.

    Raises
    ------
    InputError
        If ``labels`` is not a 2-D integer array.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"labels must be a 2-D integer array, got {labels.dtype} {labels.shape}")
    if labels.dtype.kind == "i" and labels.size and labels.min() < 0:
        raise InputError("labels must be >= 0")
    off_r, off_c = (int(v) for v in offset_rc)
    if ids is not None:
        ids = np.asarray(ids, dtype=np.int64)
    start, end, lab = _boundary_segments(labels, ids) if labels.size else ((), (), ())
    if not len(start):
        return np.zeros(0, np.int64), np.empty(0, dtype=object)
    wp = labels.shape[1] + 2
    succ, ring, rank = _trace_rings(start, end, 4 * (labels.shape[0] + 2) * wp)
    # vertex i = start midpoint of segment i, in doubled continuous coordinates of the image:
    # padded pixel (r, c) has its centre at (c - 0.5, r - 0.5); a midpoint lies half-way to the next pixel
    mid = start >> 1
    is_v = mid & 1
    pr, pc = np.divmod(mid >> 1, wp)
    x2 = 2 * pc - is_v
    y2 = 2 * pr - 1 + is_v
    first_seg = np.flatnonzero(rank == 0)  # one per ring, in ring order
    n_ring = len(first_seg)
    ring_label = lab[first_seg].astype(np.int64)
    area8 = np.bincount(ring, weights=x2 * y2[succ] - x2[succ] * y2, minlength=n_ring)  # 8 x signed area
    # per label, the largest ring: the outline of the largest 4-connected part (holes are negative)
    order = np.lexsort((-area8, ring_label))  # stable: ties keep the ring met first in raster order
    first = np.ones(n_ring, dtype=bool)
    first[1:] = ring_label[order][1:] != ring_label[order][:-1]
    best = order[first]
    out_ids = ring_label[best]
    slot = np.full(n_ring, -1, dtype=np.int64)
    slot[best] = np.arange(len(best))
    # lay out the chosen rings' vertices in ring order (ring start offsets + rank), no sort
    ring_len = np.bincount(ring, minlength=n_ring)
    chosen = slot[ring] >= 0
    ring_off = np.zeros(n_ring, dtype=np.int64)
    ring_off[best] = np.concatenate([[0], np.cumsum(ring_len[best])[:-1]])
    seq = np.empty(int(chosen.sum()), dtype=np.int64)
    seq[(ring_off[ring] + rank)[chosen]] = np.flatnonzero(chosen)
    # drop collinear vertices (lossless): keep vertex i iff the direction changes at i
    pred = np.empty_like(succ)
    pred[succ] = np.arange(len(succ))
    direction = np.sign(x2[succ] - x2) * 3 + np.sign(y2[succ] - y2)
    seq = seq[(direction != direction[pred])[seq]]
    coords = np.column_stack([x2[seq] * 0.5 + off_c, y2[seq] * 0.5 + off_r])
    polys = shapely.polygons(shapely.linearrings(coords, indices=slot[ring[seq]]))
    return out_ids, polys


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
