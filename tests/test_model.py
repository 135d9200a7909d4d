"""CellSAM model: SAM teacher loading, lite/dual forward, checkpoint round-trip, SAM-decoder refinement
and mask fusion. A tiny randomly initialised SAM (official key names) stands in for the official
checkpoints; one full-size ViT-B with random weights checks the official-shape path."""

from __future__ import annotations

import copy
import logging
import os
import pickle

import numpy as np
import pytest
import torch
from skimage.draw import disk

from pipeline.errors import ModelError
from pipeline.model import load_model
from pipeline.model.cellsam import DEFAULT_ARCH, CellSAM
from pipeline.model.checkpoint import save_checkpoint
from pipeline.model.refine import (RefineParams, attach_sam_decoder, fuse_instances, instance_prompts,
                                   prompt_windows, refine_and_fuse)
from pipeline.model.segmenter import Segmenter
from pipeline.model.teacher import build_tiny_sam_checkpoint, detect_sam_arch, load_teacher, read_sam_state


@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory):
    return build_tiny_sam_checkpoint(tmp_path_factory.mktemp("sam") / "tiny_sam.pth", img_size=256, seed=0)


@pytest.fixture(scope="module")
def teacher(tiny_sam):
    return load_teacher(tiny_sam)


def _arch(**kw):
    arch = copy.deepcopy(DEFAULT_ARCH)
    arch.update(kw)
    return arch


def _dual_model(teacher, seed=0):
    torch.manual_seed(seed)
    m = CellSAM(_arch(fusion=True)).eval()
    # a non-trivial gate so that the teacher visibly contributes
    torch.nn.init.normal_(m.fusion.gate.weight, std=0.05)
    m.teacher = teacher
    return m


def _disks(shape=(96, 112), centres=((20, 20), (48, 50), (52, 62), (80, 95)), radius=7):
    lab = np.zeros(shape, np.uint32)
    for i, (r, c) in enumerate(centres):
        rr, cc = disk((r, c), radius, shape=shape)
        lab[rr, cc] = i + 1
    return lab


# ------------------------------------------------------------------------------------------ teacher


def test_tiny_teacher_loads_frozen_and_maps_to_student_grid(teacher, tiny_sam):
    assert teacher.type == "custom" and teacher.img_size == 256
    assert teacher.info["encoder"]["global_attn_indexes"] == [1] and teacher.info["encoder"]["window_size"] == 4
    assert all(not p.requires_grad for p in teacher.parameters())
    assert set(k.split(".")[0] for k in teacher.decoder_state) == {"prompt_encoder", "mask_decoder"}
    # strict load: the encoder's weights equal the checkpoint's
    sd = torch.load(tiny_sam, map_location="cpu", weights_only=True)
    assert torch.equal(teacher.encoder.blocks[1].attn.rel_pos_h, sd["image_encoder.blocks.1.attn.rel_pos_h"])
    x = torch.randn(2, 3, 64, 96)
    y = teacher(x)
    assert y.shape == (2, 256, 4, 6) and y.dtype == torch.float32 and torch.isfinite(y).all()
    teacher.train()
    assert not teacher.training


def test_full_size_vit_b_state_dict_loads_like_an_official_checkpoint(tmp_path):
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    sam = sam_model_registry["vit_b"](checkpoint=None)
    path = tmp_path / "sam_vit_b_random.pth"
    torch.save(sam.state_dict(), path)
    ref = sam.image_encoder.blocks[3].attn.qkv.weight.detach().clone()
    del sam
    t = load_teacher(path)
    enc = t.info["encoder"]
    assert t.type == "vit_b"
    assert (enc["img_size"], enc["embed_dim"], enc["depth"], enc["num_heads"], enc["window_size"]) == (1024, 768, 12, 12, 14)
    assert enc["global_attn_indexes"] == [2, 5, 8, 11]
    assert t.decoder_cfg["mlp_dim"] == 2048 and t.decoder_cfg["num_multimask_outputs"] == 3
    assert torch.equal(t.encoder.blocks[3].attn.qkv.weight, ref)
    path.unlink()


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('CELLSAM_EVIL_MARKER', '/tmp/cellsam_evil_marker')}",))


def test_teacher_errors_are_one_line_model_errors(tmp_path, tiny_sam, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("CELLSAM_EVIL_MARKER", str(marker))
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as fh:
        pickle.dump({"image_encoder.patch_embed.proj.weight": _Evil()}, fh)
    with pytest.raises(ModelError, match="unsafe pickle"):
        load_teacher(evil)
    assert not marker.exists()
    with pytest.raises(ModelError, match="not found"):
        load_teacher(tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelError, match="not a loadable SAM checkpoint"):
        load_teacher(junk)
    other = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(3)}, other)
    with pytest.raises(ModelError, match="not a SAM checkpoint"):
        load_teacher(other)
    sd = read_sam_state(tiny_sam)
    broken = tmp_path / "broken.pth"
    torch.save({k: v for k, v in sd.items() if "blocks.0.mlp" not in k}, broken)
    with pytest.raises(ModelError) as exc:
        load_teacher(broken)
    assert "\n" not in str(exc.value)
    cellsam = tmp_path / "cellsam.pt"
    save_checkpoint(cellsam, CellSAM(), {"mpp": 0.5})
    with pytest.raises(ModelError, match="CellSAM checkpoint, not a SAM"):
        load_teacher(cellsam)


