"""Per-nucleus measurements (columnar, µm units) and the per-slide summary (pure, no I/O).

Shape measurements come from the nucleus polygons (store px scaled by ``mpp`` to µm); intensity
measurements from the window pixels under each label mask, after colour deconvolution with
QuPath's default H&E stain vectors. Everything is computed for all nuclei of a chunk at once
(shapely vectorised functions, ``np.bincount``, ``scipy.ndimage`` label statistics), never with a
Python loop per nucleus.

Column names are snake_case with units; :data:`QUPATH_NAMES` maps them to the names written into
QuPath GeoJSON (the ``ObjectMeasurements`` family, see ``docs/outputs.md``).
"""

from __future__ import annotations

import math

import numpy as np
import shapely

from .errors import InputError

#: Shape columns (float64), in output order.
SHAPE_COLUMNS = (
    "area_um2",
    "perimeter_um",
    "circularity",
    "solidity",
    "max_diameter_um",
    "max_caliper_um",
    "min_diameter_um",
    "eccentricity",
    "centroid_x_um",
    "centroid_y_um",
)
STAINS = ("hematoxylin", "eosin")
STATS = ("mean", "std", "max", "min")
#: Intensity columns (float64), e.g. ``hematoxylin_od_mean``.
INTENSITY_COLUMNS = tuple(f"{stain}_od_{stat}" for stain in STAINS for stat in STATS)
MEASUREMENT_COLUMNS = SHAPE_COLUMNS + INTENSITY_COLUMNS

#: Parquet column -> QuPath measurement name (GeoJSON ``properties.measurements``).
QUPATH_NAMES = {
    "area_um2": "Area µm^2",
    "perimeter_um": "Perimeter µm",
    "circularity": "Circularity",
    "solidity": "Solidity",
    "max_diameter_um": "Max diameter µm",
    "max_caliper_um": "Max caliper µm",
    "min_diameter_um": "Min diameter µm",
    "eccentricity": "Eccentricity",
    "centroid_x_um": "Centroid X µm",
    "centroid_y_um": "Centroid Y µm",
    **{
        f"{stain}_od_{stat}": f"{stain.capitalize()} OD {'std dev' if stat == 'std' else stat}"
        for stain in STAINS
        for stat in STATS
    },
    "score": "Detection probability",
}

#: Douglas-Peucker tolerance (store px) of the outline used for the perimeter. Marching-squares
#: outlines zig-zag by up to half a pixel on oblique edges, which inflates the perimeter of a
#: digital disk by ~5 % (circularity ~0.90); simplifying by 0.5 px for the perimeter brings it
#: within ~3 % of 2 pi r (circularity ~0.96) and changes the enclosed area by < 1 %.
PERIMETER_SIMPLIFY_PX = 0.5

#: QuPath's default H&E stain vectors (``StainVector.java``), normalised to unit length.
STAIN_H = np.array([0.65, 0.70, 0.29])
STAIN_E = np.array([0.2159, 0.8012, 0.5581])

#: Columns summarised in the per-slide summary (centroids are positions, not features).
SUMMARY_COLUMNS = tuple(c for c in MEASUREMENT_COLUMNS if not c.startswith("centroid_")) + ("score",)


def stain_matrix():
    """Rows = unit stain vectors (Hematoxylin, Eosin, Residual = normalised H x E), shape (3, 3).

    This is ``ColorDeconvolutionStains`` with QuPath's H&E defaults: the residual is
    ``StainVector.makeResidualStainVector`` (the cross product, normalised).
    """
    h = STAIN_H / np.linalg.norm(STAIN_H)
    e = STAIN_E / np.linalg.norm(STAIN_E)
    r = np.cross(h, e)
    return np.stack([h, e, r / np.linalg.norm(r)])


_OD_LUT = -np.log10(np.maximum(np.arange(256, dtype=np.float64), 1.0) / 255.0)


def optical_density(rgb):
    """OD = -log10(max(v, 1) / 255) per channel (QuPath ``ColorDeconvolutionHelper.makeOD``).

    Parameters
    ----------
    rgb : numpy.ndarray, uint8, shape (..., 3)

    Returns
    -------
    numpy.ndarray, float64, shape (..., 3)
    """
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.shape[-1:] != (3,):
        raise InputError(f"rgb must be uint8 (..., 3), got {rgb.dtype} {rgb.shape}")
    return _OD_LUT[rgb]


