"""Is the slide's declared µm/px plausible? (nucleus size after inference + a model scale probe).

A wrong µm/px is silent: every stage works, the numbers are nonsense (``--slide-mpp 0.25`` on a
0.5 µm/px slide shows the model nuclei half their size and it finds a third of them). Two checks:

1. **Nucleus size.** The median area of the segmented nuclei must lie in
   :attr:`pipeline.config.MppCheckConfig.median_area_um2` (12-110 µm², i.e. an equivalent diameter
   of 3.9-11.8 µm). H&E nuclei are ~4-12 µm across, ~15-110 µm² (lymphocytes ~6-7 µm / ~35 µm²,
   epithelial and tumour nuclei 8-12 µm; e.g. Bancroft's *Theory and Practice of Histological
   Techniques*, and the size priors of HoVer-Net / StarDist H&E models). The lower bound is 12, not
   15: the median of *detected* objects sits below the median true nucleus (fragments, tangential
   cuts): 15.9 µm² on HE_example.ome.tif and 25.1 on CMU-1-Small-Region.svs at their own µm/px.
2. **Scale probe.** The network has a learned size prior, so on a mis-scaled slide it partly adapts
   (on CMU-1 declared at 1.0 instead of 0.5 µm/px it splits nuclei and the median area stays
   26 µm²): the size alone misses over-declared µm/px. The probe runs the model on a few tissue
   tiles of the store under the hypotheses "a store pixel is really ``h`` x its declared size"
   (``h`` = 0.5, 1, 2: the tile resampled by ``h``, the model at its own µm/px) and interpolates, in
   log-log, the ``h*`` at which the median nucleus area equals the shipped model's median at the
   right scale (:attr:`~pipeline.config.MppCheckConfig.reference_area_um2`, 27 µm²: the geometric
   mean over CMU-1, HE_example, 2 MoNuSeg and 2 CPM-15 tiles at their own µm/px, which gave
   ``h*`` 0.72-1.29). The likely µm/px is ``declared * h*``; plausible when ``h*`` lies in
   :attr:`~pipeline.config.MppCheckConfig.probe_factor_range` (0.55-1.5: asymmetric, because
   images of large nuclei, 40x tumour tiles and the synthetic slides, read ``h*`` 0.58-0.72 at
   their right µm/px, while CMU-1 declared at 1.0 instead of 0.5 reads 0.49-0.51; the margins on
   that side are thin: see the measurements in docs/outputs.md).

Verdict: ``plausible`` = both checks pass (the probe only when it saw enough nuclei). Pure
functions here; :func:`probe_store` reads the store and runs a model's ``segment_batch``.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Sequence

import numpy as np

from .config import MppCheckConfig

log = logging.getLogger(__name__)

WARNING_TEXT = "implausible µm/px"


def equivalent_diameter_um(area_um2: float | None) -> float | None:
    """Diameter (µm) of the disc of area ``area_um2`` (µm²)."""
    return None if area_um2 is None else 2.0 * math.sqrt(max(area_um2, 0.0) / math.pi)


def interior_areas_px(labels: np.ndarray) -> np.ndarray:
    """Pixel areas (int64, 1-D) of the instances of ``labels`` (H, W) that do not touch its border."""
    counts = np.bincount(labels.ravel())
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    keep = np.ones(len(counts), bool)
    keep[0] = False
    keep[edge] = False
    return counts[keep & (counts > 0)]


def estimate_factor(factors: Sequence[float], medians: Sequence[float | None], reference_area_um2: float) -> float | None:
    """The scale factor ``h*`` at which the median area reaches ``reference_area_um2``.

    Starting from the hypothesis nearest ``h = 1``, the search goes towards larger ``h`` when the
    median there is below the reference, else towards smaller ``h``, and interpolates
    ``log(median)`` linearly in ``log(h)`` on the first segment that crosses the reference. Points
    on the other side are ignored: far from the right scale the model's answer is noise and the
    curve need not be monotonic. Without a crossing, the last point in the search direction is
    extended with area ~ h² (slope 2). Returns None without any usable point; clamped to [1/8, 8].
    """
    pts = sorted((math.log(h), math.log(m)) for h, m in zip(factors, medians) if m is not None and m > 0)
    if not pts:
        return None
    y_ref = math.log(reference_area_um2)
    start = min(range(len(pts)), key=lambda i: abs(pts[i][0]))
    up = pts[start][1] < y_ref
    path = pts[start:] if up else pts[start::-1]
    for (x0, y0), (x1, y1) in zip(path, path[1:]):
        if min(y0, y1) <= y_ref <= max(y0, y1) and y1 != y0:
            return _clamp(math.exp(x0 + (y_ref - y0) * (x1 - x0) / (y1 - y0)))
    x, y = path[-1]
    return _clamp(math.exp(x + (y_ref - y) / 2.0))


def _clamp(h: float) -> float:
    return min(8.0, max(1.0 / 8.0, h))


def probe_grid_mpp(store_mpp: float, declared_mpp: float) -> float:
    """Declared µm/px of the probe tiles: the store's, or the slide's own when that is coarser.

    A store finer than its slide holds upsampled pixels; decoding the model's maps on such a grid
    splits nuclei and hides an over-declared µm/px, so the probe then works on the slide's own grid.
    """
    return max(float(store_mpp), float(declared_mpp))


def probe_images(images: Sequence[np.ndarray], segment: Callable, tile_mpp: float,
                 cfg: MppCheckConfig = MppCheckConfig()) -> dict:
    """Median nucleus area of the model's instances on ``images`` under each scale hypothesis.

    Under hypothesis ``h`` a tile is segmented as an image of ``tile_mpp * h`` µm/px (the model
    resamples it to its own µm/px and its maps back to the tile) and areas are taken in those µm².

    Parameters
    ----------
    images : sequence of ndarray (H, W, 3) uint8
        Tissue tiles at ``tile_mpp`` µm/px *as declared* (:func:`probe_grid_mpp`).
    segment : callable
        ``segment(image uint8 (H, W, 3), mpp) -> (labels uint32 (H, W), scores)``, labels at the
        input's size (:meth:`pipeline.model.segmenter.Segmenter.segment`).
    tile_mpp : float
        Declared µm/px of the tiles.

    Returns
    -------
    dict
        ``{"tiles": int, "tile_mpp": float, "factors": [h...], "nuclei": [int...],
        "median_area_um2": [float|None...]}`` (areas in µm² under each hypothesis; border-touching
        nuclei left out; None: fewer than ``cfg.min_nuclei`` nuclei).
    """
    areas = {h: [] for h in cfg.probe_factors}
    for img in images:
        img = np.ascontiguousarray(img, dtype=np.uint8)
        for h in cfg.probe_factors:
            mpp = float(tile_mpp) * h
            labels = np.asarray(segment(img, mpp)[0])
            if labels.shape != img.shape[:2]:
                raise ValueError(f"model returned labels of shape {labels.shape} for a {img.shape[:2]} tile")
            areas[h].append(interior_areas_px(labels.astype(np.int64, copy=False)) * (mpp * mpp))
    out = {"tiles": len(images), "tile_mpp": round(float(tile_mpp), 5), "factors": [float(h) for h in cfg.probe_factors],
           "nuclei": [], "median_area_um2": []}
    for h in cfg.probe_factors:
        a = np.concatenate(areas[h]) if areas[h] else np.zeros(0)
        out["nuclei"].append(int(a.size))
        out["median_area_um2"].append(round(float(np.median(a)), 2) if a.size >= cfg.min_nuclei else None)
    return out


def mpp_check(declared_mpp: float, median_area_um2: float | None, n_nuclei: int, probe: dict | None,
              cfg: MppCheckConfig = MppCheckConfig()) -> dict:
    """The verdict recorded as ``summary.json["mpp_check"]`` (see the module docstring).

    Parameters
    ----------
    declared_mpp : float
        µm/px of the slide's level 0, as read or given (``--slide-mpp``).
    median_area_um2 : float or None
        Median area of the slide's final nuclei (µm², computed with ``declared_mpp``).
    n_nuclei : int
        Number of final nuclei.
    probe : dict or None
        :func:`probe_images` result.

    Returns
    -------
    dict
        ``declared_mpp``, ``median_area_um2``, ``median_diameter_um`` (equivalent diameter of the
        median area), ``expected_area_um2`` [lo, hi], ``expected_diameter_um`` [lo, hi],
        ``in_expected_range`` (None: too few nuclei), ``probe`` (with ``factor``: ``h*``),
        ``plausible`` (bool; True when nothing could be judged), ``suggested_mpp`` (None when
        plausible), ``note``.
    """
    lo, hi = cfg.median_area_um2
    enough = n_nuclei >= cfg.min_nuclei and median_area_um2 is not None
    in_range = (lo <= median_area_um2 <= hi) if enough else None
    probe = dict(probe) if probe else None
    factor = None
    if probe is not None:
        factor = estimate_factor(probe["factors"], probe["median_area_um2"], cfg.reference_area_um2)
        probe["factor"] = None if factor is None else round(factor, 3)
    lo_h, hi_h = cfg.probe_factor_range
    probe_ok = None if factor is None else (lo_h <= factor <= hi_h)
    plausible = in_range is not False and probe_ok is not False
    if factor is not None:
        suggested = declared_mpp * factor
    elif enough and median_area_um2 > 0:
        suggested = declared_mpp * math.sqrt(cfg.reference_area_um2 / median_area_um2)
    else:
        suggested = None
    notes = []
    if in_range is None:
        notes.append(f"fewer than {cfg.min_nuclei} nuclei: size not judged")
    if probe is None or factor is None:
        notes.append("no scale probe (no tissue tiles, or too few nuclei in them)")
    return {
        "declared_mpp": round(float(declared_mpp), 5),
        "median_area_um2": None if median_area_um2 is None else round(float(median_area_um2), 2),
        "median_diameter_um": None if median_area_um2 is None else round(equivalent_diameter_um(median_area_um2), 2),
        "expected_area_um2": [lo, hi],
        "expected_diameter_um": [round(equivalent_diameter_um(lo), 2), round(equivalent_diameter_um(hi), 2)],
        "in_expected_range": in_range,
        "probe": probe,
        "plausible": bool(plausible),
        "suggested_mpp": None if plausible or suggested is None else float(f"{suggested:.3g}"),
        "note": "; ".join(notes) or None,
    }


def warning_line(slide: str, check: dict) -> str:
    """The one log line for an implausible check (contains :data:`WARNING_TEXT`)."""
    area, diam = check["median_area_um2"], check["median_diameter_um"]
    lo, hi = check["expected_area_um2"]
    parts = []
    if area is not None:
        parts.append(f"median nucleus {area:g} µm² ({diam:g} µm across; H&E nuclei {lo:g}-{hi:g} µm²)")
    factor = (check.get("probe") or {}).get("factor")
    if factor is not None:
        parts.append(f"the model's scale probe says pixels are x{factor:g} their declared size")
    likely = check["suggested_mpp"]
    fix = f"; likely ~{likely:g} µm/px: check the scanner metadata or rerun with --slide-mpp {likely:g}" if likely else ""
    return f"{slide}: {WARNING_TEXT}: declared {check['declared_mpp']:g} µm/px: {', '.join(parts)}{fix}"


def probe_tiles_from_store(group, attrs: dict, cfg: MppCheckConfig = MppCheckConfig(),
                           tile_mpp: float | None = None) -> list[np.ndarray]:
    """Up to ``cfg.probe_tiles`` tissue tiles (``probe_tile_px`` square, uint8 RGB) at ``tile_mpp``
    (default: the store's µm/px) from level 0 of a tile store, centred in tissue chunks evenly
    spaced through the sorted chunk list."""
    from PIL import Image

    chunks = sorted(tuple(int(v) for v in rc) for rc in attrs.get("tissue_chunks", []))
    n = min(int(cfg.probe_tiles), len(chunks))
    if n <= 0:
        return []
    store_mpp = float(attrs["mpp"])
    scale = (tile_mpp or store_mpp) / store_mpp  # store px per tile px
    step = int(attrs["chunk_px"])
    rows, cols = (int(v) for v in attrs["shape_rc"])
    level0 = group["0"]
    tiles = []
    for i in range(n):
        r, c = chunks[int((i + 0.5) * len(chunks) / n)]
        r0, c0 = r * step, c * step
        r1, c1 = min(r0 + step, rows), min(c0 + step, cols)
        size = min(int(round(cfg.probe_tile_px * scale)), r1 - r0, c1 - c0)
        if size < 64 * scale:
            continue
        rr, cc = r0 + (r1 - r0 - size) // 2, c0 + (c1 - c0 - size) // 2
        tile = np.moveaxis(np.asarray(level0[:, rr:rr + size, cc:cc + size]), 0, -1)
        if scale != 1.0:
            out = max(16, int(round(size / scale)))
            tile = np.asarray(Image.fromarray(np.ascontiguousarray(tile)).resize((out, out), Image.BILINEAR))
        tiles.append(tile)
    return tiles


def probe_tiles_from_slide(slide, tile_mpp: float, tissue_cfg=None, cfg: MppCheckConfig = MppCheckConfig()) -> list[np.ndarray]:
    """Up to ``cfg.probe_tiles`` tissue tiles (``probe_tile_px`` square at ``tile_mpp`` µm/px as
    declared) read straight from an open slide (:class:`pipeline.slide.Slide`): the tile centres are
    evenly spaced over the thumbnail pixels whose whole tile lies in tissue (``cellsam check``)."""
    from scipy import ndimage

    from .config import TissueConfig
    from .tissue import tissue_mask

    tissue_cfg = tissue_cfg or TissueConfig()
    thumb_mpp = max(tissue_cfg.thumb_mpp, slide.mpp_x, slide.mpp_y)
    mask = tissue_mask(slide.thumbnail(thumb_mpp), thumb_mpp, tissue_cfg)
    radius = max(1, int(math.ceil(cfg.probe_tile_px * tile_mpp / thumb_mpp / 2)))
    inner = ndimage.binary_erosion(mask, structure=np.ones((2 * radius + 1, 2 * radius + 1), bool), border_value=0)
    if not inner.any():
        inner = mask
    rows, cols = np.nonzero(inner)
    n = min(int(cfg.probe_tiles), len(rows))
    bx, by = slide.bounds_l0[:2]
    size = int(cfg.probe_tile_px)
    tiles = []
    for i in range(n):
        k = int((i + 0.5) * len(rows) / n)
        x = bx + (cols[k] + 0.5) * thumb_mpp / slide.mpp_x - size / 2 * tile_mpp / slide.mpp_x
        y = by + (rows[k] + 0.5) * thumb_mpp / slide.mpp_y - size / 2 * tile_mpp / slide.mpp_y
        tiles.append(np.asarray(slide.read_at_mpp(max(0.0, x), max(0.0, y), size, size, tile_mpp)))
    return tiles


__all__ = ["WARNING_TEXT", "equivalent_diameter_um", "estimate_factor", "mpp_check", "probe_grid_mpp", "probe_images",
           "probe_tiles_from_slide", "probe_tiles_from_store", "warning_line"]