def test_detect_arch_reports_custom_variant(tiny_sam):
    arch = detect_sam_arch(read_sam_state(tiny_sam))
    assert arch["type"] == "custom" and arch["encoder"]["embed_dim"] == 32 and arch["decoder"]["mlp_dim"] == 256


# ------------------------------------------------------------------------------ lite / dual modes


def test_lite_and_dual_forward_shapes(teacher):
    x = torch.rand(2, 3, 64, 80) * 255
    lite = CellSAM().eval()
    assert lite.mode == "lite"
    with torch.no_grad():
        o = lite(x)
    assert o["maps"].shape == (2, 4, 64, 80) and o["maps"].dtype == torch.float32
    assert o["embed"].shape == (2, 256, 4, 5) and o["teacher_embed"] is None
    dual = _dual_model(teacher)
    assert dual.mode == "dual"
    with torch.no_grad():
        d = dual(x)
        d_lite = dual(x, use_teacher=False)
    assert d["teacher_embed"].shape == (2, 256, 4, 5) and d["maps"].shape == (2, 4, 64, 80)
    assert not torch.allclose(d["embed"], d["student_embed"])  # the teacher contributes
    assert torch.equal(d_lite["embed"], d_lite["student_embed"])
    assert not any(k.startswith("teacher.") for k in dual.trainable_state_dict())


def test_dual_checkpoint_round_trip_and_lite_fallback(tmp_path, teacher, tiny_sam, caplog):
    model = _dual_model(teacher)
    path = tmp_path / "dual.pt"
    save_checkpoint(path, model, {"mpp": 0.5, "mode": "dual", "teacher": teacher.info})
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["arch"]["fusion"] is True and not any(k.startswith("teacher.") for k in raw["state_dict"])
    img = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    seg = load_model(path, device="cpu", teacher=tiny_sam)
    assert seg.mode == "dual" and seg.metadata["mode"] == "dual"
    o1 = seg.forward(img[None])
    ref = Segmenter(model, {"mpp": 0.5}, device="cpu").forward(img[None])
    np.testing.assert_allclose(o1["prob"], ref["prob"], rtol=0, atol=1e-5)
    torch.testing.assert_close(o1["embed"], ref["embed"])
    with caplog.at_level(logging.WARNING):
        lite = load_model(path, device="cpu", engine="torch")  # torch returns the embedding without --refine
    assert lite.mode == "lite" and "running lite" in caplog.text
    o2 = lite.forward(img[None])
    assert o2["prob"].shape == o1["prob"].shape
    assert (o2["embed"] - o1["embed"]).abs().max() > 1e-3  # student embedding only


def test_teacher_with_lite_checkpoint_is_ignored(tmp_path, tiny_sam, caplog):
    path = tmp_path / "lite.pt"
    save_checkpoint(path, CellSAM(), {"mpp": 0.5})
    with caplog.at_level(logging.WARNING):
        seg = load_model(path, device="cpu", teacher=tiny_sam)
    assert seg.mode == "lite" and "teacher is ignored" in caplog.text


# ---------------------------------------------------------------------------------- refinement


def _refine_model(teacher=None, seed=0):
    torch.manual_seed(seed)
    m = CellSAM().eval()
    attach_sam_decoder(m, teacher.decoder_cfg if teacher else {"mlp_dim": 256},
                       teacher.decoder_state if teacher else None)
    return m.eval()


def test_sam_decoder_initialised_from_teacher_and_saved(tmp_path, teacher):
    m = _refine_model(teacher)
    sd = teacher.decoder_state
    assert torch.equal(m.mask_decoder.iou_token.weight, sd["mask_decoder.iou_token.weight"])
    path = tmp_path / "ref.pt"
    save_checkpoint(path, m, {"mpp": 0.5, "refine": RefineParams().to_dict()})
    seg = load_model(path, device="cpu", refine=True)
    assert seg.model.arch["sam_decoder"] and torch.equal(seg.model.mask_decoder.iou_token.weight,
                                                         sd["mask_decoder.iou_token.weight"])


def test_prompts_and_windows():
    lab = _disks()
    pts, boxes, brc = instance_prompts(lab)
    assert pts.shape == (4, 2) and boxes.shape == (4, 4)
    for i in range(4):  # each point lies inside its instance, each box bounds it
        assert lab[int(pts[i, 1]), int(pts[i, 0])] == i + 1
        rr, cc = np.nonzero(lab == i + 1)
        assert tuple(boxes[i]) == (cc.min(), rr.min(), cc.max(), rr.max())
    win = prompt_windows(brc, (6, 7), 4)
    assert (win[:, 2] == 4).all() and (win[:, :2] >= 0).all() and (win[:, 0] + win[:, 2] <= 6).all()
    big = prompt_windows(np.array([[0, 0, 90, 20]]), (6, 7), 4)[0]
    assert big[2] == 6  # enlarged to the box + margin, capped at the grid


