"""Tissue detection core, chunk lookup and preview."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import shared_file
from pipeline.config import TissueConfig
from pipeline.errors import InputError
from pipeline.slide import open_slide
from pipeline.tissue import chunks_touching_tissue, save_mask_png, tissue_area_mm2, tissue_mask

PINK = (230, 150, 190)


def _disc_image(size=200, radius=60, hole=10, speck=True):
    img = np.full((size, size, 3), 245, np.uint8)
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - 100) ** 2 + (xx - 100) ** 2 <= radius**2
    img[disc] = PINK
    img[(yy - 100) ** 2 + (xx - 100) ** 2 <= hole**2] = 250  # white hole inside tissue
    if speck:
        img[5:7, 5:7] = PINK  # 4 px = 256 µm² at 8 µm/px: below min_area_um2
    return img, disc


def test_disc_detected_hole_filled_speck_removed():
    img, disc = _disc_image()
    mask = tissue_mask(img, 8.0, TissueConfig())
    assert mask.dtype == bool and mask.shape == disc.shape
    iou = (mask & disc).sum() / (mask | disc).sum()
    assert iou > 0.95
    assert mask[100, 100]  # hole filled
    assert not mask[5:7, 5:7].any()  # speck dropped
    assert tissue_area_mm2(mask, 8.0) == pytest.approx(disc.sum() * 64 / 1e6, rel=0.05)


@pytest.mark.parametrize("value", [255, 0, 20])
def test_uniform_white_or_black_gives_empty_mask(value):
    img = np.full((50, 60, 3), value, np.uint8)
    mask = tissue_mask(img, 8.0, TissueConfig())
    assert mask.shape == (50, 60) and not mask.any()


def test_uniform_tissue_is_all_tissue():
    img = np.full((40, 40, 3), PINK, np.uint8)
    assert tissue_mask(img, 8.0, TissueConfig()).all()


def test_black_pen_is_not_tissue():
    img, disc = _disc_image(speck=False)
    img[20:40, 20:180] = (5, 5, 5)
    mask = tissue_mask(img, 8.0, TissueConfig())
    assert not mask[25:35, 20:180].any()


def test_bad_input():
    with pytest.raises(InputError):
        tissue_mask(np.zeros((10, 10), np.uint8), 8.0, TissueConfig())
    with pytest.raises(InputError):
        tissue_mask(np.zeros((10, 10, 3), np.float32), 8.0, TissueConfig())


def test_real_slide_mask_fraction():
    with open_slide(shared_file("slides/CMU-1-Small-Region.svs")) as slide:
        thumb = slide.thumbnail(8.0)
    mask = tissue_mask(thumb, 8.0, TissueConfig())
    assert 0.2 < mask.mean() < 0.6


def test_chunks_touching_tissue_geometry():
    # thumbnail at 8 µm/px, store at 0.5 µm/px with 256 px chunks -> a chunk is 128 µm = 16 thumb px
    mask = np.zeros((64, 64), bool)
    mask[20, 40] = True  # 160..168 µm rows, 320..328 µm cols -> chunk (1, 2)
    got = chunks_touching_tissue(mask, 8.0, (1024, 1024), 256, 0.5, margin_px=0)
    assert got == [(1, 2)]
    # a pixel straddling no boundary but dilated by 1 px touches the neighbour chunk
    mask2 = np.zeros((64, 64), bool)
    mask2[16, 16] = True  # exactly at the start of chunk (1, 1); dilation reaches row/col 15
    got2 = chunks_touching_tissue(mask2, 8.0, (1024, 1024), 256, 0.5)
    assert got2 == [(0, 0), (0, 1), (1, 0), (1, 1)]
    # chunks outside the store grid are dropped
    assert chunks_touching_tissue(mask, 8.0, (200, 200), 256, 0.5, margin_px=0) == []
    assert chunks_touching_tissue(np.zeros((8, 8), bool), 8.0, (100, 100), 64, 0.5) == []


def test_save_mask_png(tmp_path):
    mask = np.zeros((10, 12), bool)
    mask[2:5, 3:9] = True
    out = save_mask_png(mask, tmp_path / "sub" / "t.png")
    back = np.asarray(Image.open(out))
    assert back.shape == (10, 12) and np.array_equal(back > 0, mask)
    assert not list((tmp_path / "sub").glob("*.tmp-*"))
