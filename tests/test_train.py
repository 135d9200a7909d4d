"""Training: a few iterations on real shared tiles, resume from the checkpoint, fine-tune with --init."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.errors import ModelError
from pipeline.model.checkpoint import DEFAULT_WEIGHTS, read_checkpoint
from pipeline.training.train import train

from conftest import shared_file

TINY = TrainConfig(epochs=2, iters_per_epoch=2, batch_size=2, crop_px=96, warmup_iters=1, threads=1, log_every=0)


@pytest.fixture
def user_data(tmp_path):
    """Two real CPM-15 tiles laid out as a user annotation folder (images/, labels/, mpp.txt)."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for name in ("image01", "image02"):
        shutil.copy(shared_file(f"nuclei/cpm15/images/{name}.png"), root / "images" / f"{name}.png")
        shutil.copy(shared_file(f"nuclei/cpm15/labels/{name}.tif"), root / "labels" / f"{name}.tif")
    (root / "mpp.txt").write_text("0.5\n")
    return root


def _log_rows(out):
    with open(out.with_name(out.name + ".run") / "log.csv") as fh:
        return list(csv.DictReader(fh))


def test_train_then_resume(user_data, tmp_path):
    out = tmp_path / "m.pt"
    # first run stops after epoch 0 (as if interrupted), the second resumes at epoch 1
    train(str(user_data), out, cfg=TrainConfig(**{**TINY.__dict__, "epochs": 1}), tune=False)
    rows = _log_rows(out)
    assert [r["epoch"] for r in rows] == ["0"]
    last = read_checkpoint(out.with_name(out.name + ".run") / "last.pt")  # weights_only=True
    assert int(last["epoch"]) == 0 and "optimizer" in last
    meta = train(str(user_data), out, cfg=TINY, tune=False)
    rows = _log_rows(out)
    assert [r["epoch"] for r in rows] == ["0", "1"], "resumed run must continue at epoch 1, not restart"
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    ck = read_checkpoint(out)
    assert ck["metadata"]["mpp"] == TINY.mpp and meta["mpp"] == TINY.mpp
    assert ck["metadata"]["postprocess"]["fg_threshold"] > 0


def test_grown_ema_run_resumes_and_outputs_the_average(user_data, tmp_path):
    out = tmp_path / "g.pt"
    cfg = TrainConfig(**{**TINY.__dict__, "epochs": 1, "grow_depth": 1, "ema": 0.5})
    train(str(user_data), out, cfg=cfg, tune=False)
    run = out.with_name(out.name + ".run")
    first = read_checkpoint(run / "last.pt")
    assert first["arch"]["student"]["depths"] == [1, 3, 4, 4] and "ema_state_dict" in first
    train(str(user_data), out, cfg=TrainConfig(**{**cfg.__dict__, "epochs": 2}), tune=False)
    assert [r["epoch"] for r in _log_rows(out)] == ["0", "1"]
    last, final = read_checkpoint(run / "last.pt"), read_checkpoint(out)
    k = "decoder.head.weight"
    # no validation split in a user folder: the output is the weight average, not the last step
    torch.testing.assert_close(final["state_dict"][k], last["ema_state_dict"][k])
    assert not torch.equal(final["state_dict"][k], last["state_dict"][k])
    # the average kept moving in the resumed epoch
    assert not torch.equal(last["ema_state_dict"][k], first["ema_state_dict"][k])


def test_finetune_from_shipped_model(user_data, tmp_path):
    if not DEFAULT_WEIGHTS.exists():
        pytest.skip("shipped weights not present")
    out = tmp_path / "ft.pt"
    cmd = [sys.executable, "-m", "pipeline.cli", "--quiet", "train", "--data", str(user_data), "--out", str(out),
           "--init", "default", "--epochs", "1", "--iters-per-epoch", "2", "--batch-size", "2", "--crop-px", "96",
           "--threads", "1", "--no-tune"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    ck = read_checkpoint(out)
    base = read_checkpoint(DEFAULT_WEIGHTS)
    assert ck["metadata"]["init"].endswith("cellsam_default.pt")
    # fine-tuning starts from the shipped weights: parameters moved only a little
    k = "student.stem.0.0.weight"
    diff = (ck["state_dict"][k] - base["state_dict"][k]).abs().max().item()
    assert 0 < diff < 0.1
    # the shipped decoding thresholds are carried over
    assert ck["metadata"]["postprocess"] == base["metadata"]["postprocess"]


def test_unsafe_checkpoint_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "evil.pt"
    torch.save({"format": "cellsam-checkpoint", "payload": Evil()}, bad)
    with pytest.raises(ModelError, match="unsafe"):
        read_checkpoint(bad)
