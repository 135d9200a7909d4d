"""The annotated training/validation data and its preparation at the model's µm/px.

Sources under ``../shared/data/nuclei`` (never copied into the repository):

- MoNuSeg 2018 train: 30 tiles 1000x1000 at 40x (0.25 µm/px). 13 have ImageScope XML (preferred),
  17 have ``instance_labels_from_color_masks`` TIFFs.
- CPM-15: 15 tiles; images 01-07 at 20x (0.5 µm/px), 08-15 at 40x (0.25 µm/px).

The validation split (model selection only) is fixed: 3 MoNuSeg XML tiles of different organs and
3 CPM-15 tiles (one 20x, two 40x). The MoNuSeg 2018 official *test* split is not used anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from ..errors import InputError
from .readers import read_image, read_truth

VAL_MONUSEG = ("TCGA-21-5784-01Z-00-DX1", "TCGA-B0-5710-01Z-00-DX1", "TCGA-E2-A1B5-01Z-00-DX1")
VAL_CPM = ("image03", "image09", "image13")
MONUSEG_MPP = 0.25
CPM_MPP_20X = 0.5
CPM_MPP_40X = 0.25


@dataclass(frozen=True)
class Sample:
    """One annotated tile. ``truth`` is a label image, an ImageScope XML or a QuPath GeoJSON file."""

    name: str
    image: Path
    truth: Path
    mpp: float
    source: str  # "monuseg-xml" | "monuseg-color" | "cpm15" | "user"

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(image uint8 (H, W, 3), labels uint32 (H, W))`` at the tile's own µm/px."""
        img = read_image(self.image)
        lab = read_truth(self.truth, img.shape[:2])  # label image, ImageScope XML or QuPath GeoJSON
        if lab.shape != img.shape[:2]:
            raise InputError(f"{self.truth}: label shape {lab.shape} != image shape {img.shape[:2]}")
        return img, lab


def builtin_samples(root) -> list[Sample]:
    """All annotated tiles of ``root`` (= ``../shared/data/nuclei``), sorted by name."""
    root = Path(root)
    out: list[Sample] = []
    mon = root / "monuseg2018_train"
    for img in sorted((mon / "images").glob("*.tif")):
        xml = mon / "annotations" / f"{img.stem}.xml"
        col = mon / "instance_labels_from_color_masks" / f"{img.stem}.tif"
        if xml.exists():
            out.append(Sample(img.stem, img, xml, MONUSEG_MPP, "monuseg-xml"))
        elif col.exists():
            out.append(Sample(img.stem, img, col, MONUSEG_MPP, "monuseg-color"))
    cpm = root / "cpm15"
    for img in sorted((cpm / "images").glob("*.png")):
        idx = int(img.stem.replace("image", ""))
        out.append(Sample(img.stem, img, cpm / "labels" / f"{img.stem}.tif",
                          CPM_MPP_20X if idx <= 7 else CPM_MPP_40X, "cpm15"))
    if not out:
        raise InputError(f"{root}: no annotated tiles found (expected monuseg2018_train/ and cpm15/)")
    return out


def split_samples(samples: list[Sample]) -> tuple[list[Sample], list[Sample]]:
    """Fixed train/validation split (see module docstring)."""
    val_names = set(VAL_MONUSEG) | set(VAL_CPM)
    train = [s for s in samples if s.name not in val_names]
    val = [s for s in samples if s.name in val_names]
    return train, val


