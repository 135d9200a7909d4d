"""Training-time augmentation of (image, labels, hv) crops (numpy + torch, seeded).

Geometry: the 8 dihedral transforms (transpose + flips; the HoVer maps are swapped / negated to stay
consistent), scale jitter (crop ``crop * s`` then resize to ``crop``). Colour: HED stain jitter
(QuPath's H&E vectors), brightness/contrast/saturation, occasional Gaussian blur. Image quality
(``degrade`` > 0, :func:`degrade_image`): with that probability a crop is made worse the way slides
nobody here has seen are worse than the 40x training tiles: out of focus, scanned at low resolution
(shrunk and upsampled back, as the pipeline upsamples a coarse slide) or heavily JPEG-compressed.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

_STAINS = np.array([[0.65, 0.70, 0.29], [0.2159, 0.8012, 0.5581]], dtype=np.float64)
_STAINS /= np.linalg.norm(_STAINS, axis=1, keepdims=True)
_RES = np.cross(_STAINS[0], _STAINS[1])
_M = np.vstack([_STAINS, _RES / np.linalg.norm(_RES)])  # rows: H, E, residual
_MINV = np.linalg.inv(_M)


def random_crop(rng: np.random.Generator, img, lab, hv, crop: int, scale_range=(0.8, 1.25)):
    """Random crop of edge ``crop * s`` resized to ``crop`` (image bilinear; labels/hv nearest)."""
    s = float(rng.uniform(*scale_range))
    cs = max(16, int(round(crop * s)))
    h, w = lab.shape
    ph, pw = max(0, cs - h), max(0, cs - w)
    if ph or pw:
        img = np.pad(img, ((0, ph), (0, pw), (0, 0)), constant_values=255)
        lab = np.pad(lab, ((0, ph), (0, pw)))
        hv = np.pad(hv, ((0, 0), (0, ph), (0, pw)))
        h, w = lab.shape
    r = int(rng.integers(0, h - cs + 1))
    c = int(rng.integers(0, w - cs + 1))
    img = img[r:r + cs, c:c + cs]
    lab = lab[r:r + cs, c:c + cs]
    hv = hv[:, r:r + cs, c:c + cs]
    if cs != crop:
        t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()
        img = F.interpolate(t, size=(crop, crop), mode="bilinear", antialias=cs > crop,
                            align_corners=False)[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy()
        idx = np.minimum(((np.arange(crop) + 0.5) * cs / crop).astype(np.int64), cs - 1)
        lab = lab[idx[:, None], idx[None, :]]
        hv = hv[:, idx[:, None], idx[None, :]]
    return img, lab, hv


def dihedral(rng: np.random.Generator, img, lab, hv):
    """Random dihedral transform. ``hv`` is (C, H, W): channels 0/1 = horizontal/vertical maps
    (swapped / negated with the geometry), further channels (distance map) are scalar fields."""
    c = hv.shape[0]
    if rng.random() < 0.5:  # transpose: rows <-> cols, h <-> v
        img = img.transpose(1, 0, 2)
        lab = lab.T
        hv = hv[[1, 0] + list(range(2, c))].transpose(0, 2, 1)
    if rng.random() < 0.5:  # flip columns: h -> -h
        img = img[:, ::-1]
        lab = lab[:, ::-1]
        hv = hv[:, :, ::-1] * np.array([-1, 1] + [1] * (c - 2), np.float32)[:, None, None]
    if rng.random() < 0.5:  # flip rows: v -> -v
        img = img[::-1]
        lab = lab[::-1]
        hv = hv[:, ::-1] * np.array([1, -1] + [1] * (c - 2), np.float32)[:, None, None]
    return np.ascontiguousarray(img), np.ascontiguousarray(lab), np.ascontiguousarray(hv)


def colour(rng: np.random.Generator, img: np.ndarray, strength: float = 1.0) -> np.ndarray:
    x = img.astype(np.float64)
    od = -np.log10(np.maximum(x, 1.0) / 255.0)
    conc = od.reshape(-1, 3) @ _MINV
    alpha = 1.0 + rng.uniform(-0.3, 0.3, size=3) * strength
    beta = rng.uniform(-0.05, 0.05, size=3) * strength
    conc = conc * alpha + beta
    od = (conc @ _M).reshape(x.shape)
    x = 255.0 * np.power(10.0, -od)
    # brightness / contrast / saturation
    x = (x - 128.0) * (1.0 + rng.uniform(-0.15, 0.15) * strength) + 128.0 + rng.uniform(-15, 15) * strength
    grey = x.mean(axis=2, keepdims=True)
    x = grey + (x - grey) * (1.0 + rng.uniform(-0.2, 0.2) * strength)
    if rng.random() < 0.2 * strength:
        sigma = float(rng.uniform(0.3, 1.0))
        x = ndi.gaussian_filter(x, (sigma, sigma, 0))
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


# ranges of :func:`degrade_image` (physical units; the eval of benchmarks/eval_degraded.py sits
# inside them: blur sigma 1 µm, 1.0 µm/px, JPEG quality 30)
DEGRADE_BLUR_UM = (0.4, 1.4)  # Gaussian sigma, µm
DEGRADE_LOWRES_MPP = (0.7, 1.2)  # µm/px of the simulated scan
DEGRADE_JPEG_QUALITY = (20, 70)


def degrade_image(rng: np.random.Generator, img: np.ndarray, mpp: float) -> np.ndarray:
    """One image-quality degradation of an RGB crop, drawn uniformly from three kinds.

    Parameters
    ----------
    rng : numpy Generator
    img : ndarray of shape (H, W, 3), uint8
        A crop at ``mpp`` µm/px.
    mpp : float
        µm/px of ``img`` (the model's working resolution during training).

    Returns
    -------
    ndarray of shape (H, W, 3), uint8
        Out of focus (Gaussian blur, sigma in :data:`DEGRADE_BLUR_UM`), a low-resolution scan (shrunk
        to a µm/px in :data:`DEGRADE_LOWRES_MPP` and upsampled back with
        :func:`pipeline.model.resample.resample_image`, as inference upsamples a coarse slide), or JPEG
        compression (quality in :data:`DEGRADE_JPEG_QUALITY`). Labels are unchanged: the geometry is.
    """
    kind = int(rng.integers(3))
    if kind == 0:
        sigma = float(rng.uniform(*DEGRADE_BLUR_UM)) / mpp
        x = ndi.gaussian_filter(img.astype(np.float32), (sigma, sigma, 0))
        return np.clip(np.round(x), 0, 255).astype(np.uint8)
    if kind == 1:
        from ..model.resample import resample_image

        coarse = float(rng.uniform(*DEGRADE_LOWRES_MPP))
        small = resample_image(img, mpp / coarse)
        t = torch.from_numpy(np.ascontiguousarray(small)).permute(2, 0, 1)[None].float()
        t = F.interpolate(t, size=img.shape[:2], mode="bilinear", align_corners=False)
        return np.ascontiguousarray(t.round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy())
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=int(rng.integers(DEGRADE_JPEG_QUALITY[0],
                                                                           DEGRADE_JPEG_QUALITY[1] + 1)))
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def augment(rng, img, lab, hv, crop: int, strength: float = 1.0, degrade: float = 0.0, mpp: float = 0.5):
    """Random crop, dihedral transform, colour jitter and, with probability ``degrade``, one
    image-quality degradation (:func:`degrade_image`; ``mpp`` = µm/px of the crop). With
    ``degrade=0`` the random stream is that of earlier versions (same crops for the same seed)."""
    img, lab, hv = random_crop(rng, img, lab, hv, crop)
    img, lab, hv = dihedral(rng, img, lab, hv)
    img = colour(rng, img, strength)
    if degrade > 0 and rng.random() < degrade:
        img = degrade_image(rng, img, mpp)
    return img, lab, hv
