"""Image-quality augmentation (pipeline.data.augment.degrade_image): each kind degrades what it
should, keeps the geometry, is seeded, and ``degrade=0`` keeps the old random stream."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.augment import augment, degrade_image


def _texture(n=128, seed=0):
    """Dark disks on a pink background with pixel noise: edges and fine detail to lose."""
    rng = np.random.default_rng(seed)
    rr, cc = np.mgrid[:n, :n]
    img = np.zeros((n, n, 3), np.float64) + (230, 180, 200)
    for _ in range(25):
        r, c, rad = rng.integers(8, n - 8), rng.integers(8, n - 8), rng.integers(4, 8)
        img[(rr - r) ** 2 + (cc - c) ** 2 <= rad ** 2] = (90, 60, 140)
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _high_freq(img):
    """Mean absolute difference between horizontal neighbours (detail energy)."""
    return float(np.abs(np.diff(img.astype(np.float64), axis=1)).mean())


class _Fixed:
    """A generator whose integers() always returns ``kind`` (the degradation kind) and otherwise
    draws from a seeded numpy Generator."""

    def __init__(self, kind, seed=0):
        self.kind, self.rng, self.first = kind, np.random.default_rng(seed), True

    def integers(self, *a, **k):
        if self.first:
            self.first = False
            return self.kind
        return self.rng.integers(*a, **k)

    def uniform(self, *a, **k):
        return self.rng.uniform(*a, **k)


@pytest.mark.parametrize("kind", [0, 1, 2])
def test_each_kind_loses_detail_and_keeps_shape(kind):
    img = _texture()
    out = degrade_image(_Fixed(kind), img, 0.5)
    assert out.shape == img.shape and out.dtype == np.uint8
    # blur, low resolution and JPEG all remove pixel-scale detail
    assert _high_freq(out) < 0.8 * _high_freq(img)
    # but keep the picture: the mean colour moves by little, the disks stay where they were
    assert np.abs(out.astype(float).mean((0, 1)) - img.astype(float).mean((0, 1))).max() < 4
    dark_in, dark_out = img.mean(2) < 140, out.mean(2) < 140
    assert (dark_in & dark_out).sum() > 0.7 * dark_in.sum()


def test_blur_scales_with_mpp():
    """The blur is in µm: the same draw blurs a 0.25 µm/px crop by twice as many pixels."""
    img = _texture()
    fine = degrade_image(_Fixed(0, seed=3), img, 0.25)
    coarse = degrade_image(_Fixed(0, seed=3), img, 0.5)
    assert _high_freq(fine) < _high_freq(coarse)


def test_augment_degrade_seeded_and_zero_is_the_old_stream():
    img = _texture(300)
    lab = np.zeros(img.shape[:2], np.int32)
    lab[100:140, 100:140] = 1
    hv = np.zeros((3,) + lab.shape, np.float32)
    a = augment(np.random.default_rng(5), img, lab, hv, 128, degrade=1.0)
    b = augment(np.random.default_rng(5), img, lab, hv, 128, degrade=1.0)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    plain = augment(np.random.default_rng(5), img, lab, hv, 128)
    zero = augment(np.random.default_rng(5), img, lab, hv, 128, degrade=0.0)
    assert all(np.array_equal(x, y) for x, y in zip(plain, zero))
    # degradation touches the image only: labels and targets are those of the plain crop
    assert np.array_equal(a[1], plain[1]) and np.array_equal(a[2], plain[2])
    assert not np.array_equal(a[0], plain[0])