def test_refine_and_fuse_non_overlapping_deterministic(teacher):
    model = _refine_model(teacher)
    lab = _disks()
    scores = np.array([0.9, 0.8, 0.7, 0.6], np.float32)
    prob = np.where(lab > 0, 0.9, 0.1).astype(np.float32)
    embed = torch.randn(1, 256, 6, 7, generator=torch.Generator().manual_seed(0))
    cfg = {"t_iou": -10.0, "t_agree": 0.0}  # always take the decoder mask where it overlaps
    a_lab, a_sc = refine_and_fuse(model, embed, lab, scores, prob, (96, 112), 0.5, cfg)
    b_lab, b_sc = refine_and_fuse(model, embed, lab, scores, prob, (96, 112), 0.5, cfg)
    assert a_lab.dtype == np.uint32 and a_lab.shape == lab.shape and a_sc.dtype == np.float32
    assert a_lab.tobytes() == b_lab.tobytes() and a_sc.tobytes() == b_sc.tobytes()
    k = int(a_lab.max())
    assert set(np.unique(a_lab)) - {0} == set(range(1, k + 1)) and a_sc.shape == (k,)
    # off: nothing passes the thresholds -> the dense partition, renumbered
    c_lab, c_sc = refine_and_fuse(model, embed, lab, scores, prob, (96, 112), 0.5, {"t_iou": 2.0})
    assert ((c_lab > 0) == (lab > 0)).all() and c_lab.max() == 4
    np.testing.assert_allclose(c_sc, 0.9, atol=1e-6)


def test_fusion_rule():
    lab = np.zeros((40, 40), np.uint32)
    lab[5:15, 5:15] = 1
    lab[5:15, 16:26] = 2
    lab[30:36, 30:36] = 3
    prob = np.full(lab.shape, 0.5, np.float32)
    scores = np.array([0.6, 0.9, 0.8], np.float32)
    d1 = np.zeros((20, 30), bool)
    d1[0:12, 0:22] = True  # instance 1's decoder mask spills into instance 2
    d2 = np.zeros((20, 20), bool)
    d2[0:12, 0:12] = True  # instance 2, placed at (4, 15): grows by one pixel ring, agrees
    d3 = np.zeros((10, 10), bool)
    d3[0:2, 0:2] = True  # instance 3: disagrees with its dense mask
    masks = [(4, 4, d1), (4, 15, d2), (28, 28, d3)]
    p = RefineParams(t_iou=0.5, t_agree=0.3, min_area_um2=1.0)
    out, sc = fuse_instances(lab, scores, prob, masks, np.array([0.9, 0.9, 0.9], np.float32), p, 1.0)
    ids = {int(out[r, c]) for r, c in ((10, 10), (10, 20), (33, 33))}
    assert len(ids) == 3 and 0 not in ids
    inst2 = out == out[10, 20]
    assert inst2.sum() == 144 and inst2[4:16, 15:27].all()  # decoder mask kept (higher score first)
    inst1 = out == out[10, 10]
    assert not (inst1 & inst2).any() and inst1[4:16, 4:15].sum() == inst1.sum()  # clipped by instance 2
    assert ((out == out[33, 33]) == (lab == 3)).all()  # disagreeing decoder mask rejected
    # low predicted IoU: dense masks everywhere
    out2, _ = fuse_instances(lab, scores, prob, masks, np.array([0.1, 0.1, 0.1], np.float32), p, 1.0)
    assert ((out2 > 0) == (lab > 0)).all() and out2.max() == 3
    assert sc.shape == (3,) and sc.dtype == np.float32


def test_segmenter_refine_mode_runs_and_is_deterministic(teacher):
    model = _refine_model(teacher)
    with torch.no_grad():
        model.decoder.head.bias[0] = 0.0
    img = np.random.default_rng(3).integers(0, 256, (80, 72, 3), dtype=np.uint8)
    params = {"fg_threshold": 0.0, "min_area_um2": 1.0}  # every pixel foreground: instances exist
    seg = Segmenter(model, {"mpp": 0.5, "postprocess": params, "refine": {"t_iou": -10.0, "t_agree": 0.0}},
                    device="cpu", refine=True)
    (l1, s1), = seg.segment_batch(img[None])
    (l2, s2), = seg.segment_batch(img[None])
    assert l1.dtype == np.uint32 and l1.shape == (80, 72) and l1.max() >= 1 and s1.shape == (l1.max(),)
    assert l1.tobytes() == l2.tobytes() and s1.tobytes() == s2.tobytes()
    with pytest.raises(ModelError, match="no SAM mask decoder"):
        Segmenter(CellSAM(), {"mpp": 0.5}, device="cpu", refine=True)