def user_samples(spec) -> list[Sample]:
    """Samples from a user directory with ``images/`` and ``labels/`` (label TIFF/PNG, ImageScope XML
    or QuPath GeoJSON with the image's stem) and an ``mpp.txt`` holding the tiles' µm/px."""
    spec = Path(spec)
    mpp_file = spec / "mpp.txt"
    if not mpp_file.exists():
        raise InputError(f"{spec}: missing mpp.txt (the tiles' µm/px, e.g. 0.5)")
    try:
        mpp = float(mpp_file.read_text().strip())
    except ValueError:
        raise InputError(f"{mpp_file}: not a number") from None
    out = []
    for img in sorted((spec / "images").iterdir()) if (spec / "images").is_dir() else []:
        for ext in (".tif", ".tiff", ".png", ".xml", ".geojson"):
            truth = spec / "labels" / f"{img.stem}{ext}"
            if truth.exists():
                out.append(Sample(img.stem, img, truth, mpp, "user"))
                break
    if not out:
        raise InputError(f"{spec}: no image/label pairs found under images/ and labels/")
    return out


# --------------------------------------------------------------------------------------------------
# resampling and targets


def resample_pair(img: np.ndarray, lab: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """Resample an image (antialiased) and its labels (nearest) by ``factor`` (new = old * factor)."""
    if abs(factor - 1.0) < 1e-6:
        return img, lab
    from skimage.transform import resize

    h, w = lab.shape
    shape = (max(1, int(round(h * factor))), max(1, int(round(w * factor))))
    img2 = resize(img, shape + (3,), order=1, anti_aliasing=factor < 1, preserve_range=True)
    img2 = np.clip(np.round(img2), 0, 255).astype(np.uint8)
    rows = np.minimum(((np.arange(shape[0]) + 0.5) / factor).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) / factor).astype(np.int64), w - 1)
    lab2 = lab[rows[:, None], cols[None, :]]
    return img2, lab2


def hv_targets(lab: np.ndarray) -> np.ndarray:
    """HoVer-Net horizontal/vertical maps: ``float32 (2, H, W)``; per instance, the column (0) and row
    (1) offset of each pixel from the instance centroid, scaled to [-1, 1] within the instance."""
    hv = np.zeros((2,) + lab.shape, dtype=np.float32)
    for i, sl in enumerate(ndi.find_objects(lab), start=1):
        if sl is None:
            continue
        m = lab[sl] == i
        rr, cc = np.nonzero(m)
        if rr.size == 0:
            continue
        r0, c0 = rr.mean(), cc.mean()
        dc = cc - c0
        dr = rr - r0
        if dc.min() < 0:
            dc[dc < 0] /= -dc.min()
        if dc.max() > 0:
            dc[dc > 0] /= dc.max()
        if dr.min() < 0:
            dr[dr < 0] /= -dr.min()
        if dr.max() > 0:
            dr[dr > 0] /= dr.max()
        sub0 = hv[0][sl]
        sub1 = hv[1][sl]
        sub0[rr, cc] = dc
        sub1[rr, cc] = dr
    return hv


def distance_targets(lab: np.ndarray) -> np.ndarray:
    """Per-instance normalised distance to the instance's own border: ``float32 (H, W)`` in [0, 1],
    1 at each nucleus' innermost pixel, small on its rim, 0 on background. Touching nuclei count as
    each other's border, so the map dips between them: its peaks are one marker per nucleus."""
    out = np.zeros(lab.shape, dtype=np.float32)
    for i, sl in enumerate(ndi.find_objects(lab), start=1):
        if sl is None:
            continue
        m = lab[sl] == i
        d = ndi.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]  # the zero pad is the box's outside
        mx = d.max()
        if mx > 0:
            sub = out[sl]
            sub[m] = (d[m] / mx).astype(np.float32)
    return out


def prepare(sample: Sample, mpp: float) -> dict:
    """Load a sample and bring it to ``mpp``: dict with ``image`` uint8 (H, W, 3), ``labels`` uint32,
    ``hv`` float32 (3, H, W) = horizontal map, vertical map (:func:`hv_targets`) and normalised
    distance map (:func:`distance_targets`)."""
    img, lab = sample.load()
    img, lab = resample_pair(img, lab, sample.mpp / mpp)
    hv = np.concatenate([hv_targets(lab), distance_targets(lab)[None]], 0)
    return {"name": sample.name, "image": img, "labels": lab, "hv": hv}
