"""Foreground gate (pipeline.model.cellsam.ForegroundGate, pipeline.training.gate): starts as a no-op,
exports through the engines, and its training moves only the gate and only lowers the nucleus logit."""

from __future__ import annotations

import numpy as np
import torch

from conftest import NUCLEI, REPO, SHARED, shared_file
from pipeline.model.checkpoint import DEFAULT_WEIGHTS, load_checkpoint, save_checkpoint
from pipeline.training.gate import GateConfig, train_gate, with_gate

NEGATIVES = REPO / "pipeline" / "data" / "negatives" / "cmu1_negatives.geojson"


def _image(seed=0, size=128):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.uniform(0, 255, (1, 3, size, size)).astype(np.float32))


def test_gate_starts_as_a_no_op_and_survives_the_checkpoint(tmp_path):
    model, meta = load_checkpoint(DEFAULT_WEIGHTS)
    gated = with_gate(model).eval()
    x = _image()
    with torch.no_grad():
        a, b = model.eval()(x)["maps"], gated(x)["maps"]
    d = (b[:, 0] - a[:, 0])
    assert (d <= 0).all() and d.min() > -0.003  # -softplus(-6)
    torch.testing.assert_close(b[:, 1:], a[:, 1:])
    path = tmp_path / "gated.pt"
    save_checkpoint(path, gated, meta)
    back, _ = load_checkpoint(path)
    assert back.arch["fg_gate"] == {"hidden": 32} and back.fg_gate is not None
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x)["maps"], b)


def test_gated_model_runs_on_the_default_engine():
    from pipeline.model.segmenter import Segmenter

    model, meta = load_checkpoint(DEFAULT_WEIGHTS)
    gated = with_gate(model).eval()
    with torch.no_grad():
        gated.fg_gate.out.bias.fill_(2.0)  # a gate that does something: logit lowered by softplus(2)
    img = np.ascontiguousarray(_image(1, 256)[0].permute(1, 2, 0).numpy().astype(np.uint8))
    ref = Segmenter(gated, meta, device="cpu", engine="torch").forward(img[None])["prob"]
    got = Segmenter(gated, meta, device="cpu").forward(img[None])["prob"]
    plain = Segmenter(model, meta, device="cpu", engine="torch").forward(img[None])["prob"]
    assert np.abs(got - ref).max() < 0.05  # bf16 engines: rounding only
    assert (ref <= plain + 1e-5).all() and (ref < plain - 0.01).mean() > 0.1


def test_short_gate_training_moves_only_the_gate(tmp_path):
    shared_file("slides/CMU-1-Small-Region.svs")
    shared_file("nuclei/monuseg2018_train")
    from pipeline.config import TrainConfig
    from pipeline.model.segmenter import Segmenter
    from pipeline.training.joint import load_negative_regions

    model, meta = load_checkpoint(DEFAULT_WEIGHTS)
    regions = load_negative_regions(NEGATIVES, SHARED, 0.5, None)  # no teacher: outside the polygons ignored
    assert regions and regions[0]["mask"].any()
    out = tmp_path / "g.pt"
    cfg = TrainConfig(batch_size=3, crop_px=128, threads=2)
    meta2 = train_gate(str(NUCLEI), regions, out, init=DEFAULT_WEIGHTS, cfg=cfg,
                       gcfg=GateConfig(iters=10, log_every=0))
    new, _ = load_checkpoint(out)
    old_sd, new_sd = model.state_dict(), new.state_dict()
    assert set(new_sd) - set(old_sd) == {k for k in new_sd if k.startswith("fg_gate.")}
    for k, v in old_sd.items():
        assert torch.equal(new_sd[k], v), k  # the network, BatchNorm statistics and type head are untouched
    info = meta2["fg_gate_training"]
    assert set(info["validation_before"]) == {"aji", "pq", "dice", "pixel_precision", "pixel_recall"}
    assert meta2["postprocess"] == meta["postprocess"] and new.type_head is not None
    # the gate moved (its last convolution started at zero weights), and it can only lower the logit
    assert new.fg_gate.out.weight.abs().max() > 0
    r = regions[0]
    ys, xs = np.nonzero(r["mask"])
    y0 = int(np.clip(ys.mean() - 128, 0, r["mask"].shape[0] - 256))
    x0 = int(np.clip(xs.mean() - 128, 0, r["mask"].shape[1] - 256))
    crop = np.ascontiguousarray(r["image"][y0:y0 + 256, x0:x0 + 256])
    p_old = Segmenter(model, meta, device="cpu", engine="torch").forward(crop[None])["prob"][0]
    p_new = Segmenter(new, meta2, device="cpu", engine="torch").forward(crop[None])["prob"][0]
    assert (p_new <= p_old + 1e-5).all(), np.abs(p_new - p_old).max()
    assert not (tmp_path / "g.pt.run").exists()


def test_fg_gate_needs_negatives(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", "--data", str(tmp_path), "--init", "default",
                        "--fg-gate", "-o", str(tmp_path / "x.pt")], capture_output=True, text=True)
    assert r.returncode != 0
    assert "--fg-gate needs --init" in r.stderr and "Traceback" not in r.stderr
