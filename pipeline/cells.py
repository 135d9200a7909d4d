"""QuPath cells: each final nucleus grown by ``D`` µm, Voronoi-limited, clipped to tissue.

Rule (per store pixel ``p``, centre at ``(col + 0.5, row + 0.5)``): with ``d(p, j)`` the Euclidean
distance from ``p`` to the nearest pixel centre of nucleus ``j`` (its polygon rasterised by pixel
centre), ``p`` belongs to the cell of the nucleus minimising ``(d(p, j), nucleus_id)`` if that
distance is at most ``D / mpp`` px and ``p`` is tissue (nucleus pixels always belong to their own
cell). This is the discrete form of QuPath's cell expansion (``CellTools.detectionsToCells``:
buffer by ``D``, split between neighbours by the Voronoi tessellation of the nuclei), with an
explicit tie rule, so the label of a pixel depends only on the final nuclei near it, never on the
window it is computed in. Cell outlines are traced with :func:`pipeline.geometry.labels_to_polygons`
(marching squares on the cell label image), so neighbouring cells share their boundary exactly.
Each cell is then made to contain its nucleus and to avoid every other nucleus:
``cell = (outline ∪ nucleus) - other nuclei`` (this only changes clipped nuclei, whose polygons
do not follow pixel edges); cells never overlap.

Streaming (:func:`iter_with_cells`): the cells are computed from the *final* (deduplicated,
numbered) nuclei, strip by strip as :mod:`pipeline.assemble` yields them, so disagreeing windows
cannot produce disagreeing cells. A strip is cut into tiles of one chunk (by rounded anchor
column), each rasterised with the nuclei of the strip above, itself and the strip below that
come within reach: memory is a few strips of nuclei plus one tile raster. The strips above and
below suffice when ``chunk_px > 2 * (halo_px + anchor_eps_px + D / mpp) + 4`` (a nucleus lies
within ``halo_px`` of its anchor, :func:`pipeline.stitch.check_halo`); :func:`check_reach` raises
otherwise.

Columns added to the strip tables: ``cell_geometry`` (WKB Polygon, store px) and
:data:`CELL_COLUMNS` (float64).
"""

from __future__ import annotations

import logging
from collections import deque

import numpy as np
import pyarrow as pa
import shapely
from scipy.ndimage import distance_transform_edt

from . import geometry, measure
from .errors import ConfigError, StitchError

log = logging.getLogger(__name__)

#: Cell measurement columns (float64), in output order.
CELL_COLUMNS = (
    "cell_area_um2",
    "cell_perimeter_um",
    "cell_circularity",
    "cell_hematoxylin_od_mean",
    "cell_hematoxylin_od_std",
    "cell_eosin_od_mean",
    "cell_eosin_od_std",
    "cytoplasm_hematoxylin_od_mean",
    "cytoplasm_hematoxylin_od_std",
    "cytoplasm_eosin_od_mean",
    "cytoplasm_eosin_od_std",
    "nucleus_cell_area_ratio",
)

#: Column -> QuPath measurement name of a cell (see docs/outputs.md, "Cells").
CELL_QUPATH_NAMES = {
    "cell_area_um2": "Cell: Area µm^2",
    "cell_perimeter_um": "Cell: Perimeter µm",
    "cell_circularity": "Cell: Circularity",
    **{
        f"{comp}_{stain}_od_{stat}": f"{comp.capitalize()}: {stain.capitalize()} OD {'std dev' if stat == 'std' else stat}"
        for comp in ("cell", "cytoplasm")
        for stain in measure.STAINS
        for stat in ("mean", "std")
    },
    "nucleus_cell_area_ratio": "Nucleus/Cell area ratio",
}

#: Nucleus measurements keep their name without prefix in a cell (positions and the model score).
UNPREFIXED = {"centroid_x_um", "centroid_y_um", "score"}


def nucleus_name(column):
    """QuPath name of a nucleus measurement written on a cell (``Nucleus: Area µm^2``)."""
    name = measure.QUPATH_NAMES[column]
    return name if column in UNPREFIXED else f"Nucleus: {name}"


def check_reach(chunk_px, halo_px, eps_px, expansion_px):
    """Raise :class:`ConfigError` if the strips above and below cannot hold every competing nucleus."""
    need = 2 * (float(halo_px) + float(eps_px) + float(expansion_px)) + 4
    if chunk_px <= need:
        raise ConfigError(
            f"--cell-expansion-um {expansion_px:g} px with halo {halo_px} px needs a store chunk larger than "
            f"{need:.0f} px (now {chunk_px}); use a smaller expansion or re-tile with a larger --chunk")


