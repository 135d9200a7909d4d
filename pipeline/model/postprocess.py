"""Prompt-free instance decoding: nucleus probability + HoVer maps -> instance labels (torch-free).

Deterministic marker-controlled watershed, in the spirit of HoVer-Net (Graham et al. 2019):

1. foreground = probability >= ``fg_threshold``; pieces smaller than ``min_area_um2`` removed;
2. the horizontal map's column derivative and the vertical map's row derivative (Gaussian
   derivative, ``sigma_um``) are large where two nuclei touch (the maps jump from +1 to -1);
   ``edge = max(|d h/d col|, |d v/d row|)`` in units of 1/µm, so thresholds are resolution-free;
3. markers = foreground & (edge < ``marker_threshold``), opened, small markers dropped;
4. watershed of ``edge`` from the markers within the foreground; foreground pieces that got no
   marker keep a label of their own (never lose a detected nucleus).

Models with a distance head (4-channel decoder) decode with it instead of steps 2-4: markers =
foreground & (normalised distance-to-border >= ``dist_threshold``), and the watershed floods
``-distance``. The distance map dips to 0 where two nuclei touch, so its peaks give one marker per
nucleus even when the HV maps are blurred (as they are at 0.5 µm/px).

All thresholds live in the checkpoint's metadata (``postprocess``), tuned on the validation split.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import watershed


@dataclass(frozen=True)
class PostprocessParams:
    fg_threshold: float = 0.5
    marker_threshold: float = 0.6  # edge strength, 1/µm
    sigma_um: float = 0.5
    min_area_um2: float = 3.0
    min_marker_um2: float = 1.0
    dist_threshold: float = 0.5  # distance-head models: marker level of the normalised distance
    min_score: float = 0.0  # instances whose mean nucleus probability is below this are dropped

    @classmethod
    def from_dict(cls, d: dict | None) -> "PostprocessParams":
        names = {f.name for f in fields(cls)}
        return cls(**{k: float(v) for k, v in (d or {}).items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)


def keep_instances(lab: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Labels ``1..K`` with only those where ``keep[i - 1]`` is true, renumbered ``1..K'`` in their order.

    Parameters
    ----------
    lab : ndarray of shape (H, W), integer
        Instances 1..K, 0 = background.
    keep : ndarray of shape (K,), bool

    Returns
    -------
    ndarray of shape (H, W), uint32
    """
    lut = np.zeros(len(keep) + 1, dtype=np.uint32)
    lut[1:][keep] = np.arange(1, int(np.count_nonzero(keep)) + 1, dtype=np.uint32)
    return lut[lab]


def _relabel_by_size(lab: np.ndarray, min_px: int) -> np.ndarray:
    n = int(lab.max())
    if n == 0:
        return lab.astype(np.uint32)
    counts = np.bincount(lab.ravel(), minlength=n + 1)
    return keep_instances(lab, counts[1:] >= min_px)


def _binary_opening_3x3(mask: np.ndarray) -> np.ndarray:
    """``ndi.binary_opening(mask, structure=np.ones((3, 3)))`` (outside = False), with array shifts.

    The 3x3 square is separable: erosion = AND of row then column neighbours, dilation = OR;
    identical output, ~15x faster than the generic structuring-element code.
    """
    eroded = np.zeros_like(mask)
    rows = mask[:, :-2] & mask[:, 1:-1] & mask[:, 2:]
    eroded[1:-1, 1:-1] = rows[:-2] & rows[1:-1] & rows[2:]
    pad = np.zeros((mask.shape[0] + 2, mask.shape[1] + 2), bool)
    pad[1:-1, 1:-1] = eroded
    rows = pad[:, :-2] | pad[:, 1:-1] | pad[:, 2:]
    return rows[:-2] | rows[1:-1] | rows[2:]


def foreground_components(prob: np.ndarray, mpp: float, params: PostprocessParams) -> np.ndarray:
    """Step 1: connected components of ``prob >= fg_threshold`` of at least ``min_area_um2``,
    numbered 1..C (uint32 (H, W); all 0 when there is none)."""
    fg = prob >= params.fg_threshold
    if not fg.any():
        return np.zeros(prob.shape, np.uint32)
    comp, _ = ndi.label(fg)
    return _relabel_by_size(comp, max(1, int(round(params.min_area_um2 / (mpp * mpp)))))


def label_markers(marker: np.ndarray, mpp: float, params: PostprocessParams) -> np.ndarray:
    """Step 3: a boolean marker mask opened (3x3), labelled, markers under ``min_marker_um2``
    dropped; uint32 (H, W)."""
    mk, _ = ndi.label(_binary_opening_3x3(marker))
    return _relabel_by_size(mk, max(1, int(round(params.min_marker_um2 / (mpp * mpp)))))


