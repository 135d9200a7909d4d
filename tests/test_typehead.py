"""Nucleus type head (pipeline.model.typehead): the shipped checkpoint's head on real crchisto tiles."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import shared_file
from pipeline.data.classes import ClassVocabulary, read_point_csv
from pipeline.data.readers import read_image
from pipeline.model.checkpoint import DEFAULT_WEIGHTS, read_checkpoint
from pipeline.training.typehead import CRCHISTO_MPP, CRCHISTO_VAL_TILES, score_tiles, tile_examples

CLASSES = ["Epithelial", "Inflammatory", "Fibroblast", "Other"]
# measured on img1 + img7 (held out, shipped head): weighted type F1 0.492, detection F1 0.699
WEIGHTED_F1_FLOOR = 0.44
DETECTION_F1_FLOOR = 0.65


@pytest.fixture(scope="module")
def seg():
    from pipeline.model import load_model

    return load_model(device="cpu")


def _tile(name):
    img = read_image(shared_file(f"nuclei/crchisto/images/{name}.png"))
    pts = read_point_csv(shared_file(f"nuclei/crchisto/points/{name}.csv"))
    return img, pts


def test_shipped_checkpoint_carries_the_head():
    obj = torch.load(DEFAULT_WEIGHTS, map_location="cpu", weights_only=True)
    assert obj["arch"]["type_head"]["classes"] == CLASSES
    assert any(k.startswith("type_head.") for k in obj["state_dict"])
    assert obj["metadata"]["classes"] == CLASSES
    assert set(obj["metadata"]["metrics"]["crchisto_val"]["tiles"]) == set(CRCHISTO_VAL_TILES)


def test_segment_returns_class_probabilities(seg):
    assert seg.class_names == CLASSES and seg.metadata["classes"] == CLASSES
    img, _ = _tile("img1")
    labels, scores, probs = seg.segment(img, CRCHISTO_MPP)
    k = int(labels.max())
    assert k > 20 and scores.shape == (k,) and probs.shape == (k, 4) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    assert set(np.unique(labels)) == set(range(k + 1))
    batch = seg.segment_batch(np.ascontiguousarray(img[:256, :256])[None])
    assert len(batch[0]) == 3 and batch[0][2].shape == (int(batch[0][0].max()), 4)


def test_type_f1_on_held_out_tiles(seg):
    vocab = ClassVocabulary.crchisto()
    examples = []
    for name in ("img1", "img7"):
        assert name in CRCHISTO_VAL_TILES
        img, pts = _tile(name)
        examples.append(tile_examples(seg, name, img, pts.xy_px, pts.encode(vocab), CRCHISTO_MPP,
                                      groups=seg.type_head.groups))
    s = score_tiles(seg.type_head, examples, 4, seg.type_head.cfg.get("reject_threshold"))
    assert s["f1"] >= DETECTION_F1_FLOOR, s["f1"]
    assert s["weighted_f1"] >= WEIGHTED_F1_FLOOR, s["weighted_f1"]


def test_model_without_head_keeps_two_tuples(tmp_path):
    from pipeline.model import load_model

    obj = read_checkpoint(DEFAULT_WEIGHTS)
    obj["arch"].pop("type_head")
    obj["arch"].pop("patch_typer", None)  # a model that does not type at all
    obj["state_dict"] = {k: v for k, v in obj["state_dict"].items() if not k.startswith(("type_head.", "patch_typer."))}
    path = tmp_path / "nohead.pt"
    torch.save(obj, path)
    s = load_model(path, device="cpu", engine="torch")
    assert s.class_names == [] and s.metadata["classes"] == []
    img, _ = _tile("img1")
    assert len(s.segment(img, CRCHISTO_MPP)) == 2
    out = tmp_path / "o.tif"
    subprocess.run([sys.executable, "-m", "pipeline.cli", "predict", str(shared_file("nuclei/crchisto/images/img1.png")),
                    "--mpp", "0.55", "--model", str(path), "-o", str(out)], check=True, capture_output=True)
    lines = (tmp_path / "o.nuclei.csv").read_text().splitlines()
    assert lines[0] == "label,centroid_x_px,centroid_y_px,area_px,score,class"
    assert all(ln.endswith(",Nucleus") for ln in lines[1:]) and len(lines) > 20


def test_predict_writes_nuclei_csv_with_classes(tmp_path):
    import tifffile

    out = tmp_path / "img1.tif"
    subprocess.run([sys.executable, "-m", "pipeline.cli", "predict", str(shared_file("nuclei/crchisto/images/img1.png")),
                    "--mpp", "0.55", "-o", str(out)], check=True, capture_output=True)
    labels = tifffile.imread(out)
    lines = (tmp_path / "img1.nuclei.csv").read_text().splitlines()
    assert lines[0].split(",") == ["label", "centroid_x_px", "centroid_y_px", "area_px", "score", "class",
                                   *[f"p_{c}" for c in CLASSES], "not_nucleus_prob"]  # the default rejects
    assert len(lines) - 1 == int(labels.max())
    row = lines[1].split(",")
    assert row[5] in CLASSES and abs(sum(float(v) for v in row[6:6 + len(CLASSES)]) - 1) < 1e-3
    assert all(float(ln.split(",")[-1]) <= 0.7 for ln in lines[1:])  # kept: at most the shipped threshold
    assert int(row[3]) == int((labels == 1).sum())