def _raster_masks(polys, box):
    """Pixel-centre masks of polygons: list of (r0, c0, bool mask) in global store px, or None if empty."""
    out = []
    for g, (minx, miny, maxx, maxy) in zip(polys, shapely.bounds(polys)):
        if not np.isfinite(minx):
            out.append(None)
            continue
        r0, r1 = int(np.floor(miny)), int(np.ceil(maxy))
        c0, c1 = int(np.floor(minx)), int(np.ceil(maxx))
        yy, xx = np.mgrid[r0:r1, c0:c1]
        m = shapely.contains_xy(g, xx + 0.5, yy + 0.5)
        out.append((r0, c0, m) if m.any() else None)
    return out


def _part_holding(geoms, nuclei):
    """Per geometry, its Polygon part that overlaps its nucleus most (ties: the larger part).

    A cell's pixels can fall apart (the expansion reaches a tissue piece the nucleus is not on);
    the cell is the part holding the nucleus, not the largest one.
    """
    geoms = np.asarray(geoms, dtype=object)
    out = geometry.largest_polygon(geoms)
    multi = shapely.get_num_geometries(geoms) > 1
    if not multi.any():
        return out
    sub = np.flatnonzero(multi)
    parts, index = shapely.get_parts(geoms[sub], return_index=True)
    poly = shapely.get_type_id(parts) == 3
    parts, index = parts[poly], index[poly]
    inter = shapely.area(shapely.intersection(parts, nuclei[sub][index]))
    order = np.lexsort((-shapely.area(parts), -inter, index))
    first = np.ones(len(order), dtype=bool)
    first[1:] = index[order][1:] != index[order][:-1]
    out[sub[index[order[first]]]] = parts[order[first]]
    return out