def flood_from_markers(edge: np.ndarray, mk: np.ndarray, comp: np.ndarray, mpp: float,
                       params: PostprocessParams) -> np.ndarray:
    """Step 4: watershed of ``edge`` from the labelled markers ``mk`` (uint32, inside ``comp``)
    within the foreground components ``comp``; a component without any marker keeps a label of its
    own (never lose a detected nucleus); pieces under ``min_area_um2`` dropped. uint32 (H, W),
    labels not yet in raster order."""
    fg = comp > 0
    has = np.zeros(int(comp.max()) + 1, bool)
    has[comp[mk > 0]] = True
    orphan = fg & ~has[comp]
    if orphan.any():
        oc, _ = ndi.label(orphan)
        oc = oc.astype(np.uint32)
        oc[oc > 0] += np.uint32(mk.max())
        mk = np.where(orphan, oc, mk)
    lab = watershed(edge, markers=mk, mask=fg).astype(np.uint32)
    return _relabel_by_size(lab, max(1, int(round(params.min_area_um2 / (mpp * mpp)))))


def instances_from_maps(prob: np.ndarray, hv: np.ndarray, mpp: float,
                        params: PostprocessParams = PostprocessParams()) -> tuple[np.ndarray, np.ndarray]:
    """Decode instances.

    Parameters
    ----------
    prob : ndarray of shape (H, W), float32
        Nucleus probability in [0, 1].
    hv : ndarray of shape (2, H, W) or (3, H, W), float32
        Horizontal (column) and vertical (row) offset maps in [-1, 1], and optionally the normalised
        distance-to-border map in [0, 1] (then used for markers and flooding).
    mpp : float
        µm/px of the maps.

    Returns
    -------
    labels : ndarray of shape (H, W), uint32
        Instances numbered 1..K in raster order of their first pixel; 0 = background.
    scores : ndarray of shape (K,), float32
        Mean probability of each instance (``scores[i]`` belongs to label ``i + 1``); instances
        whose score is below ``params.min_score`` are dropped (:func:`drop_low_scores`).
    """
    comp = foreground_components(prob, mpp, params)
    fg = comp > 0
    if not fg.any():
        return np.zeros(prob.shape, np.uint32), np.zeros(0, np.float32)
    if hv.shape[0] > 2:
        edge = -hv[2].astype(np.float32)  # flood the inverted distance map
        marker = fg & (hv[2] >= params.dist_threshold)
    else:
        sigma = max(params.sigma_um / mpp, 0.5)
        gh = np.abs(ndi.gaussian_filter(hv[0].astype(np.float32), sigma, order=(0, 1)))
        gv = np.abs(ndi.gaussian_filter(hv[1].astype(np.float32), sigma, order=(1, 0)))
        edge = np.maximum(gh, gv) / mpp  # per µm
        marker = fg & (edge < params.marker_threshold)
    lab = flood_from_markers(edge, label_markers(marker, mpp, params), comp, mpp, params)
    # number in raster order of first pixel (deterministic, tile-position independent order)
    flat = lab.ravel()
    n = int(flat.max())
    if n == 0:
        return lab, np.zeros(0, np.float32)
    idx = np.flatnonzero(flat)  # labelled pixels, raster order
    lab_px = flat[idx]
    first = np.full(n + 1, flat.size, np.int64)
    np.minimum.at(first, lab_px, idx)
    ids = np.flatnonzero(first < flat.size)  # labels present (0 is never: idx excludes it)
    lut = np.zeros(n + 1, np.uint32)
    lut[ids[np.argsort(first[ids], kind="stable")]] = np.arange(1, ids.size + 1, dtype=np.uint32)
    n = ids.size
    lab = lut[lab]
    # per-label sums over the labelled pixels in raster order: the same additions, in the same
    # order, as over the whole image
    new_px = lut[lab_px]
    sums = np.bincount(new_px, weights=prob.ravel()[idx].astype(np.float64), minlength=n + 1)
    cnts = np.bincount(new_px, minlength=n + 1)
    scores = (sums[1:] / np.maximum(cnts[1:], 1)).astype(np.float32)
    if params.min_score > 0:
        lab, scores = drop_low_scores(lab, scores, params.min_score)
    return lab, scores


def drop_low_scores(lab: np.ndarray, scores: np.ndarray, min_score: float) -> tuple[np.ndarray, np.ndarray]:
    """Instances with ``scores < min_score`` removed, the rest renumbered 1..K' in their order.

    Parameters
    ----------
    lab : ndarray of shape (H, W), uint32
        Instances 1..K (raster order of first pixel), 0 = background.
    scores : ndarray of shape (K,), float32
        ``scores[i]`` belongs to label ``i + 1``.
    min_score : float

    Returns
    -------
    labels : ndarray of shape (H, W), uint32
    scores : ndarray of shape (K',), float32
    """
    keep = scores >= np.float32(min_score)
    if keep.all():
        return lab, scores
    return keep_instances(lab, keep), scores[keep]
