"""The distance head (targets, augmentation consistency, decoding, 3 -> 4 channel warm start) and the
inference copy of the network."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.data.augment import dihedral
from pipeline.data.datasets import distance_targets, hv_targets
from pipeline.metrics import evaluate_pair
from pipeline.model.cellsam import CellSAM, grown, inference_copy, with_distance_head
from pipeline.model.checkpoint import load_checkpoint, save_checkpoint
from pipeline.model.postprocess import PostprocessParams, instances_from_maps


def _two_touching_disks(shape=(64, 80)):
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    lab = np.zeros(shape, np.uint32)
    lab[(rr - 32) ** 2 + (cc - 28) ** 2 <= 12 ** 2] = 1
    lab[((rr - 32) ** 2 + (cc - 50) ** 2 <= 12 ** 2) & (lab == 0)] = 2  # overlaps disk 1: they touch
    return lab


def test_distance_targets_peak_per_nucleus_and_dip_between():
    lab = _two_touching_disks()
    d = distance_targets(lab)
    assert d.dtype == np.float32 and d.shape == lab.shape
    assert d[lab == 0].max() == 0
    for i in (1, 2):
        assert np.isclose(d[lab == i].max(), 1.0)
    # along the row through both centres the map falls to its rim value where the disks touch
    row = d[32]
    border_col = int(np.flatnonzero(lab[32] == 2)[0])
    assert row[border_col] < 0.15 and row[28] > 0.9 and row[50] > 0.9


def test_dihedral_moves_distance_channel_as_a_scalar_field():
    lab = _two_touching_disks()
    img = np.zeros(lab.shape + (3,), np.uint8)
    hv = np.concatenate([hv_targets(lab), distance_targets(lab)[None]], 0)
    for seed in range(8):
        _, lab2, hv2 = dihedral(np.random.default_rng(seed), img, lab, hv)
        np.testing.assert_allclose(hv2[2], distance_targets(lab2), atol=1e-6)
        np.testing.assert_allclose(hv2[:2], hv_targets(lab2), atol=1e-5)


def test_distance_decoding_splits_touching_nuclei():
    lab = _two_touching_disks()
    prob = (lab > 0).astype(np.float32)
    hv = np.concatenate([hv_targets(lab), distance_targets(lab)[None]], 0)
    pred, scores = instances_from_maps(prob, hv, 0.5, PostprocessParams(dist_threshold=0.5))
    assert pred.max() == 2 and scores.shape == (2,)
    assert evaluate_pair(lab, pred)["aji"] > 0.95
    # the same foreground without the distance map (flat HV) stays one object
    flat = np.zeros((2,) + lab.shape, np.float32)
    merged, _ = instances_from_maps(prob, flat, 0.5, PostprocessParams())
    assert merged.max() == 1



def test_min_score_drops_weak_instances_and_renumbers():
    lab = _two_touching_disks()
    lab[5:15, 5:15] = 3  # a third, separate square
    prob = np.where(lab == 1, 0.95, np.where(lab == 2, 0.7, np.where(lab == 3, 0.9, 0.0))).astype(np.float32)
    hv = np.concatenate([hv_targets(lab), distance_targets(lab)[None]], 0)
    p = PostprocessParams(dist_threshold=0.5)
    full, s_full = instances_from_maps(prob, hv, 0.5, p)
    assert full.max() == 3 and np.allclose(sorted(s_full), [0.7, 0.9, 0.95], atol=1e-6)
    kept, s_kept = instances_from_maps(prob, hv, 0.5, PostprocessParams(dist_threshold=0.5, min_score=0.8))
    # the 0.7 disk is gone; the others keep their pixels, renumbered 1..2 in raster order
    assert kept.max() == 2 and np.allclose(s_kept, [0.9, 0.95], atol=1e-6)
    assert not kept[lab == 2].any()
    for i in (1, 3):
        assert len(np.unique(kept[lab == i])) == 1 and kept[lab == i][0] > 0
    assert kept[lab == 3][0] == 1  # the square comes first in raster order


def test_with_distance_head_keeps_hv_outputs():
    torch.manual_seed(0)
    arch = {"student": {"widths": [8, 8, 16, 16], "depths": [1, 1, 1, 1], "expand": 2},
            "decoder": {"dec": [16, 16, 8, 8, 8], "out": 3}}
    old = CellSAM(arch).eval()
    new = with_distance_head(old).eval()
    assert new.decoder.head.out_channels == 4 and new.arch["decoder"]["out"] == 4
    x = torch.rand(1, 3, 32, 32) * 255
    with torch.no_grad():
        a, b = old(x)["maps"], new(x)["maps"]
    torch.testing.assert_close(a, b[:, :3])
    assert torch.all(b[:, 3] == 0)


def test_grown_model_computes_the_same_function_with_more_blocks(tmp_path):
    torch.manual_seed(2)
    arch = {"student": {"widths": [8, 8, 16, 16], "depths": [1, 1, 1, 1], "expand": 2},
            "decoder": {"dec": [16, 16, 8, 8, 8], "out": 4}}
    old = CellSAM(arch).train()
    for _ in range(2):  # non-trivial BatchNorm statistics
        old(torch.rand(2, 3, 32, 32) * 255)
    old.eval()
    new = grown(old, 1).eval()
    assert new.arch["student"]["depths"] == [1, 2, 2, 2] and new.arch["decoder"]["refine2"] == 1
    assert len(new.decoder.refine2) == 1
    assert sum(p.numel() for p in new.parameters()) > sum(p.numel() for p in old.parameters())
    x = torch.rand(1, 3, 64, 64) * 255
    with torch.no_grad():
        torch.testing.assert_close(new(x)["maps"], old(x)["maps"], rtol=0, atol=0)
        # the grown architecture round-trips through a checkpoint and its inference copy agrees
        save_checkpoint(tmp_path / "g.pt", new, {"mpp": 0.5})
        back, _ = load_checkpoint(tmp_path / "g.pt")
        torch.testing.assert_close(inference_copy(back)(x)["maps"], old(x)["maps"], rtol=1e-4, atol=1e-4)
    assert grown(old, 0) is old


def test_inference_copy_matches_and_leaves_the_model_alone():
    torch.manual_seed(1)
    model = CellSAM().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    fast = inference_copy(model)
    x = (torch.rand(1, 3, 64, 96) * 255).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref, out = model(x)["maps"], fast(x)["maps"]
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
