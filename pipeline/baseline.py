"""Classical nucleus segmenter (haematoxylin channel + watershed), for honest comparisons only.

Never the pipeline's default: it exists so that ``cellsam evaluate --baseline`` can report how
much the model gains over a textbook method on the same images.

Method
------
1. Colour deconvolution with QuPath's default H&E stain vectors (H = (0.65, 0.70, 0.29),
   E = (0.2159, 0.8012, 0.5581), residual = their normalised cross product), optical density
   ``OD = -log10(max(v, 1) / 255)`` per RGB channel; the haematoxylin OD image is kept.
2. Gaussian smoothing (sigma in µm), Otsu threshold of the smoothed H OD (floored at
   ``min_h_od`` so that an image without nuclei does not threshold its noise).
3. Fill holes, drop foreground pieces smaller than ``min_area_um2``.
4. Euclidean distance transform (µm), smoothed; markers = local maxima at least
   ``min_peak_distance_um`` apart and ``min_peak_height_um`` high; marker-controlled watershed
   on the negated distance within the foreground.
5. Drop objects smaller than ``min_area_um2``; relabel 1..N in raster order of first pixel.

All lengths are in µm, so the same parameters work at 0.25 and 0.5 µm/px.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from .errors import InputError

#: QuPath's default H&E stain vectors (RGB optical density, before normalisation)
HEMATOXYLIN_OD = (0.65, 0.70, 0.29)
EOSIN_OD = (0.2159, 0.8012, 0.5581)


@dataclass(frozen=True)
class ClassicalConfig:
    """Parameters of the classical segmenter (lengths in µm, areas in µm²)."""

    smooth_sigma_um: float = 0.5  # Gaussian sigma on the H OD image before thresholding
    min_h_od: float = 0.10  # lower bound of the H OD threshold
    min_area_um2: float = 8.0  # smaller foreground pieces / objects are removed
    distance_sigma_um: float = 0.5  # smoothing of the distance map before peak detection
    min_peak_distance_um: float = 2.0  # below the nucleus radius (3-4 µm) so touching nuclei split
    min_peak_height_um: float = 1.0  # peaks of the distance map lower than this are ignored


def stain_matrix() -> np.ndarray:
    """Rows: unit OD vectors of haematoxylin, eosin and the residual; float64 of shape (3, 3)."""
    h = np.asarray(HEMATOXYLIN_OD, float)
    e = np.asarray(EOSIN_OD, float)
    h /= np.linalg.norm(h)
    e /= np.linalg.norm(e)
    r = np.cross(h, e)
    r /= np.linalg.norm(r)
    return np.stack([h, e, r])


def hematoxylin_od(image_rgb: np.ndarray) -> np.ndarray:
    """Haematoxylin optical density by colour deconvolution.

    Parameters
    ----------
    image_rgb : ndarray of shape (H, W, 3), uint8
        RGB image.

    Returns
    -------
    ndarray of shape (H, W), float32
        Haematoxylin concentration in OD units (about 0 on white background).
    """
    od = -np.log10(np.maximum(image_rgb, 1).astype(np.float32) / np.float32(255.0))
    inv = np.linalg.inv(stain_matrix()).astype(np.float32)  # od_rgb = conc @ M -> conc = od_rgb @ M^-1
    return (od @ inv[:, 0]).astype(np.float32)


def _otsu(values: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    if values.size == 0 or float(values.min()) == float(values.max()):
        return float(values.max()) if values.size else 0.0
    return float(threshold_otsu(values))


def segment_classical(
    image_rgb: np.ndarray, mpp: float, cfg: ClassicalConfig | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Segment nuclei with H-channel thresholding and distance-transform watershed.

    Parameters
    ----------
    image_rgb : ndarray of shape (H, W, 3), uint8
        RGB H&E image.
    mpp : float
        Pixel size of ``image_rgb``, µm/px.
    cfg : ClassicalConfig, optional
        Parameters (defaults: ``ClassicalConfig()``).

    Returns
    -------
    labels : ndarray of shape (H, W), uint32
        Nucleus labels 1..N, 0 = background.
    scores : ndarray of shape (N,), float32
        ``scores[i]`` belongs to label ``i + 1``: the fraction of the object's pixels whose
        (unsmoothed) H OD exceeds the threshold, in [0, 1].

    Raises
    ------
    InputError
        For an image that is not uint8 (H, W, 3) or a non-positive ``mpp``.
    """
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    cfg = cfg or ClassicalConfig()
    image_rgb = np.asarray(image_rgb)
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
        raise InputError(f"classical segmenter needs a uint8 (H, W, 3) RGB image, got {image_rgb.dtype} {image_rgb.shape}")
    if not (np.isfinite(mpp) and mpp > 0):
        raise InputError(f"mpp must be a positive number of µm/px, got {mpp}")
    shape = image_rgb.shape[:2]
    h_od = hematoxylin_od(image_rgb)
    smooth = ndi.gaussian_filter(h_od, cfg.smooth_sigma_um / mpp)
    thr = max(_otsu(smooth), cfg.min_h_od)
    fg = ndi.binary_fill_holes(smooth > thr)
    min_area_px = cfg.min_area_um2 / (mpp * mpp)
    fg = _drop_small(ndi.label(fg)[0], min_area_px) > 0
    if not fg.any():
        return np.zeros(shape, np.uint32), np.zeros(0, np.float32)

    dist_um = ndi.distance_transform_edt(fg) * mpp
    dist_um = ndi.gaussian_filter(dist_um, cfg.distance_sigma_um / mpp)
    comps, _ = ndi.label(fg)
    peaks = peak_local_max(
        dist_um,
        min_distance=max(1, int(round(cfg.min_peak_distance_um / mpp))),
        threshold_abs=cfg.min_peak_height_um,
        labels=comps,
        exclude_border=False,
    )
    markers = np.zeros(shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    # components without a peak (thin/flat pieces) keep one marker at their deepest point
    missing = np.setdiff1d(np.arange(1, comps.max() + 1), np.unique(comps[markers > 0]))
    if missing.size:
        deepest = ndi.maximum_position(dist_um, comps, missing)
        extra = np.asarray(deepest, dtype=np.intp).reshape(-1, 2)
        markers[tuple(extra.T)] = np.arange(len(peaks) + 1, len(peaks) + 1 + len(extra), dtype=np.int32)
    labels = watershed(-dist_um, markers, mask=fg)
    labels = _drop_small(labels, min_area_px)
    labels = _relabel_raster(labels)
    n = int(labels.max())
    if n == 0:
        return labels, np.zeros(0, np.float32)
    counts = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    above = np.bincount(labels.ravel(), weights=(h_od > thr).ravel(), minlength=n + 1)[1:]
    scores = (above / np.maximum(counts, 1)).astype(np.float32)
    return labels, scores


def _drop_small(labels: np.ndarray, min_area_px: float) -> np.ndarray:
    counts = np.bincount(labels.ravel())
    keep = counts >= min_area_px
    keep[0] = False
    return np.where(keep[labels], labels, 0)


def _relabel_raster(labels: np.ndarray) -> np.ndarray:
    """Relabel to 1..N in order of each object's first pixel (row-major); uint32."""
    flat = labels.ravel()
    ids, first = np.unique(flat, return_index=True)
    order = ids[np.argsort(first)]
    order = order[order > 0]
    lut = np.zeros(int(flat.max()) + 1, np.uint32)
    lut[order] = np.arange(1, order.size + 1, dtype=np.uint32)
    return lut[labels]
