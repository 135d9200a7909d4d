"""Two-stage type head: neighbour outputs in boxes, cross-fitted second stage, checkpoint round trip.

Synthetic inputs only (runs anywhere)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.model.typehead import TypeHead, neighbour_outputs
from pipeline.training.typehead import IGNORE, REJECT, TileExamples, fit_head


def _reference(cen, out, mpp, radii, cell_um=4.0):
    """Brute force: for each nucleus, the mean output of the others whose grid cell lies within
    +-round(r / cell) cells of its own (the definition of neighbour_outputs)."""
    cell = cell_um / mpp
    gr, gc = np.floor(cen[:, 1] / cell), np.floor(cen[:, 0] / cell)
    cols = []
    for r in radii:
        half = round(r / cell_um)
        m = np.zeros_like(out, dtype=np.float64)
        for i in range(len(cen)):
            sel = (np.abs(gr - gr[i]) <= half) & (np.abs(gc - gc[i]) <= half)
            sel[i] = False
            if sel.any():
                m[i] = out[sel].mean(0)
        cols.append(m)
    return np.concatenate(cols, 1)


def test_neighbour_outputs_equal_brute_force():
    rng = np.random.default_rng(3)
    cen = rng.uniform(0, 900, (300, 2))
    cen[:5] = [[2000, 2000], [2001, 2003], [3500, 100], [0, 0], [899.9, 0]]  # a pair, loners, edges
    out = rng.random((300, 5))
    got = neighbour_outputs(cen, out, 0.5, (10.0, 25.0, 100.0))
    want = _reference(cen, out, 0.5, (10.0, 25.0, 100.0))
    assert got.shape == (300, 15) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert np.all(got[2] == 0)  # no neighbour within 100 µm: zeros
    np.testing.assert_allclose(got[0, :5], out[1], atol=1e-6)  # the pair sees only each other
    assert neighbour_outputs(np.zeros((0, 2)), np.zeros((0, 5)), 0.5, (25.0,)).shape == (0, 5)


def _clustered_tiles(n_tiles, rng, mpp=0.5):
    """Tiles of two clusters of nuclei, each cluster one class. The instance features are pure noise
    with a weak class signal, so only the neighbourhood tells the classes apart well."""
    tiles = []
    for t in range(n_tiles):
        cen, y = [], []
        for c, (cx, cy) in enumerate(((200.0, 200.0), (800.0, 800.0))):
            k = 60
            cen.append(rng.normal((cx, cy), 60, (k, 2)))
            y.append(np.full(k, c))
        cen, y = np.concatenate(cen), np.concatenate(y)
        feats = rng.normal(0, 1, (len(y), 3)) + 0.35 * y[:, None]
        target = y.astype(np.int64)
        target[:5] = IGNORE
        target[5:8] = REJECT
        tiles.append(TileExamples(f"t{t}", feats.astype(np.float32), target, np.zeros((4, 4), np.uint32),
                                  np.ones(len(y), np.float32), cen, np.zeros((0, 2)), np.zeros(0, np.int64), mpp))
    return tiles


def _accuracy(head, tiles):
    ok = n = 0
    for e in tiles:
        p, _ = head.predict(e.features, e.centroids, e.mpp)
        sel = e.target >= 0
        ok += int((p.argmax(1)[sel] == e.target[sel]).sum())
        n += int(sel.sum())
    return ok / n


def test_second_stage_reads_the_neighbourhood(tmp_path):
    rng = np.random.default_rng(0)
    train, test = _clustered_tiles(6, rng), _clustered_tiles(3, rng)
    one = fit_head(train, ["A", "B"], reject=True, epochs=100, stage2_radii_um=())
    two = fit_head(train, ["A", "B"], reject=True, epochs=100, stage2_radii_um=(25.0, 100.0))
    assert one.stage2 is None and two.cfg["stage2"] == {"radii_um": [25.0, 100.0], "folds": 4}
    a1, a2 = _accuracy(one, test), _accuracy(two, test)
    assert a1 < 0.75 and a2 > 0.9, (a1, a2)
    # the first stage of the two-stage head is the one-stage head (same seed, same data)
    for k, v in one.state_dict().items():
        torch.testing.assert_close(two.state_dict()[k], v)
    # round trip through the checkpoint format (weights_only) gives the same predictions
    path = tmp_path / "head.pt"
    torch.save({"cfg": two.cfg, "state_dict": two.state_dict()}, path)
    obj = torch.load(path, weights_only=True)
    back = TypeHead(obj["cfg"])
    back.load_state_dict(obj["state_dict"])
    back.eval()
    e = test[0]
    np.testing.assert_array_equal(back.predict(e.features, e.centroids, e.mpp)[0],
                                  two.predict(e.features, e.centroids, e.mpp)[0])
    with pytest.raises(ValueError, match="centroids"):
        two.predict(e.features)
    with pytest.raises(ValueError, match="at least 2"):
        fit_head(train[:1], ["A", "B"], epochs=5, stage2_radii_um=(25.0,))


def test_instance_targets_hand_computed():
    from pipeline.training.typehead import NUCLEUS, instance_targets

    truth = np.zeros((10, 10), np.int32)
    truth[0:4, 0:4] = 1  # 16 px
    truth[6:10, 6:10] = 2
    pred = np.zeros((10, 10), np.uint32)
    pred[0:4, 0:3] = 1  # 12 px inside truth 1: IoU 0.75 -> nucleus
    pred[0:2, 6:10] = 2  # on background only -> false detection
    pred[5:8, 5:8] = 3  # 9 px, 4 on truth 2 (44 %, IoU 4/21) -> ignored
    pred[9, 0] = 4  # 1 px on background -> false detection
    np.testing.assert_array_equal(instance_targets(pred, truth), [NUCLEUS, REJECT, IGNORE, REJECT])


def test_nucleus_rows_train_not_rejected_only():
    from pipeline.training.typehead import NUCLEUS, head_loss

    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 1.0], [0.5, 0.5, 4.0]])
    y = torch.tensor([0, NUCLEUS, 2])
    p = torch.softmax(logits, 1)
    want = (-torch.log(p[0, 0]) - torch.log(p[1, 0] + p[1, 1]) - torch.log(p[2, 2])) / 3
    torch.testing.assert_close(head_loss(logits, y, 2), want)
