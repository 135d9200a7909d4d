"""Shared test fixtures.

Real data lives in ``../shared/data`` (relative to the repository root) and is never copied
into the repository. With ``CI=true`` a missing file is a failure; elsewhere tests skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CELLSAM_SHARED_DATA", REPO.parent / "shared" / "data"))
SLIDES = SHARED / "slides"
NUCLEI = SHARED / "nuclei"
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def shared_file(relpath: str) -> Path:
    """Path of a file under ``../shared/data``; skip (or fail in CI) if it is not there."""
    path = SHARED / relpath
    if not path.exists():
        msg = f"shared data file missing: {path}"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture
def shared():
    return shared_file


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="no CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def cmu1_crop_tiff(path, crop_l0):
    """A crop ``(x, y, width, height)`` (level-0 px) of CMU-1-Small-Region.svs written to ``path`` as a
    tiled TIFF with the slide's µm/px (read by OpenSlide's generic-tiff); returns (path, mpp_x)."""
    import numpy as np
    import openslide
    import tifffile

    src = shared_file("slides/CMU-1-Small-Region.svs")
    with openslide.OpenSlide(str(src)) as osr:
        x, y, w, h = crop_l0
        rgb = np.asarray(osr.read_region((x, y), 0, (w, h)).convert("RGB"))
        mpp_x, mpp_y = float(osr.properties["openslide.mpp-x"]), float(osr.properties["openslide.mpp-y"])
    tifffile.imwrite(path, rgb, tile=(256, 256), photometric="rgb", compression="zlib",
                     resolution=(1e4 / mpp_x, 1e4 / mpp_y), resolutionunit="CENTIMETER", metadata=None)
    return Path(path), mpp_x
