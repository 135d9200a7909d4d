"""Image sharpness of the tissue, block by block: where a slide is out of focus or coarser than the
model's resolution (pure core, torch-free; the I/O shell is :func:`pipeline.infer.process_batch`,
which scores each chunk's core, and :func:`pipeline.segment.run_export`, which summarises).

Why: measured on the validation tiles (``benchmarks/eval_degraded.py``), out of focus (blur sigma
1 µm) the network loses 0.12 AJI and the typers remove 5–7 % of the real nuclei; a low-resolution
scan (1 µm/px, upsampled 2x) loses 0.10 AJI. A user must see where that happens.

The score (:func:`sharpness`) is a band ratio on the grey level at the model's µm/px: the mean
absolute fine detail (image minus its Gaussian blur at :data:`FINE_SIGMA_UM`) over the mean absolute
mid-scale detail (the difference of the blurs at :data:`FINE_SIGMA_UM` and :data:`MID_SIGMA_UM`).
Blur and upsampling remove fine detail first, so the ratio falls; tissue content (dense or sparse,
pale or dark) changes both bands alike. Measured at 0.5 µm/px (``benchmarks/eval_focus.py``):

==========================================================  =============
image                                                         sharpness
==========================================================  =============
MoNuSeg / CPM tiles as scanned (40x and 20x)                  0.51–0.91
CRCHisto tiles (real 20x scans, 0.55 µm/px)                   0.62–0.90
the same MoNuSeg / CPM tiles, Gaussian blur sigma 0.5 µm      0.32–0.46
the same, scanned at 1.0 µm/px (upsampled 2x)                 0.30–0.43
the same, Gaussian blur sigma 1 µm                            0.21–0.26
==========================================================  =============

A block below :data:`pipeline.config.FOCUS_SOFT_BELOW` is *soft*: out of focus or below the
model's resolution.
"""

from __future__ import annotations

import json

import numpy as np
from scipy import ndimage as ndi

#: Gaussian sigmas of the two detail bands, µm (1 and 3 px at the model's 0.5 µm/px)
FINE_SIGMA_UM = 0.5
MID_SIGMA_UM = 1.5
#: pixels at least this bright (grey level, 0..255) are background (lumen, glass) and not scored
BRIGHT_GREY = 220
#: chunk-file schema metadata key of the core's block sharpness (:func:`encode_core_focus`)
FOCUS_KEY = b"focus"


