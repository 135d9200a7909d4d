"""User classes (`cellsam train-types`, pipeline.training.user_classes): a new type head with made-up
class names fitted from a small QuPath GeoJSON on real crchisto tiles, and its outputs."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import shared_file
from pipeline.model.checkpoint import DEFAULT_WEIGHTS, read_checkpoint

NAMES = ["Gland cell", "Stroma cell"]
TILES = ["img6", "img9"]  # both have epithelial and other typed nuclei


def _to_user(cls):
    """crchisto class -> made-up user class (None: unlabelled, exported without a classification)."""
    return None if cls == "unlabelled" else ("Gland cell" if cls == "epithelial" else "Stroma cell")


def _write_geojson(path, points_csv, polygon_every=7):
    """A QuPath-style FeatureCollection of the tile's points: Point annotations/detections, and every
    ``polygon_every``-th typed point as a small square Polygon detection."""
    feats = []
    with open(points_csv, newline="") as fh:
        for k, row in enumerate(csv.DictReader(fh)):
            x, y, name = float(row["x_px"]), float(row["y_px"]), _to_user(row["class"])
            props = {"objectType": "annotation" if k % 2 else "detection"}
            if name is not None:
                props["classification"] = {"name": name, "color": [0, 0, 255]}
            if name is not None and k % polygon_every == 0:
                ring = [[x - 4, y - 4], [x + 4, y - 4], [x + 4, y + 4], [x - 4, y + 4], [x - 4, y - 4]]
                geom = {"type": "Polygon", "coordinates": [ring]}
            else:
                geom = {"type": "Point", "coordinates": [x, y]}
            feats.append({"type": "Feature", "id": f"f{k}", "geometry": geom, "properties": props})
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("user_data")
    for t in TILES:
        shutil.copy(shared_file(f"nuclei/crchisto/images/{t}.png"), d / f"{t}.png")
        _write_geojson(d / f"{t}.geojson", shared_file(f"nuclei/crchisto/points/{t}.csv"))
    return d


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("user_ckpt") / "user.pt"
    r = _cli("train-types", "--data", data_dir, "--mpp", "0.55", "--init", "default", "-o", ckpt)
    assert r.returncode == 0, r.stderr
    assert "Gland cell" in r.stdout and "Stroma cell" in r.stdout
    return ckpt


def test_checkpoint_has_new_head_and_unchanged_network(trained):
    new, old = read_checkpoint(trained), read_checkpoint(DEFAULT_WEIGHTS)
    assert new["arch"]["type_head"]["classes"] == NAMES
    assert new["metadata"]["classes"] == NAMES
    # colours from ClassVocabulary rules: neither is a QuPath standard class -> first two palette colours
    assert new["arch"]["type_head"]["colors"] == [[31, 119, 180], [255, 127, 14]]
    assert new["metadata"]["postprocess"] == old["metadata"]["postprocess"]
    counts = new["metadata"]["type_head"]["trained_on"]["matched_instances"]
    assert counts["Gland cell"] > 20 and counts["Stroma cell"] > 20
    # the network is unchanged; the shipped patch typer knows the CRCHisto classes only: dropped
    seg_keys = [k for k in old["state_dict"] if not k.startswith(("type_head.", "patch_typer."))]
    assert any(k.startswith("patch_typer.") for k in old["state_dict"]) and "patch_typer" not in new["arch"]
    assert seg_keys and set(seg_keys) == {k for k in new["state_dict"] if not k.startswith("type_head.")}
    assert all(np.array_equal(new["state_dict"][k].numpy(), old["state_dict"][k].numpy()) for k in seg_keys)
    assert new["state_dict"]["type_head.mlp.3.weight"].shape[0] == 2  # 2 classes, no reject output


def test_predict_writes_user_classes(trained, data_dir, tmp_path):
    out = tmp_path / "img10.tif"
    r = _cli("predict", shared_file("nuclei/crchisto/images/img10.png"), "--mpp", "0.55", "--model", trained, "-o", out)
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "img10.nuclei.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0])[5:] == ["class", "p_Gland cell", "p_Stroma cell"]
    classes = {row["class"] for row in rows}
    assert classes == set(NAMES)  # both come out on a tile with glands and stroma
    assert all(abs(float(r["p_Gland cell"]) + float(r["p_Stroma cell"]) - 1) < 1e-3 for r in rows)


def test_training_is_deterministic(trained, data_dir, tmp_path):
    again = tmp_path / "again.pt"
    assert _cli("train-types", "--data", data_dir, "--mpp", "0.55", "-o", again).returncode == 0
    a, b = read_checkpoint(trained)["state_dict"], read_checkpoint(again)["state_dict"]
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a if k.startswith("type_head."))


def _one_error_line(r):
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1, r.stderr
    return lines[0]


def test_inconsistent_class_name_is_one_line_naming_file_and_class(data_dir, tmp_path):
    d = tmp_path / "bad"
    shutil.copytree(data_dir, d)
    gj = json.loads((d / "img9.geojson").read_text())
    feat = next(f for f in gj["features"] if f["properties"].get("classification"))
    feat["properties"]["classification"]["name"] = "gland CELL"
    (d / "img9.geojson").write_text(json.dumps(gj))
    line = _one_error_line(_cli("train-types", "--data", d, "--mpp", "0.55", "-o", tmp_path / "x.pt"))
    assert "img9.geojson" in line and "'gland CELL'" in line and line.startswith("cellsam: error:")
    assert not (tmp_path / "x.pt").exists()


def test_unknown_class_name_is_one_line_naming_file_and_class(data_dir, tmp_path):
    line = _one_error_line(_cli("train-types", "--data", data_dir, "--mpp", "0.55", "--classes", "Gland cell",
                                "-o", tmp_path / "x.pt"))
    assert "geojson" in line and "unknown class 'Stroma cell'" in line
    assert not (tmp_path / "x.pt").exists()


def test_point_csv_input(tmp_path):
    d = tmp_path / "csvdata"
    (d / "points").mkdir(parents=True)
    shutil.copy(shared_file("nuclei/crchisto/images/img2.png"), d / "img2.png")
    shutil.copy(shared_file("nuclei/crchisto/points/img2.csv"), d / "points" / "img2.csv")
    r = _cli("train-types", "--data", d, "--mpp", "0.55", "-o", tmp_path / "c.pt", "--epochs", "50")
    assert r.returncode == 0, r.stderr
    assert read_checkpoint(tmp_path / "c.pt")["arch"]["type_head"]["classes"] == ["fibroblast", "inflammatory", "others"]


def test_label_type_image_pairs(tmp_path):
    """HoVer-Net/PanNuke-style input: an instance label TIFF + a per-pixel type PNG, type ids named
    by --type-names. Made-up classes by size (larger / smaller than the median nucleus), which the
    head must learn from morphology: predicted 'Large cell' nuclei are larger than 'Small cell' ones."""
    import tifffile
    from PIL import Image

    from conftest import NUCLEI
    from pipeline.data.datasets import builtin_samples

    shared_file("nuclei/monuseg2018_train")
    sample = next(s for s in builtin_samples(NUCLEI) if s.name.startswith("TCGA-18-5592"))
    img, lab = sample.load()
    img, lab = img[:512, :512], lab[:512, :512]
    d = tmp_path / "pairs"
    for sub in ("images", "labels", "types"):
        (d / sub).mkdir(parents=True)
    Image.fromarray(img).save(d / "images" / "t1.png")
    tifffile.imwrite(d / "labels" / "t1.tif", lab.astype(np.uint16))
    area = np.bincount(lab.ravel())
    ids = np.nonzero(area[1:])[0] + 1
    big = area > np.median(area[ids])
    types = np.where(lab > 0, np.where(big[lab], 1, 2), 0).astype(np.uint8)
    Image.fromarray(types).save(d / "types" / "t1.png")
    r = _cli("train-types", "--data", d, "--mpp", str(sample.mpp), "-o", tmp_path / "lt.pt", "--epochs", "200")
    assert r.returncode != 0 and "--type-names" in r.stderr  # the ids need names
    r = _cli("train-types", "--data", d, "--mpp", str(sample.mpp), "-o", tmp_path / "lt.pt", "--epochs", "200",
             "--type-names", "1=Large cell,2=Small cell")
    assert r.returncode == 0, r.stderr
    assert read_checkpoint(tmp_path / "lt.pt")["arch"]["type_head"]["classes"] == ["Large cell", "Small cell"]
    r = _cli("predict", d / "images" / "t1.png", "--mpp", str(sample.mpp), "--model", tmp_path / "lt.pt",
             "-o", tmp_path / "t1.tif")
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "t1.nuclei.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    by = {c: [float(x["area_px"]) for x in rows if x["class"] == c] for c in ("Large cell", "Small cell")}
    assert len(by["Large cell"]) > 10 and len(by["Small cell"]) > 10
    assert np.median(by["Large cell"]) > 1.3 * np.median(by["Small cell"])


def test_train_init_default_learns_the_classes_of_classified_polygons(tmp_path):
    """`cellsam train --init default` on a folder of QuPath-style classified nucleus polygons
    fine-tunes the segmentation on the masks AND fits a head for the classes found."""
    from PIL import Image
    from skimage.measure import find_contours

    from conftest import NUCLEI
    from pipeline.data.datasets import builtin_samples

    shared_file("nuclei/monuseg2018_train")
    sample = next(s for s in builtin_samples(NUCLEI) if s.name.startswith("TCGA-18-5592"))
    img, lab = sample.load()
    img, lab = img[:384, :384], lab[:384, :384]
    d = tmp_path / "qupath"
    (d / "images").mkdir(parents=True)
    (d / "labels").mkdir()
    Image.fromarray(img).save(d / "images" / "t1.png")
    (d / "mpp.txt").write_text(f"{sample.mpp}\n")
    area = np.bincount(lab.ravel())
    ids = np.nonzero(area[1:])[0] + 1
    med = np.median(area[ids])
    feats = []
    for i in ids:
        m = np.pad(lab == i, 1)
        ring = max(find_contours(m.astype(float), 0.5), key=len)[:, ::-1] - 1  # (x, y)
        if len(ring) < 4:
            continue
        coords = [[round(float(x), 2), round(float(y), 2)] for x, y in ring] + [[round(float(ring[0][0]), 2),
                                                                                 round(float(ring[0][1]), 2)]]
        name = "Large cell" if area[i] > med else "Small cell"
        feats.append({"type": "Feature", "id": f"n{i}", "geometry": {"type": "Polygon", "coordinates": [coords]},
                      "properties": {"objectType": "detection", "classification": {"name": name, "color": [255, 0, 0]}}})
    (d / "labels" / "t1.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    out = tmp_path / "ft.pt"
    r = _cli("train", "--data", d, "--init", "default", "-o", out, "--epochs", "1", "--iters-per-epoch", "2",
             "--batch-size", "2", "--crop-px", "128")
    assert r.returncode == 0, r.stderr
    assert "Large cell, Small cell" in r.stdout
    obj = read_checkpoint(out)
    assert obj["arch"]["type_head"]["classes"] == ["Large cell", "Small cell"]
    assert obj["metadata"]["type_head"]["trained_on"]["matched_instances"]["Large cell"] > 10
    r = _cli("train", "--data", d, "--init", "default", "-o", tmp_path / "nt.pt", "--epochs", "1",
             "--iters-per-epoch", "1", "--batch-size", "2", "--crop-px", "128", "--no-types")
    assert r.returncode == 0, r.stderr
    assert "type_head" not in read_checkpoint(tmp_path / "nt.pt")["arch"]
