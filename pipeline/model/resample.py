"""Resampling between an image's µm/px and the model's (pure functions, numpy in / numpy out)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

MIN_SIDE_PX = 16  # a resampled image is at least one embedding token on each side


def resampled_size(shape_hw: tuple[int, int], factor: float) -> tuple[int, int]:
    """``(round(H * factor), round(W * factor))``, at least :data:`MIN_SIDE_PX` each."""
    h, w = shape_hw
    return max(MIN_SIDE_PX, int(round(h * factor))), max(MIN_SIDE_PX, int(round(w * factor)))


def resample_image(image: np.ndarray, factor: float) -> np.ndarray:
    """RGB image resampled by ``factor`` (bilinear; antialiased when shrinking).

    Parameters
    ----------
    image : ndarray of shape (H, W, 3), uint8
    factor : float
        Output pixels per input pixel (``input µm/px / model µm/px``), > 0.

    Returns
    -------
    ndarray of shape :func:`resampled_size` + (3,), uint8
    """
    if not factor > 0:
        raise ValueError(f"resampling factor must be > 0, got {factor}")
    size = resampled_size(image.shape[:2], factor)
    if size == tuple(image.shape[:2]):
        return image
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=size, mode="bilinear", antialias=factor < 1, align_corners=False)
    return np.ascontiguousarray(x.round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy())


def resample_labels(labels: np.ndarray, scores: np.ndarray, shape_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Instance labels resampled to ``shape_hw`` by nearest neighbour (pixel centres), renumbered.

    Parameters
    ----------
    labels : ndarray of shape (h, w), uint32
        Instances 1..K, 0 = background.
    scores : ndarray of shape (K,), float32
        ``scores[i]`` belongs to label ``i + 1``.
    shape_hw : (int, int)
        Output shape ``(H, W)``.

    Returns
    -------
    labels : ndarray of shape (H, W), uint32
        Instances 1..K' (those with at least one output pixel) numbered in raster order of their
        first pixel.
    scores : ndarray of shape (K',), float32
        Their scores, carried over.
    """
    h, w = labels.shape
    oh, ow = int(shape_hw[0]), int(shape_hw[1])
    rows = np.minimum(((np.arange(oh) + 0.5) * h / oh).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(ow) + 0.5) * w / ow).astype(np.int64), w - 1)
    out = labels[rows[:, None], cols[None, :]]
    flat = out.ravel()
    ids, first = np.unique(flat, return_index=True)
    keep = ids > 0
    ids, first = ids[keep], first[keep]
    ids = ids[np.argsort(first, kind="stable")]
    lut = np.zeros(int(labels.max()) + 1, np.uint32)
    lut[ids] = np.arange(1, ids.size + 1, dtype=np.uint32)
    sc = np.asarray(scores, np.float32)
    return lut[out], (sc[ids.astype(np.int64) - 1] if ids.size else np.zeros(0, np.float32))