def tile_cells(nuclei, nucleus_ids, own, *, expansion_px, box, tissue, rgb, mpp):
    """Cells of the ``own`` nuclei of one tile raster (pure).

    Parameters
    ----------
    nuclei : numpy.ndarray of shapely.Polygon, shape (K,)
        Every final nucleus that can reach the raster (store px), including the owned ones.
    nucleus_ids : numpy.ndarray, int64, shape (K,)
        Their final ids (the tie rule).
    own : numpy.ndarray, bool, shape (K,)
        Nuclei whose cells are wanted.
    expansion_px : float
        ``D / mpp``.
    box : tuple of int
        Raster ``(r0, c0, r1, c1)``, store px, half-open; holds every wanted cell.
    tissue : numpy.ndarray, bool, shape (r1 - r0, c1 - c0)
    rgb : numpy.ndarray, uint8, shape (r1 - r0, c1 - c0, 3)
    mpp : float
        µm per store px.

    Returns
    -------
    cells : numpy.ndarray of shapely.Polygon, shape (own.sum(),)
        In the order of ``nuclei[own]``.
    values : dict of str -> numpy.ndarray, float64, shape (own.sum(),)
        :data:`CELL_COLUMNS`.
    """
    r0, c0, r1, c1 = box
    h, w = r1 - r0, c1 - c0
    order = np.argsort(nucleus_ids, kind="stable")
    best_d2 = np.full((h, w), np.inf)
    best = np.zeros((h, w), np.uint32)  # 1 + index into nuclei
    e2 = float(expansion_px) ** 2
    pad = int(np.ceil(expansion_px)) + 1
    masks = _raster_masks(nuclei, box)
    nucleus_px = np.zeros((h, w), bool)
    for j in order.tolist():  # ascending id: a strict improvement keeps the smaller id on ties
        if masks[j] is None:
            continue
        mr, mc, m = masks[j]
        crop = np.pad(~m, pad, constant_values=True)
        d2 = np.rint(distance_transform_edt(crop) ** 2)
        gr, gc = mr - pad, mc - pad  # global origin of the crop
        ar0, ac0 = max(gr, r0), max(gc, c0)
        ar1, ac1 = min(gr + crop.shape[0], r1), min(gc + crop.shape[1], c1)
        if ar1 <= ar0 or ac1 <= ac0:
            continue
        sub = d2[ar0 - gr : ar1 - gr, ac0 - gc : ac1 - gc]
        view_d, view_b = best_d2[ar0 - r0 : ar1 - r0, ac0 - c0 : ac1 - c0], best[ar0 - r0 : ar1 - r0, ac0 - c0 : ac1 - c0]
        better = (sub <= e2) & (sub < view_d)
        view_d[better] = sub[better]
        view_b[better] = j + 1
        nucleus_px[ar0 - r0 : ar1 - r0, ac0 - c0 : ac1 - c0] |= sub == 0
    best[~(tissue | (best_d2 == 0))] = 0  # the expansion stays in tissue; nucleus pixels stay
    own_idx = np.flatnonzero(own)
    want = own_idx + 1
    ids, outlines = geometry.labels_to_polygons(best, offset_rc=(r0, c0))
    lookup = np.full(len(nuclei) + 1, -1, np.int64)
    lookup[ids] = np.arange(len(ids))
    cells = np.empty(len(own_idx), dtype=object)
    pos = lookup[want]
    cells[pos >= 0] = outlines[pos[pos >= 0]]
    cells[pos < 0] = nuclei[own_idx[pos < 0]]  # no pixel centre inside: the cell is the nucleus
    # a cell outline encloses other cells only if its pixels ring them: cut those out again
    counts = np.bincount(best.ravel(), minlength=len(nuclei) + 1)[want]
    holes = (pos >= 0) & (shapely.area(cells) > counts - 0.5 + 1e-6)
    for k in np.flatnonzero(holes).tolist():
        inner = outlines[shapely.STRtree(outlines).query(cells[k], predicate="contains_properly")]
        if len(inner):
            cells[k] = shapely.difference(cells[k], shapely.union_all(inner))
    # contain the own nucleus, avoid every other one
    mine = nuclei[own_idx]
    out_of_cell = ~shapely.covers(cells, mine)
    if out_of_cell.any():
        cells[out_of_cell] = shapely.union(cells[out_of_cell], mine[out_of_cell])
    tree = shapely.STRtree(nuclei)
    a, b = tree.query(cells, predicate="intersects")
    sel = own_idx[a] != b
    a, b = a[sel], b[sel]
    if len(a):
        inter = shapely.area(shapely.intersection(cells[a], nuclei[b]))
        pos_area = inter > 1e-9
        for k in np.unique(a[pos_area]).tolist():
            cells[k] = shapely.difference(cells[k], shapely.union_all(nuclei[b[pos_area & (a == k)]]))
    cells = geometry.clean_polygons(_part_holding(cells, mine))

    # measurements: shape from the outline, intensities from the cell / cytoplasm pixels
    shape = measure.shape_measurements(cells, mpp)
    cell_lab = best
    cyto_lab = np.where(nucleus_px, 0, best).astype(np.uint32)
    present = np.bincount(cell_lab.ravel(), minlength=len(nuclei) + 1)[want] > 0
    present_c = np.bincount(cyto_lab.ravel(), minlength=len(nuclei) + 1)[want] > 0
    vals = {}
    for prefix, lab, ok in (("cell", cell_lab, present), ("cytoplasm", cyto_lab, present_c)):
        inten = {c: np.full(len(own_idx), np.nan) for c in measure.INTENSITY_COLUMNS}
        if ok.any():
            got = measure.intensity_measurements(lab, rgb, want[ok])
            for c in measure.INTENSITY_COLUMNS:
                inten[c][ok] = got[c]
        for stain in measure.STAINS:
            for stat in ("mean", "std"):
                vals[f"{prefix}_{stain}_od_{stat}"] = inten[f"{stain}_od_{stat}"]
    nuc_area = shapely.area(mine) * mpp * mpp
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(shape["area_um2"] > 0, nuc_area / shape["area_um2"], np.nan)
    values = {
        "cell_area_um2": shape["area_um2"],
        "cell_perimeter_um": shape["perimeter_um"],
        "cell_circularity": shape["circularity"],
        **vals,
        "nucleus_cell_area_ratio": ratio,
    }
    return cells, {c: values[c] for c in CELL_COLUMNS}


