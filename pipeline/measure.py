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


def stain_od(rgb):
    """Colour deconvolution: stain "OD" (concentration) per pixel, QuPath H&E defaults.

    ``OD_rgb = C @ M`` with ``M`` = :func:`stain_matrix`, so ``C = OD_rgb @ inv(M)``.

    Parameters
    ----------
    rgb : numpy.ndarray, uint8, shape (..., 3)

    Returns
    -------
    numpy.ndarray, float64, shape (..., 3)
        Hematoxylin OD, Eosin OD, residual.
    """
    return optical_density(rgb) @ np.linalg.inv(stain_matrix())


# ----------------------------------------------------------------------------------------------
# shape


def _polygon_moments(geoms):
    """Area, centroid and central second moments of polygons via Green's theorem (vectorised).

    Holes count negatively. Returns arrays (A, cx, cy, mu20, mu02, mu11), moments per unit area.
    """
    geoms = shapely.orient_polygons(geoms)  # exterior CCW (positive area), holes CW
    n = len(geoms)
    rings, ring_geom = shapely.get_rings(geoms, return_index=True)
    coords, coord_ring = shapely.get_coordinates(rings, return_index=True)
    ref = shapely.get_coordinates(shapely.get_point(shapely.get_exterior_ring(geoms), 0))
    if len(coords) < 2 or len(ref) != n:
        zero = np.zeros(n)
        return zero, zero, zero, zero, zero, zero
    geom_of_coord = ring_geom[coord_ring]
    xy = coords - ref[geom_of_coord]  # centre each polygon for precision
    same = coord_ring[:-1] == coord_ring[1:]
    x0, y0 = xy[:-1][same, 0], xy[:-1][same, 1]
    x1, y1 = xy[1:][same, 0], xy[1:][same, 1]
    g = geom_of_coord[:-1][same]
    cross = x0 * y1 - x1 * y0

    def agg(w):
        return np.bincount(g, weights=w, minlength=n)

    a = agg(cross) / 2.0
    sx = agg((x0 + x1) * cross) / 6.0
    sy = agg((y0 + y1) * cross) / 6.0
    sxx = agg((x0 * x0 + x0 * x1 + x1 * x1) * cross) / 12.0
    syy = agg((y0 * y0 + y0 * y1 + y1 * y1) * cross) / 12.0
    sxy = agg((x0 * y1 + 2 * x0 * y0 + 2 * x1 * y1 + x1 * y0) * cross) / 24.0
    with np.errstate(divide="ignore", invalid="ignore"):
        cx, cy = sx / a, sy / a
        mu20 = sxx / a - cx * cx
        mu02 = syy / a - cy * cy
        mu11 = sxy / a - cx * cy
    return a, cx + ref[:, 0], cy + ref[:, 1], mu20, mu02, mu11


_CALIPER_BUDGET = 1_000_000  # vertex pairs per batch (bounds the temporary arrays to ~50 MB)