def _stain_lut():
    """(3 channels, 256 values, 3 stains): ``OD(v) * inv(M)[channel, stain]``."""
    return _OD_LUT[None, :, None] * np.linalg.inv(stain_matrix())[:, None, :]


_STAIN_LUT = _stain_lut()
#: Per stain (H, E) and channel (R, G, B): contiguous 256-entry tables for fast gathers.
_STAIN_CHANNEL_LUT = [[np.ascontiguousarray(_STAIN_LUT[c, :, k]) for c in range(3)] for k in range(3)]


def stain_od(rgb):
    """Colour deconvolution: stain "OD" (concentration) per pixel, QuPath H&E defaults.

    ``OD_rgb = C @ M`` with ``M`` = :func:`stain_matrix`, so ``C = OD_rgb @ inv(M)``, evaluated as
    ``C_k = sum_c OD(v_c) inv(M)[c, k]`` with one 256-entry table per channel and stain.

    Parameters
    ----------
    rgb : numpy.ndarray, uint8, shape (..., 3)

    Returns
    -------
    numpy.ndarray, float64, shape (..., 3)
        Hematoxylin OD, Eosin OD, residual.
    """
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.shape[-1:] != (3,):
        raise InputError(f"rgb must be uint8 (..., 3), got {rgb.dtype} {rgb.shape}")
    return _STAIN_LUT[0][rgb[..., 0]] + _STAIN_LUT[1][rgb[..., 1]] + _STAIN_LUT[2][rgb[..., 2]]


# ----------------------------------------------------------------------------------------------
# shape


def _polygon_moments(geoms):
    """Area, centroid and central second moments of polygons via Green's theorem (vectorised).

    Holes count negatively, whatever the rings' orientation. Coordinates are taken relative to each
    polygon's first exterior vertex (precision; and the result depends on the polygon only, not on
    the batch it is computed in). Returns arrays (A, cx, cy, mu20, mu02, mu11), moments per unit
    area; NaN centroid / moments for empty polygons.
    """
    n = len(geoms)
    rings, ring_geom = shapely.get_rings(geoms, return_index=True)
    coords, coord_ring = shapely.get_coordinates(rings, return_index=True)
    if len(coords) < 2:
        nan = np.full(n, np.nan)
        return np.zeros(n), nan, nan, nan, nan, nan
    n_ring = len(rings)
    ring_start = np.searchsorted(coord_ring, np.arange(n_ring))
    geom_first_ring = np.searchsorted(ring_geom, np.arange(n))
    has = geom_first_ring < n_ring
    ref = np.zeros((n, 2))
    ref[has] = coords[ring_start[geom_first_ring[has]]]
    geom_of_coord = ring_geom[coord_ring]
    xy = coords - ref[geom_of_coord]  # centre each polygon for precision
    same = coord_ring[:-1] == coord_ring[1:]
    x0, y0 = xy[:-1][same, 0], xy[:-1][same, 1]
    x1, y1 = xy[1:][same, 0], xy[1:][same, 1]
    r = coord_ring[:-1][same]
    cross = x0 * y1 - x1 * y0

    def agg(w):  # per ring
        return np.bincount(r, weights=w, minlength=n_ring)

    ring_area = agg(cross) / 2.0
    # exterior counts positive, holes negative, whatever the orientation of each ring
    is_exterior = np.zeros(n_ring, dtype=bool)
    is_exterior[geom_first_ring[has]] = True
    sign = np.where(is_exterior, 1.0, -1.0) * np.where(ring_area < 0, -1.0, 1.0)

    def per_geom(ring_values):
        return np.bincount(ring_geom, weights=sign * ring_values, minlength=n)

    a = per_geom(ring_area)
    sx = per_geom(agg((x0 + x1) * cross)) / 6.0
    sy = per_geom(agg((y0 + y1) * cross)) / 6.0
    sxx = per_geom(agg((x0 * x0 + x0 * x1 + x1 * x1) * cross)) / 12.0
    syy = per_geom(agg((y0 * y0 + y0 * y1 + y1 * y1) * cross)) / 12.0
    sxy = per_geom(agg((x0 * y1 + 2 * x0 * y0 + 2 * x1 * y1 + x1 * y0) * cross)) / 24.0
    with np.errstate(divide="ignore", invalid="ignore"):
        cx, cy = sx / a, sy / a
        mu20 = sxx / a - cx * cx
        mu02 = syy / a - cy * cy
        mu11 = sxy / a - cx * cy
    return a, cx + ref[:, 0], cy + ref[:, 1], mu20, mu02, mu11