def _strip_cells(cur, context, *, expansion_px, chunk_px, group, shape_rc, mpp):
    """``cur`` (a strip table) with ``cell_geometry`` and :data:`CELL_COLUMNS` appended."""
    from .store import read_tissue_window, read_window

    n = cur.num_rows
    cells = np.empty(n, dtype=object)
    values = {c: np.full(n, np.nan) for c in CELL_COLUMNS}
    if n:
        polys = geometry.from_wkb(cur["geometry"])
        ctx_polys = geometry.from_wkb(context["geometry"])
        ctx_ids = context["nucleus_id"].to_numpy()
        ctx_bounds = shapely.bounds(ctx_polys)
        cur_ids = cur["nucleus_id"].to_numpy()
        _, ax = np.floor(cur["anchor_y_px"].to_numpy() + 0.5), np.floor(cur["anchor_x_px"].to_numpy() + 0.5)
        tile = np.floor_divide(ax.astype(np.int64), chunk_px)
        bounds = shapely.bounds(polys)
        reach = expansion_px + 2
        H, W = shape_rc
        for t in np.unique(tile).tolist():
            rows = np.flatnonzero(tile == t)
            lo = np.floor(bounds[rows, :2].min(axis=0) - reach).astype(int)
            hi = np.ceil(bounds[rows, 2:].max(axis=0) + reach).astype(int)
            r0, c0 = max(int(lo[1]), 0), max(int(lo[0]), 0)
            r1, c1 = min(int(hi[1]), H), min(int(hi[0]), W)
            near = ((ctx_bounds[:, 0] < c1 + reach) & (ctx_bounds[:, 2] > c0 - reach)
                    & (ctx_bounds[:, 1] < r1 + reach) & (ctx_bounds[:, 3] > r0 - reach))
            idx = np.flatnonzero(near)
            own = np.isin(ctx_ids[idx], cur_ids[rows])
            # rows of cur in the order of the owned context nuclei
            where = np.searchsorted(cur_ids, ctx_ids[idx][own])
            tissue = read_tissue_window(group, r0, c0, r1 - r0, c1 - c0)
            rgb = read_window(group, r0, c0, r1 - r0, c1 - c0)
            got, vals = tile_cells(ctx_polys[idx], ctx_ids[idx], own, expansion_px=expansion_px,
                                   box=(r0, c0, r1, c1), tissue=tissue, rgb=rgb, mpp=mpp)
            cells[where] = got
            for c in CELL_COLUMNS:
                values[c][where] = vals[c]
    out = cur.append_column("cell_geometry", pa.array(geometry.to_wkb(cells) if n else [], type=pa.binary()))
    for c in CELL_COLUMNS:
        out = out.append_column(c, pa.array(values[c], type=pa.float64()))
    return out


def iter_with_cells(strips, *, group, attrs, expansion_um, halo_px, eps_px):
    """Strip tables (:func:`pipeline.assemble.iter_nuclei`) with their cells, strip by strip.

    Parameters
    ----------
    strips : iterable of pyarrow.Table
        Final nuclei in id order (``nucleus_id``, ``geometry``, anchors).
    group, attrs
        The tile store (:func:`pipeline.store.open_store`): tissue mask and pixels.
    expansion_um : float
        ``D``, µm (> 0).
    halo_px, eps_px : float
        Of the chunk files (a nucleus lies within ``halo_px`` of its anchor).

    Yields
    ------
    pyarrow.Table
        Each strip with ``cell_geometry`` and :data:`CELL_COLUMNS`.

    Raises
    ------
    ConfigError
        If the chunk is too small for the expansion (:func:`check_reach`).
    StitchError
        If a nucleus lies farther than ``halo_px`` from its anchor (the reach would not hold).
    """
    mpp = float(attrs["mpp"])
    chunk_px = int(attrs["chunk_px"])
    expansion_px = float(expansion_um) / mpp
    check_reach(chunk_px, halo_px, eps_px, expansion_px)
    shape_rc = tuple(int(v) for v in attrs["shape_rc"])
    window = deque()  # (strip index, table): the strip above, the current one, the one below

    def strip_of(t):
        return int(np.floor(t["anchor_y_px"].to_numpy()[0] + 0.5)) // chunk_px

    def check_extent(t):
        b = shapely.bounds(geometry.from_wkb(t["geometry"]))
        ay, ax = t["anchor_y_px"].to_numpy(), t["anchor_x_px"].to_numpy()
        ext = np.nanmax(np.abs(np.stack([b[:, 0] - ax, b[:, 2] - ax, b[:, 1] - ay, b[:, 3] - ay])), initial=0.0)
        if ext > halo_px + eps_px + 1:
            raise StitchError(f"a nucleus reaches {ext:.0f} px from its anchor, more than halo_px={halo_px}: "
                              "cells cannot be computed strip by strip")

    def emit(k):
        s, cur = window[k]
        ctx = [t for i, t in window if abs(i - s) <= 1]
        return _strip_cells(cur, pa.concat_tables(ctx), expansion_px=expansion_px, chunk_px=chunk_px,
                            group=group, shape_rc=shape_rc, mpp=mpp)

    for t in strips:
        if not t.num_rows:
            continue
        check_extent(t)
        window.append((strip_of(t), t))
        # the strip before the newest one has every neighbour it can have (strips come in order)
        if len(window) >= 2:
            yield emit(len(window) - 2)
        while len(window) > 2:
            window.popleft()
    if window:
        yield emit(len(window) - 1)
