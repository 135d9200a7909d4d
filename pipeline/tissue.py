"""Tissue detection on a low-resolution thumbnail (pure core + PNG preview).

The mask is computed on a thumbnail of the slide's bounds region at ``TissueConfig.thumb_mpp``
µm/px; thumbnail pixel ``(row, col)`` covers the square
``[col * thumb_mpp, (col + 1) * thumb_mpp) x [row * thumb_mpp, (row + 1) * thumb_mpp)`` µm from
the bounds origin, which is also the origin of the tile store.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from .config import TissueConfig
from .errors import InputError


def _otsu(values: np.ndarray) -> float:
    """Otsu threshold of ``values`` in [0, 1] (256-bin histogram); the value itself if constant."""
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-6:
        return lo
    hist, edges = np.histogram(values, bins=256, range=(lo, hi))
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = np.divide(m0, w0, out=np.zeros_like(m0), where=w0 > 0)
    mu1 = np.divide(m0[-1] - m0, w1, out=np.zeros_like(m0), where=w1 > 0)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centers[int(np.argmax(between[:-1]))])


def _disk(radius_px: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius_px : radius_px + 1, -radius_px : radius_px + 1]
    return xx * xx + yy * yy <= radius_px * radius_px


def tissue_mask(thumb: np.ndarray, thumb_mpp: float, cfg: TissueConfig = TissueConfig()) -> np.ndarray:
    """Foreground (tissue) mask of an RGB thumbnail.

    HSV saturation thresholded at ``max(Otsu, cfg.min_saturation)`` (the floor alone when the
    saturation is constant), near-black pixels (value < ``cfg.max_value_black``) excluded,
    morphological closing (disk of ``cfg.close_radius_px``), holes filled, and connected
    pieces smaller than ``cfg.min_area_um2`` removed.

    Parameters
    ----------
    thumb : ndarray of shape (H, W, 3), dtype uint8
        RGB thumbnail.
    thumb_mpp : float
        µm/px of ``thumb``.
    cfg : TissueConfig

    Returns
    -------
    ndarray of shape (H, W), dtype bool
        True on tissue. All-white or all-black input gives an all-False mask.

    Raises
    ------
    InputError
        If ``thumb`` is not ``uint8 (H, W, 3)`` or ``thumb_mpp`` is not positive.
    """
    if not isinstance(thumb, np.ndarray) or thumb.dtype != np.uint8 or thumb.ndim != 3 or thumb.shape[2] != 3:
        raise InputError(f"tissue_mask needs a uint8 (H, W, 3) thumbnail, got {getattr(thumb, 'dtype', type(thumb))} {getattr(thumb, 'shape', '')}")
    if not thumb_mpp > 0:
        raise InputError(f"thumb_mpp must be > 0, got {thumb_mpp}")
    rgb = thumb.astype(np.float32) / 255.0
    value = rgb.max(axis=2)
    minimum = rgb.min(axis=2)
    saturation = np.divide(value - minimum, value, out=np.zeros_like(value), where=value > 0)
    valid = value >= cfg.max_value_black
    if not valid.any():
        return np.zeros(thumb.shape[:2], bool)
    sat_valid = saturation[valid]
    otsu = _otsu(sat_valid)
    threshold = cfg.min_saturation if float(sat_valid.max()) - float(sat_valid.min()) < 1e-6 else max(otsu, cfg.min_saturation)
    mask = (saturation > threshold) & valid
    if not mask.any():
        return mask
    r = int(cfg.close_radius_px)
    if r > 0:
        padded = np.pad(mask, r, mode="edge")
        padded = ndi.binary_closing(padded, structure=_disk(r))
        mask = padded[r:-r, r:-r]
    mask = ndi.binary_fill_holes(mask)
    labels, n = ndi.label(mask)
    if n:
        sizes_um2 = np.bincount(labels.ravel())[1:] * (thumb_mpp * thumb_mpp)
        keep = np.concatenate([[False], sizes_um2 >= cfg.min_area_um2])
        mask = keep[labels]
    return mask.astype(bool)


def tissue_area_mm2(mask: np.ndarray, thumb_mpp: float) -> float:
    """Area of ``mask`` (bool (H, W) at ``thumb_mpp`` µm/px) in mm²."""
    return float(np.count_nonzero(mask)) * thumb_mpp * thumb_mpp / 1e6


def chunks_touching_tissue(
    mask: np.ndarray,
    thumb_mpp: float,
    store_shape_rc: tuple[int, int],
    chunk_px: int,
    store_mpp: float,
    *,
    margin_px: int = 1,
) -> list[tuple[int, int]]:
    """Store chunks that overlap the (slightly dilated) tissue mask.

    Parameters
    ----------
    mask : ndarray of shape (H, W), dtype bool
        Tissue mask at ``thumb_mpp`` (same origin as the store).
    thumb_mpp : float
        µm/px of ``mask``.
    store_shape_rc : tuple of int
        ``(rows, cols)`` of store level 0.
    chunk_px : int
        Chunk edge, store pixels.
    store_mpp : float
        µm/px of store level 0.
    margin_px : int
        Dilation of the mask in thumbnail pixels before the lookup (so nuclei cut by the
        thumbnail's coarse tissue edge are still covered); structural, not a tuning knob.

    Returns
    -------
    list of tuple of int
        Sorted ``(chunk_row, chunk_col)`` pairs inside the chunk grid.
    """
    if mask.ndim != 2:
        raise InputError(f"tissue mask must be 2-D, got shape {mask.shape}")
    rows, cols = store_shape_rc
    n_rows, n_cols = -(-rows // chunk_px), -(-cols // chunk_px)
    if not mask.any() or n_rows == 0 or n_cols == 0:
        return []
    if margin_px > 0:
        mask = ndi.binary_dilation(mask, structure=np.ones((3, 3), bool), iterations=margin_px)
    chunk_um = chunk_px * store_mpp
    rr, cc = np.nonzero(mask)
    eps = 1e-9
    r_lo = np.floor(rr * thumb_mpp / chunk_um).astype(np.int64)
    r_hi = np.floor((rr + 1) * thumb_mpp / chunk_um - eps).astype(np.int64)
    c_lo = np.floor(cc * thumb_mpp / chunk_um).astype(np.int64)
    c_hi = np.floor((cc + 1) * thumb_mpp / chunk_um - eps).astype(np.int64)
    found = set()
    # a thumbnail pixel is normally smaller than a chunk, but handle any span
    span_r = int((r_hi - r_lo).max()) + 1
    span_c = int((c_hi - c_lo).max()) + 1
    for dr in range(span_r):
        for dc in range(span_c):
            r = r_lo + dr
            c = c_lo + dc
            ok = (r <= r_hi) & (c <= c_hi) & (r < n_rows) & (c < n_cols) & (r >= 0) & (c >= 0)
            found.update(zip(r[ok].tolist(), c[ok].tolist()))
    return sorted(found)


def save_mask_png(mask: np.ndarray, path: str | os.PathLike) -> Path:
    """Write ``mask`` (bool (H, W)) as a black/white PNG preview, atomically.

    Raises
    ------
    OutputError
        If the file cannot be written.
    """
    from PIL import Image

    from .paths import atomic_write

    img = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L")
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"), "tissue preview", mkdir=True)