_PAIR_BUDGET = 2_000_000  # vertex pairs per batch (bounds the temporary arrays to ~100 MB)


def _hull_extents(hulls):
    """Max caliper, min caliper and minimum-bounding-circle radius of convex hulls (exact).

    - max caliper = largest distance between two hull vertices;
    - min caliper = minimum over hull edges of the largest vertex distance from that edge's line
      (rotating-calipers width, as JTS ``MinimumDiameter``);
    - bounding-circle radius: half the max caliper where the circle on that diameter pair holds
      every vertex (the minimum enclosing circle then is that circle), else GEOS
      ``minimum_bounding_radius`` (about half of the nuclei).

    Hulls are processed in groups of equal vertex count (vectorised, no padding), so each value
    depends on its hull only.
    """
    n = len(hulls)
    max_cal, min_cal, radius = np.zeros(n), np.zeros(n), np.zeros(n)
    if not n:
        return max_cal, min_cal, radius
    coords, index = shapely.get_coordinates(hulls, return_index=True)
    counts = np.bincount(index, minlength=n)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    # drop the closing vertex of polygon hulls (points and segments have none)
    nonempty = counts > 1
    closed = np.zeros(n, dtype=bool)
    closed[nonempty] = np.all(coords[starts[nonempty]] == coords[starts[nonempty] + counts[nonempty] - 1], axis=1)
    counts = counts - closed
    order = np.argsort(counts, kind="stable")
    bounds = np.searchsorted(counts[order], np.arange(int(counts.max()) + 2))
    need_geos = np.zeros(n, dtype=bool)
    for v in range(1, int(counts.max()) + 1):
        group = order[bounds[v] : bounds[v + 1]]
        step = max(1, _PAIR_BUDGET // (v * v))
        for b in range(0, len(group), step):
            sel = group[b : b + step]
            take = starts[sel, None] + np.arange(v)[None, :]
            x, y = coords[take, 0], coords[take, 1]  # (B, V)
            x = x - x[:, :1]  # relative to the first vertex (precision)
            y = y - y[:, :1]
            dx = x[:, :, None] - x[:, None, :]
            dy = y[:, :, None] - y[:, None, :]
            d2 = (dx * dx + dy * dy).reshape(len(sel), v * v)
            far = d2.argmax(axis=1)
            rows = np.arange(len(sel))
            diam2 = d2[rows, far]
            max_cal[sel] = np.sqrt(diam2)
            # circle on the diameter pair: holds every vertex?
            i, j = np.divmod(far, v)
            cx, cy = (x[rows, i] + x[rows, j]) / 2, (y[rows, i] + y[rows, j]) / 2
            r2 = diam2 / 4
            inside = (((x - cx[:, None]) ** 2 + (y - cy[:, None]) ** 2) <= (r2 * (1 + 1e-12))[:, None]).all(axis=1)
            radius[sel] = np.sqrt(r2)
            need_geos[sel[~inside]] = True
            if v >= 3:
                ex = np.roll(x, -1, axis=1) - x  # edges of the closed hull
                ey = np.roll(y, -1, axis=1) - y
                length = np.hypot(ex, ey)
                # |cross(edge, p - p_edge)| for every edge and vertex: (B, V edges, V vertices)
                cross = np.abs(ex[:, :, None] * (y[:, None, :] - y[:, :, None])
                               - ey[:, :, None] * (x[:, None, :] - x[:, :, None]))
                with np.errstate(divide="ignore", invalid="ignore"):
                    width = cross.max(axis=2) / length
                width[length <= 0] = np.inf
                w = width.min(axis=1)
                min_cal[sel] = np.where(np.isfinite(w), w, 0.0)  # degenerate hull: 0
    if need_geos.any():
        radius[need_geos] = shapely.minimum_bounding_radius(hulls[need_geos])
    return max_cal, min_cal, radius


def shape_measurements(polygons, mpp):
    """Shape measurements of nucleus polygons, in µm.

    Parameters
    ----------
    polygons : numpy.ndarray of shapely.Polygon, shape (K,)
        Outlines in store px (continuous coordinates).
    mpp : float
        µm per store pixel.

    Returns
    -------
    dict of str -> numpy.ndarray, float64, shape (K,)
        Keys :data:`SHAPE_COLUMNS`:

        - ``area_um2``: polygon area;
        - ``perimeter_um`` (all rings): boundary length of the outline simplified by
          :data:`PERIMETER_SIMPLIFY_PX` (removes the marching-squares zig-zag);
        - ``circularity`` = min(4 pi A / P^2, 1) on the exterior ring of that outline;
        - ``solidity`` = A / convex hull area;
        - ``max_diameter_um``: diameter of the minimum bounding circle (QuPath's "Max diameter");
        - ``max_caliper_um``: maximum Feret diameter (largest vertex distance of the hull);
        - ``min_diameter_um``: minimum Feret diameter (rotating-calipers width, = JTS
          ``MinimumDiameter``, QuPath's "Min diameter");
        - ``eccentricity`` = sqrt(1 - l2/l1) of the polygon's second-moment matrix (0 = circle;
          the scikit-image ``regionprops`` definition, on the continuous shape);
        - ``centroid_x_um``, ``centroid_y_um``: polygon centroid, store frame (x = col).

        Everything is computed in store px and scaled by ``mpp`` (``mpp**2`` for the area); each
        value depends on its own polygon only (vectorised over all polygons, no batch effects).
    """
    if not mpp > 0:
        raise InputError(f"mpp must be > 0, got {mpp}")
    polygons = np.asarray(polygons, dtype=object)
    n = len(polygons)
    if not n:
        return {c: np.zeros(0) for c in SHAPE_COLUMNS}
    area = shapely.area(polygons)
    smooth = shapely.simplify(polygons, PERIMETER_SIMPLIFY_PX, preserve_topology=False)
    length = shapely.length(smooth)
    ext_area, ext_len = shapely.area(smooth), length.copy()
    holes = shapely.get_num_interior_rings(smooth) > 0
    if holes.any():
        ext = shapely.get_exterior_ring(smooth[holes])
        ext_area[holes] = shapely.area(shapely.polygons(ext))
        ext_len[holes] = shapely.length(ext)
    hulls = shapely.convex_hull(polygons)
    hull_area = shapely.area(hulls)
    with np.errstate(divide="ignore", invalid="ignore"):
        circ = np.where(ext_len > 0, np.minimum(4 * math.pi * ext_area / (ext_len * ext_len), 1.0), np.nan)
        solidity = np.where(hull_area > 0, area / hull_area, np.nan)
    _, cx, cy, mu20, mu02, mu11 = _polygon_moments(polygons)
    half_tr = (mu20 + mu02) / 2
    disc = np.sqrt(((mu20 - mu02) / 2) ** 2 + mu11**2)
    l1, l2 = half_tr + disc, half_tr - disc
    with np.errstate(divide="ignore", invalid="ignore"):
        ecc = np.where(l1 > 0, np.sqrt(np.clip(1 - l2 / l1, 0, 1)), np.nan)
    max_cal, min_cal, radius = _hull_extents(hulls)
    return {
        "area_um2": area * (mpp * mpp),
        "perimeter_um": length * mpp,
        "circularity": circ,
        "solidity": solidity,
        "max_diameter_um": 2 * radius * mpp,
        "max_caliper_um": max_cal * mpp,
        "min_diameter_um": min_cal * mpp,
        "eccentricity": ecc,
        "centroid_x_um": cx * mpp,
        "centroid_y_um": cy * mpp,
    }


# ----------------------------------------------------------------------------------------------
# intensity


def intensity_measurements(labels, rgb, ids, *, pixels=None):
    """Hematoxylin and Eosin OD statistics of the pixels under each label.

    Parameters
    ----------
    labels : numpy.ndarray, integer, shape (H, W)
        Label image of the window (0 = background).
    rgb : numpy.ndarray, uint8, shape (H, W, 3)
        The window's pixels (same frame as ``labels``).
    ids : numpy.ndarray, int64, shape (K,)
        Labels to measure (each must occur in ``labels``).
    pixels : tuple of numpy.ndarray, optional
        ``(index, label)``: flat indices (int64, ascending) of the nonzero pixels of ``labels`` and
        their labels (intp), if the caller has them already.

    Returns
    -------
    dict of str -> numpy.ndarray, float64, shape (K,)
        Keys :data:`INTENSITY_COLUMNS`: mean, sample standard deviation (n - 1, as QuPath's
        commons-math statistics; NaN for a single pixel), max and min of the stain OD.

    Raises
    ------
    InputError
        If the shapes or dtypes do not match.
    """
    labels = np.asarray(labels)
    ids = np.asarray(ids, dtype=np.int64)
    if rgb.shape != labels.shape + (3,) or rgb.dtype != np.uint8:
        raise InputError(f"rgb {rgb.dtype} {rgb.shape} does not match labels shape {labels.shape} + (3,) uint8")
    if not len(ids):
        return {c: np.zeros(0) for c in INTENSITY_COLUMNS}
    if pixels is None:
        flat = labels.ravel()
        index = np.flatnonzero(flat != 0)
        lab = flat[index].astype(np.intp)
    else:
        index, lab = pixels
    nbins = max(int(ids.max()), int(lab.max()) if len(lab) else 0) + 1
    wanted = np.zeros(nbins, dtype=bool)
    wanted[ids] = True
    keep = wanted[lab]  # only pixels of the requested labels
    lab, index = lab[keep], index[keep]
    px = np.take(rgb.reshape(-1, 3), index, axis=0).T  # (3, n): deconvolve only the measured pixels
    count = np.bincount(lab, minlength=nbins)[ids].astype(np.float64)
    out = {}
    for k, stain in enumerate(STAINS):
        lut = _STAIN_CHANNEL_LUT[k]
        v = lut[0][px[0]] + lut[1][px[1]] + lut[2][px[2]]
        s = np.bincount(lab, weights=v, minlength=nbins)[ids]
        ss = np.bincount(lab, weights=v * v, minlength=nbins)[ids]
        with np.errstate(divide="ignore", invalid="ignore"):
            mean = s / count
            var = np.where(count > 1, (ss - s * mean) / (count - 1), np.nan)
        vmax = np.full(nbins, -np.inf)
        vmin = np.full(nbins, np.inf)
        np.maximum.at(vmax, lab, v)
        np.minimum.at(vmin, lab, v)
        out[f"{stain}_od_mean"] = mean
        out[f"{stain}_od_std"] = np.sqrt(np.maximum(var, 0.0))
        out[f"{stain}_od_max"] = vmax[ids]
        out[f"{stain}_od_min"] = vmin[ids]
    return {c: out[c] for c in INTENSITY_COLUMNS}


# ----------------------------------------------------------------------------------------------
# summary


def _stats(values):
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    keys = ("n", "mean", "sd", "median", "q25", "q75", "iqr", "p5", "p95", "cv")
    if not len(v):
        return dict.fromkeys(keys) | {"n": 0}
    mean = float(v.mean())
    sd = float(v.std(ddof=1)) if len(v) > 1 else None
    q5, q25, q50, q75, q95 = (float(q) for q in np.percentile(v, [5, 25, 50, 75, 95]))
    cv = sd / mean if sd is not None and mean != 0 else None
    return {
        "n": int(len(v)),
        "mean": mean,
        "sd": sd,
        "median": q50,
        "q25": q25,
        "q75": q75,
        "iqr": q75 - q25,
        "p5": q5,
        "p95": q95,
        "cv": cv,
    }


def summarize(table, tissue_area_mm2):
    """Per-slide statistics of the nuclei.

    Parameters
    ----------
    table : pyarrow.Table or pandas.DataFrame
        Final nuclei (one row per nucleus) with the :data:`SUMMARY_COLUMNS`.
    tissue_area_mm2 : float or None
        Analysed tissue area, mm^2.

    Returns
    -------
    dict
        ``{"count", "tissue_area_mm2", "nuclei_per_mm2", "measurements": {column: {"n", "mean",
        "sd", "median", "q25", "q75", "iqr", "p5", "p95", "cv"}}}``. Non-finite values are
        ignored; a statistic that is undefined (no values, SD of one value, CV with mean 0) is
        ``None`` (JSON null), never NaN. ``sd`` is the sample SD (n - 1); percentiles use linear
        interpolation (numpy default); ``cv`` = sd / mean.
    """
    count = int(table.num_rows if hasattr(table, "num_rows") else len(table))
    area = None if tissue_area_mm2 is None or not math.isfinite(tissue_area_mm2) else float(tissue_area_mm2)
    density = count / area if area else None
    names = set(table.column_names) if hasattr(table, "column_names") else set(table.columns)
    meas = {}
    for col in SUMMARY_COLUMNS:
        if col in names:
            values = np.asarray(table[col].to_numpy(), dtype=np.float64) if count else np.zeros(0)
            meas[col] = _stats(values)
    return {"count": count, "tissue_area_mm2": area, "nuclei_per_mm2": density, "measurements": meas}