def _bands(rgb: np.ndarray, mpp: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fine, mid, non-background)`` per pixel; the bands of the grey level x 3 (the ratio of
    :func:`sharpness` does not depend on the scale). Gaussians truncated at 3 sigma."""
    grey3 = rgb[..., :3].sum(axis=2, dtype=np.uint16).astype(np.float32)
    fine_blur = ndi.gaussian_filter(grey3, FINE_SIGMA_UM / mpp, mode="reflect", truncate=3.0)
    mid_blur = ndi.gaussian_filter(grey3, MID_SIGMA_UM / mpp, mode="reflect", truncate=3.0)
    fg = grey3 < 3 * BRIGHT_GREY
    grey3 -= fine_blur
    fine_blur -= mid_blur
    return np.abs(grey3, out=grey3), np.abs(fine_blur, out=fine_blur), fg


def sharpness(rgb: np.ndarray, mpp: float, mask: np.ndarray | None = None) -> float:
    """Band-ratio sharpness of an RGB image (see the module docstring).

    Parameters
    ----------
    rgb : ndarray of shape (H, W, 3), uint8
    mpp : float
        µm/px of ``rgb``.
    mask : ndarray of shape (H, W), bool, optional
        Pixels to score (e.g. tissue); non-background pixels inside it are used.

    Returns
    -------
    float
        Mean fine-band / mean mid-band detail over the scored pixels; NaN if none.
    """
    fine, mid, fg = _bands(rgb, mpp)
    use = fg if mask is None else fg & mask
    if not use.any():
        return float("nan")
    return _ratio(fine, mid, use)


def _ratio(fine: np.ndarray, mid: np.ndarray, use: np.ndarray) -> float:
    """Mean fine-band over mean mid-band detail on the pixels ``use`` (floored denominator)."""
    return float(fine[use].mean()) / max(float(mid[use].mean()), 3e-3)


def block_edges(length_px: int, block_px: int) -> np.ndarray:
    """Edges ``(n + 1,)`` of ``n = max(1, round(length_px / block_px))`` nearly equal blocks over
    ``[0, length_px)`` (pixels)."""
    n = max(1, int(round(length_px / max(block_px, 1))))
    return np.linspace(0, length_px, n + 1).round().astype(np.int64)


#: side of the centred part of a block that :func:`block_sharpness` scores, as a fraction of the
#: block side (0.5: a quarter of the pixels, about 3x less work than the whole core)
BLOCK_SAMPLE = 0.5


def block_sharpness(rgb: np.ndarray, mpp: float, tissue: np.ndarray, block_px: int,
                    min_tissue: float, sample: float = BLOCK_SAMPLE) -> np.ndarray:
    """:func:`sharpness` of each block of an image.

    Parameters
    ----------
    rgb : ndarray of shape (H, W, 3), uint8
        E.g. the core of a chunk at the store's µm/px.
    mpp : float
        µm/px of ``rgb``.
    tissue : ndarray of shape (H, W), bool
        Tissue mask over ``rgb``.
    block_px : int
        Nominal block edge, pixels (:func:`block_edges` splits each axis into nearly equal blocks).
    min_tissue : float
        Blocks whose tissue and non-background fraction (over the scored part) is below this get NaN.
    sample : float
        Side of the centred part of each block that is scored, as a fraction of the block side (1 =
        the whole block). The detail bands are computed with a margin of the filters' reach around
        it (image borders reflected), so the sample's score is that of those pixels in the whole image.

    Returns
    -------
    ndarray of shape (n_rows, n_cols), float32
        Sharpness per block (row-major, top-left first); NaN where not scored.
    """
    er, ec = block_edges(rgb.shape[0], block_px), block_edges(rgb.shape[1], block_px)
    out = np.full((len(er) - 1, len(ec) - 1), np.nan, np.float32)
    reach = int(np.ceil(3.0 * MID_SIGMA_UM / mpp)) + 1  # the truncated mid Gaussian's radius
    h, w = rgb.shape[:2]
    for i in range(len(er) - 1):
        for j in range(len(ec) - 1):
            (r0, r1), (c0, c1) = (_centred(er[i], er[i + 1], sample), _centred(ec[j], ec[j + 1], sample))
            t = tissue[r0:r1, c0:c1]
            if not t.size or t.mean() < min_tissue:
                continue
            R0, R1, C0, C1 = max(r0 - reach, 0), min(r1 + reach, h), max(c0 - reach, 0), min(c1 + reach, w)
            fine, mid, fg = _bands(rgb[R0:R1, C0:C1], mpp)
            inner = np.s_[r0 - R0:r1 - R0, c0 - C0:c1 - C0]
            u = fg[inner] & t
            if u.mean() >= min_tissue:
                out[i, j] = _ratio(fine[inner], mid[inner], u)
    return out


def _centred(a: int, b: int, sample: float) -> tuple[int, int]:
    """The centred ``sample`` fraction of ``[a, b)`` (at least one pixel)."""
    n = max(1, int(round((b - a) * sample)))
    s = a + (b - a - n) // 2
    return s, s + n


def encode_core_focus(core_rgb: np.ndarray, core_tissue: np.ndarray, mpp: float) -> bytes:
    """The block sharpness of a chunk's core as stored in its chunk file's metadata (:data:`FOCUS_KEY`).

    Parameters
    ----------
    core_rgb : ndarray of shape (H, W, 3), uint8
        The core at the store's µm/px.
    core_tissue : ndarray of shape (H, W), bool
    mpp : float

    Returns
    -------
    bytes
        JSON ``{"edges_r": [...], "edges_c": [...], "sharpness": [[...]]}``: block edges in core
        pixels (blocks of about :data:`pipeline.config.FOCUS_BLOCK_UM`), values rounded to 4
        decimals, ``null`` where not scored. :func:`decode_core_focus` reads it back.
    """
    from .config import FOCUS_BLOCK_UM, FOCUS_MIN_TISSUE

    block_px = max(1, int(round(FOCUS_BLOCK_UM / mpp)))
    vals = block_sharpness(core_rgb, mpp, core_tissue, block_px, FOCUS_MIN_TISSUE)
    return json.dumps({"edges_r": block_edges(core_rgb.shape[0], block_px).tolist(),
                       "edges_c": block_edges(core_rgb.shape[1], block_px).tolist(),
                       "sharpness": [[None if not np.isfinite(v) else round(float(v), 4) for v in row]
                                     for row in vals]}, separators=(",", ":")).encode()


def decode_core_focus(raw: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(edges_r int64, edges_c int64, sharpness float32 (n_r, n_c), NaN = not scored)`` of
    :func:`encode_core_focus`'s JSON."""
    f = json.loads(raw)
    return (np.asarray(f["edges_r"], np.int64), np.asarray(f["edges_c"], np.int64),
            np.array([[np.nan if v is None else v for v in row] for row in f["sharpness"]], np.float32))


def summarize_focus(blocks: list[np.ndarray], soft_below: float) -> dict:
    """Slide-level focus statistics from the per-chunk block grids.

    Parameters
    ----------
    blocks : list of ndarray, float
        :func:`block_sharpness` grids (NaN = not scored).
    soft_below : float
        Blocks scoring below this are soft.

    Returns
    -------
    dict
        ``blocks_scored``, ``soft_blocks``, ``soft_fraction`` (of the scored blocks; None if none),
        ``sharpness_median`` and ``sharpness_p10`` (None if none), ``soft_below``.
    """
    vals = np.concatenate([np.asarray(b, np.float64).ravel() for b in blocks]) if blocks else np.zeros(0)
    vals = vals[np.isfinite(vals)]
    n = int(vals.size)
    soft = int((vals < soft_below).sum())
    return {"blocks_scored": n, "soft_blocks": soft,
            "soft_fraction": round(soft / n, 4) if n else None,
            "sharpness_median": round(float(np.median(vals)), 4) if n else None,
            "sharpness_p10": round(float(np.percentile(vals, 10)), 4) if n else None,
            "soft_below": float(soft_below)}
