"""Deterministic synthetic H&E-like pyramidal TIFF slides (tests and benchmarks).

The image is defined analytically in level-0 micrometres, so each tile of each level is rendered
independently from ``(seed, level, tile index)`` and memory stays flat for any slide size:

* white background (RGB 244, 244, 244);
* ``n_regions`` pink tissue ellipses (RGB 232, 160, 200) whose centres and axes derive from ``seed``;
* purple nuclei (RGB 110, 60, 150; darker rim) of 8–12 µm diameter inside tissue: one candidate
  per 16 µm grid cell, kept with probability ``nuclei_fraction``, jittered so it stays inside its
  cell (nuclei never touch). Positions use an integer hash of ``(seed, cell_row, cell_col)``.

The file is a tiled (``tile`` px), zlib-compressed TIFF with one IFD per level (2x steps) and
resolution tags in pixels/cm, which OpenSlide's ``generic-tiff`` driver reads with
``openslide.mpp-x/y`` (and tifffile as a multi-level series).
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np

from .errors import InputError
from .paths import atomic_write

BACKGROUND_RGB = (244, 244, 244)
TISSUE_RGB = (232, 160, 200)
NUCLEUS_RGB = (110, 60, 150)
NUCLEUS_RIM_RGB = (80, 40, 120)
CELL_UM = 16.0  # grid cell holding at most one nucleus
RADIUS_UM = (4.0, 6.0)  # nucleus radius range


def _hash_u01(seed: int, a: np.ndarray, b: np.ndarray, salt: int) -> np.ndarray:
    """Deterministic uniform [0, 1) values from integer arrays (splitmix64-style mixing)."""
    with np.errstate(over="ignore"):
        x = (
            a.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
            ^ b.astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
            ^ np.uint64((seed * 0x165667B19E3779F9 + salt * 0x27D4EB2F165667C5) & 0xFFFFFFFFFFFFFFFF)
        )
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def tissue_regions(size_um: tuple[float, float], seed: int, n_regions: int, tissue_scale: float) -> np.ndarray:
    """Ellipses ``(cy_um, cx_um, ry_um, rx_um)`` of shape (n_regions, 4), float64."""
    rng = np.random.default_rng(seed)
    h_um, w_um = size_um
    out = []
    for _ in range(n_regions):
        cy = h_um * rng.uniform(0.3, 0.7)
        cx = w_um * rng.uniform(0.3, 0.7)
        ry = h_um * tissue_scale * rng.uniform(0.7, 1.0)
        rx = w_um * tissue_scale * rng.uniform(0.7, 1.0)
        out.append((cy, cx, ry, rx))
    return np.asarray(out, np.float64).reshape(-1, 4)


def _regions_hit(regions: np.ndarray, y_um0: float, y_um1: float, x_um0: float, x_um1: float) -> list:
    """Ellipses whose bounding box meets the rectangle ``[y_um0, y_um1] x [x_um0, x_um1]``."""
    return [
        r
        for r in regions
        if not (y_um1 < r[0] - r[2] or y_um0 > r[0] + r[2] or x_um1 < r[1] - r[3] or x_um0 > r[1] + r[3])
    ]


def render_tile(
    y0_px: int,
    x0_px: int,
    height_px: int,
    width_px: int,
    px_um: float,
    regions: np.ndarray,
    seed: int,
    nuclei_fraction: float = 0.6,
) -> np.ndarray:
    """Render pixels ``[y0, y0+h) x [x0, x0+w)`` of a level whose pixels are ``px_um`` µm.

    Returns
    -------
    ndarray of shape (height_px, width_px, 3), dtype uint8
    """
    tile = np.empty((height_px, width_px, 3), np.uint8)
    tile[:] = BACKGROUND_RGB
    y_um0, y_um1 = y0_px * px_um, (y0_px + height_px) * px_um
    x_um0, x_um1 = x0_px * px_um, (x0_px + width_px) * px_um
    hit = _regions_hit(regions, y_um0, y_um1, x_um0, x_um1)
    if not hit:
        return tile
    ys = (y0_px + np.arange(height_px) + 0.5) * px_um
    xs = (x0_px + np.arange(width_px) + 0.5) * px_um
    yy, xx = ys[:, None], xs[None, :]
    inside = np.zeros((height_px, width_px), bool)
    for cy, cx, ry, rx in hit:
        inside |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    if not inside.any():
        return tile
    tile[inside] = TISSUE_RGB
    # nuclei: one candidate per grid cell, fully inside the cell
    crow = np.floor(ys / CELL_UM).astype(np.int64)
    ccol = np.floor(xs / CELL_UM).astype(np.int64)
    cr = np.arange(crow[0], crow[-1] + 1)[:, None]  # per-cell parameters, then gathered per pixel
    cc = np.arange(ccol[0], ccol[-1] + 1)[None, :]
    cr, cc = np.broadcast_arrays(cr, cc)
    rad_c = RADIUS_UM[0] + (RADIUS_UM[1] - RADIUS_UM[0]) * _hash_u01(seed, cr, cc, 1)
    free = CELL_UM - 2 * rad_c - 1.0
    ny_c = cr * CELL_UM + rad_c + 0.5 + free * _hash_u01(seed, cr, cc, 2)
    nx_c = cc * CELL_UM + rad_c + 0.5 + free * _hash_u01(seed, cr, cc, 3)
    present_c = _hash_u01(seed, cr, cc, 4) < nuclei_fraction
    ri, ci = (crow - crow[0])[:, None], (ccol - ccol[0])[None, :]
    radius, ny, nx, present = rad_c[ri, ci], ny_c[ri, ci], nx_c[ri, ci], present_c[ri, ci]
    d2 = (yy - ny) ** 2 + (xx - nx) ** 2
    nucleus = present & inside & (d2 <= radius**2)
    rim = nucleus & (d2 >= (radius - 1.0) ** 2)
    tile[nucleus] = NUCLEUS_RGB
    tile[rim] = NUCLEUS_RIM_RGB
    return tile


def write_pyramid_tiff(path, size_px, mpp, levels, tile, tiles, *, compression="zlib", compressionargs=None):
    """Write a tiled pyramidal RGB TIFF (one page per level, level ``k`` = size / 2**k).

    OpenSlide reads it as a generic tiled TIFF with ``openslide.mpp-x/y`` from the resolution tags
    (pixels per centimetre); BigTIFF when the level-0 data would approach 4 GB.

    Parameters
    ----------
    path : path
        Destination (written directly: callers wrap this in :func:`pipeline.paths.atomic_write`).
    size_px : tuple of int
        Level-0 (height, width), px.
    mpp : float
        Level-0 µm/px.
    levels : int
        Pyramid levels.
    tile : int
        Tile edge, px (a multiple of 16).
    tiles : callable
        ``tiles(k, level_h, level_w)`` yields the level's (tile, tile, 3) uint8 tiles in row-major
        order, or their bytes already compressed with ``compression``.
    compression, compressionargs
        As ``tifffile.TiffWriter.write``.
    """
    import tifffile

    h, w = (int(v) for v in size_px)
    bigtiff = h * w * 3 * 4 // 3 > 2**32 - 2**25
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tw_:
        for k in range(levels):
            lh, lw = -(-h // 2**k), -(-w // 2**k)
            res = 1e4 / (mpp * 2**k)  # pixels per centimetre
            tw_.write(
                tiles(k, lh, lw),
                shape=(lh, lw, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                compression=compression,
                compressionargs=compressionargs,
                resolution=(res, res),
                resolutionunit="CENTIMETER",
                subfiletype=0 if k == 0 else 1,
                metadata=None,
                software=False,
            )


def write_synthetic_slide(
    path: str | os.PathLike,
    size_px: tuple[int, int] = (4096, 4096),
    mpp: float = 0.5,
    seed: int = 0,
    tile: int = 256,
    levels: int = 3,
    *,
    n_regions: int = 2,
    tissue_scale: float = 0.2,
    nuclei_fraction: float = 0.6,
) -> Path:
    """Write a synthetic pyramidal H&E-like TIFF, tile by tile (memory independent of size).

    Parameters
    ----------
    path : str or PathLike
        Output ``.tif``; written to ``<path>.tmp-<pid>`` and renamed.
    size_px : tuple of int
        ``(height, width)`` of level 0, pixels.
    mpp : float
        µm/px of level 0 (stored as TIFF resolution, read by OpenSlide as ``openslide.mpp-x/y``).
    seed : int
        Determines tissue regions and nuclei; same arguments -> same bytes.
    tile : int
        TIFF tile edge, pixels (multiple of 16).
    levels : int
        Pyramid levels (level ``k`` is ``2**k`` smaller).
    n_regions, tissue_scale : int, float
        Number of tissue ellipses and their semi-axes as a fraction of the slide size.
    nuclei_fraction : float
        Fraction of grid cells in tissue holding a nucleus.

    Returns
    -------
    Path

    Raises
    ------
    InputError
        For a non-positive size/mpp or a tile edge that is not a multiple of 16.
    OutputError
        If the file cannot be written.
    """
    h, w = (int(v) for v in size_px)
    if h <= 0 or w <= 0 or mpp <= 0 or levels < 1:
        raise InputError(f"synthetic slide needs positive size/mpp/levels, got {size_px}, {mpp}, {levels}")
    if tile <= 0 or tile % 16:
        raise InputError(f"tile must be a positive multiple of 16, got {tile}")
    path = Path(path)
    regions = tissue_regions((h * mpp, w * mpp), seed, n_regions, tissue_scale)
    blank = np.empty((tile, tile, 3), np.uint8)
    blank[:] = BACKGROUND_RGB
    blank_bytes = zlib.compress(blank.tobytes(), 1)

    def tiles(level_h, level_w, px_um):
        """Pre-compressed (zlib level 1) tiles in row-major order; background tiles shared."""
        for y0 in range(0, level_h, tile):
            for x0 in range(0, level_w, tile):
                th, tw = min(tile, level_h - y0), min(tile, level_w - x0)
                if not _regions_hit(regions, y0 * px_um, (y0 + th) * px_um, x0 * px_um, (x0 + tw) * px_um):
                    yield blank_bytes
                    continue
                content = render_tile(y0, x0, th, tw, px_um, regions, seed, nuclei_fraction)
                if np.all(content == content[0, 0]) and tuple(content[0, 0]) == BACKGROUND_RGB:
                    yield blank_bytes
                    continue
                block = blank.copy()
                block[:th, :tw] = content
                yield zlib.compress(block.tobytes(), 1)

    def write(tmp):
        write_pyramid_tiff(tmp, (h, w), mpp, levels, tile, lambda k, lh, lw: tiles(lh, lw, mpp * 2**k))

    return atomic_write(path, write, "synthetic slide", mkdir=True)