def _calipers(geoms, batch=256):
    """Max and min Feret (caliper) diameters of each geometry's convex hull (exact).

    Max = largest distance between two hull vertices; min = minimum over hull edges of the largest
    vertex distance from that edge's line (rotating-calipers width, as JTS ``MinimumDiameter``).
    Hulls are processed in batches padded to the batch's vertex count (vectorised).
    """
    n = len(geoms)
    max_cal, min_cal = np.zeros(n), np.zeros(n)
    if not n:
        return max_cal, min_cal
    hulls = shapely.convex_hull(geoms)
    coords, index = shapely.get_coordinates(hulls, return_index=True)
    counts = np.bincount(index, minlength=n)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    order = np.argsort(counts, kind="stable")
    b = 0
    while b < n:
        size = batch
        while size > 1 and size * int(counts[order[min(b + size, n) - 1]]) ** 2 > _CALIPER_BUDGET:
            size //= 2
        sel = order[b : b + size]
        b += size
        sel = sel[counts[sel] > 0]
        if not len(sel):
            continue
        v = int(counts[sel].max())
        k = np.arange(v)
        take = starts[sel, None] + np.minimum(k[None, :], counts[sel, None] - 1)  # pad: repeat last
        pts = coords[take]  # (B, V, 2)
        d = pts[:, :, None, :] - pts[:, None, :, :]
        max_cal[sel] = np.sqrt((d * d).sum(-1).max(axis=(1, 2)))
        edge = pts[:, 1:, :] - pts[:, :-1, :]  # (B, V-1, 2); closed ring: last edge included
        length = np.hypot(edge[..., 0], edge[..., 1])
        rel = pts[:, None, :, :] - pts[:, :-1, None, :]  # (B, V-1, V, 2)
        cross = np.abs(edge[..., None, 0] * rel[..., 1] - edge[..., None, 1] * rel[..., 0])
        with np.errstate(divide="ignore", invalid="ignore"):
            width = cross.max(axis=2) / length
        width[length <= 0] = np.inf
        w = width.min(axis=1)
        min_cal[sel] = np.where(np.isfinite(w), w, 0.0)  # degenerate hull (point/segment): 0
    return max_cal, min_cal


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
    """
    if not mpp > 0:
        raise InputError(f"mpp must be > 0, got {mpp}")
    polygons = np.asarray(polygons, dtype=object)
    n = len(polygons)
    if not n:
        return {c: np.zeros(0) for c in SHAPE_COLUMNS}
    g = shapely.transform(polygons, lambda c: c * mpp)
    area = shapely.area(g)
    smooth = shapely.simplify(g, PERIMETER_SIMPLIFY_PX * mpp, preserve_topology=False)
    length = shapely.length(smooth)
    ext = shapely.get_exterior_ring(smooth)
    ext_area = shapely.area(shapely.polygons(ext))
    ext_len = shapely.length(ext)
    hull_area = shapely.area(shapely.convex_hull(g))
    with np.errstate(divide="ignore", invalid="ignore"):
        circ = np.where(ext_len > 0, np.minimum(4 * math.pi * ext_area / (ext_len * ext_len), 1.0), np.nan)
        solidity = np.where(hull_area > 0, area / hull_area, np.nan)
    a, cx, cy, mu20, mu02, mu11 = _polygon_moments(g)
    half_tr = (mu20 + mu02) / 2
    disc = np.sqrt(((mu20 - mu02) / 2) ** 2 + mu11**2)
    l1, l2 = half_tr + disc, half_tr - disc
    with np.errstate(divide="ignore", invalid="ignore"):
        ecc = np.where(l1 > 0, np.sqrt(np.clip(1 - l2 / l1, 0, 1)), np.nan)
    max_cal, min_cal = _calipers(g)
    centroid = shapely.centroid(g)
    return {
        "area_um2": area,
        "perimeter_um": length,
        "circularity": circ,
        "solidity": solidity,
        "max_diameter_um": 2 * shapely.minimum_bounding_radius(g),
        "max_caliper_um": max_cal,
        "min_diameter_um": min_cal,
        "eccentricity": ecc,
        "centroid_x_um": shapely.get_x(centroid),
        "centroid_y_um": shapely.get_y(centroid),
    }


# ----------------------------------------------------------------------------------------------
# intensity


def intensity_measurements(labels, rgb, ids):
    """Hematoxylin and Eosin OD statistics of the pixels under each label.

    Parameters
    ----------
    labels : numpy.ndarray, integer, shape (H, W)
        Label image of the window (0 = background).
    rgb : numpy.ndarray, uint8, shape (H, W, 3)
        The window's pixels (same frame as ``labels``).
    ids : numpy.ndarray, int64, shape (K,)
        Labels to measure (each must occur in ``labels``).

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
    if rgb.shape != labels.shape + (3,):
        raise InputError(f"rgb shape {rgb.shape} does not match labels shape {labels.shape} + (3,)")
    out = {}
    if not len(ids):
        return {c: np.zeros(0) for c in INTENSITY_COLUMNS}
    flat = labels.ravel().astype(np.int64)
    nbins = int(flat.max()) + 1
    wanted = np.zeros(nbins, dtype=bool)
    wanted[ids] = True
    fg = np.flatnonzero(wanted[flat])  # only pixels of the requested labels
    lab = flat[fg]
    conc = stain_od(rgb.reshape(-1, 3)[fg])  # (n_fg, 3): deconvolve only the measured pixels
    count = np.bincount(lab, minlength=nbins)[ids].astype(np.float64)
    for k, stain in enumerate(STAINS):
        v = np.ascontiguousarray(conc[:, k])
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
