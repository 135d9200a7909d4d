"""The vectorised type-head feature pass equals a plain per-instance reference (synthetic inputs,
instances touching every image border, an embedding at another scale)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.model.typehead import GROUPS, _OD_LUT, instance_features, n_features


def _labels(seed=0, shape=(97, 131)):
    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, np.uint32)
    k = 0
    for r, c in [(0, 0), (0, shape[1] - 3), (shape[0] - 2, 5), (shape[0] - 4, shape[1] - 4)] + \
            [tuple(rng.integers(3, s - 3) for s in shape) for _ in range(25)]:
        k += 1
        rr, cc = np.ogrid[:shape[0], :shape[1]]
        a, b = rng.uniform(2, 7, 2)
        lab[((rr - r) / a) ** 2 + ((cc - c) / b) ** 2 <= 1] = k  # later ellipses overwrite earlier ones
    # renumber 1..K (some ellipses may be fully covered)
    ids = np.unique(lab[lab > 0])
    lut = np.zeros(int(lab.max()) + 1, np.uint32)
    lut[ids] = np.arange(1, len(ids) + 1)
    return lut[lab]


def _reference(lab, scores, img, embed, mpp, scale):
    """Per-instance loops with the formulas of docs/model.md ("Type head")."""
    k = int(lab.max())
    d, eh, ew = embed.shape
    step = 16 / scale
    h, w = lab.shape
    pad = np.pad(lab, 1)
    rows = []
    for i in range(1, k + 1):
        rr, cc = np.nonzero(lab == i)
        n = len(rr)
        sr, sc = rr.mean(), cc.mean()
        # embed: cells weighted by pixel counts
        er = np.minimum((rr / step).astype(int), eh - 1)
        ec = np.minimum((cc / step).astype(int), ew - 1)
        emb = np.mean([embed[:, a, b] for a, b in zip(er, ec)], 0)
        cy, cx = min(max(int(sr / step), 0), eh - 1), min(max(int(sc / step), 0), ew - 1)
        ctx = np.mean([embed[:, y, x] for y in range(cy - 1, cy + 2) for x in range(cx - 1, cx + 2)
                       if 0 <= y < eh and 0 <= x < ew], 0)
        mrr = np.mean((rr - sr) ** 2) + 1 / 12
        mcc = np.mean((cc - sc) ** 2) + 1 / 12
        mrc = np.mean((rr - sr) * (cc - sc))
        ev = np.linalg.eigvalsh([[mrr, mrc], [mrc, mcc]])
        l2, l1 = max(ev[0], 1e-6), ev[1]
        area = n * mpp * mpp
        per = sum(1 for r, c in zip(rr + 1, cc + 1)
                  if (pad[r - 1, c], pad[r + 1, c], pad[r, c - 1], pad[r, c + 1]) != (i, i, i, i)) * mpp
        circ = min(4 * np.pi * area / max(per, mpp) ** 2, 2)
        morph = [np.log(area), np.log(4 * np.sqrt(l1) * mpp), np.log(4 * np.sqrt(l2) * mpp),
                 np.sqrt(max(1 - l2 / l1, 0)), circ, 1.0]
        od = _OD_LUT[img[rr, cc]]
        colour = list(od.mean(0)) + list(od.std(0)) + [scores[i - 1]]
        rows.append(dict(embed=emb, context=ctx, morph=morph, colour=colour, sr=sr, sc=sc))
    return rows


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_features_equal_per_instance_reference(scale):
    lab = _labels()
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, lab.shape + (3,), dtype=np.uint8)
    k = int(lab.max())
    scores = rng.uniform(0.5, 1, k).astype(np.float32)
    eh, ew = int(np.ceil(lab.shape[0] * scale / 16)), int(np.ceil(lab.shape[1] * scale / 16))
    embed = rng.normal(size=(8, eh, ew)).astype(np.float32)
    mpp = 0.5
    f = instance_features(lab, scores, img, embed, mpp, scale, GROUPS)
    assert f.shape == (k, n_features(8, GROUPS)) and f.dtype == np.float32
    ref = _reference(lab, scores, img, embed, mpp, scale)
    got_embed, got_ctx = f[:, :8], f[:, 8:16]
    got_morph, got_colour = f[:, 16:22], f[:, 22:29]
    for i, r in enumerate(ref):
        np.testing.assert_allclose(got_embed[i], r["embed"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got_ctx[i], r["context"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got_morph[i], r["morph"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got_colour[i], r["colour"], rtol=1e-4, atol=1e-5)


def test_surround_and_neighbour_groups_are_consistent():
    lab = _labels(2)
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, lab.shape + (3,), dtype=np.uint8)
    k = int(lab.max())
    f = instance_features(lab, np.ones(k, np.float32), img, None, 0.5, 1.0, ("neighbours", "surround"))
    assert f.shape == (k, 14) and np.isfinite(f).all()
    # nucleus fraction of the boxes lies in [0, 1]; the 24 µm box holds at least as many others within 10 µm
    assert (f[:, 6 + 3] >= 0).all() and (f[:, 6 + 3] <= 1).all() and (f[:, 6 + 7] <= 1).all()
    assert (f[:, 0] <= f[:, 2] + 1e-6).all()  # log(1 + count within 10 µm) <= within 25 µm
    with pytest.raises(ValueError, match="embedding"):
        instance_features(lab, np.ones(k, np.float32), img, None, 0.5, 1.0, ("context",))
