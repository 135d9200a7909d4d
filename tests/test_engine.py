"""Inference engines (pipeline.model.engine): parity with torch fp32, errors, determinism.

* Every installed (engine, precision) on a real validation tile: nucleus F1 against torch fp32 at
  IoU 0.5 >= 0.995 and AJI within 0.005 of torch fp32's (the parity budget of docs/model.md).
* The exported ONNX graph has dynamic batch, height and width: maps equal torch's at other sizes.
* On a small synthetic slide through the real CLI: same bytes on a rerun with the same engine,
  and the nuclei match torch fp32's one to one.
* A clear one-line error for an unknown engine and for a missing one (the runtime made
  unimportable in a subprocess), and ``auto`` falls back to torch when neither runtime exists.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import shapely
import torch

from conftest import REPO, shared_file
from pipeline.errors import ModelError
from pipeline.metrics import aji, object_scores
from pipeline.model import load_model
from pipeline.model.engine import available, build_engine, cpu_has_bf16, export_onnx, probe_tile

COMBOS = [("torch", "bf16"), ("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16")]
TILE = "nuclei/monuseg2018_train/images/TCGA-21-5784-01Z-00-DX1.tif"
TILE_XML = "nuclei/monuseg2018_train/annotations/TCGA-21-5784-01Z-00-DX1.xml"


def _installed(engine: str, precision: str) -> None:
    if not available(engine):
        pytest.skip(f"{engine} is not installed")
    if precision == "bf16" and engine == "openvino" and not cpu_has_bf16():
        pytest.skip("this CPU has no bf16 units")


@pytest.fixture(scope="module")
def reference():
    return load_model(device="cpu", engine="torch", precision="fp32")


@pytest.fixture(scope="module")
def real_tile():
    from pipeline.data.readers import read_image, read_monuseg_xml

    img = read_image(shared_file(TILE))
    return img, read_monuseg_xml(shared_file(TILE_XML), img.shape[:2])


@pytest.mark.parametrize("engine,precision", COMBOS)
def test_parity_on_real_tile(engine, precision, reference, real_tile):
    _installed(engine, precision)
    img, gt = real_tile
    seg = load_model(device="cpu", engine=engine, precision=precision)
    assert (seg.engine.name, seg.engine.precision) == (engine, precision)
    ref_lab = reference.segment(img, 0.25)[0]
    lab = seg.segment(img, 0.25)[0]
    assert ref_lab.max() > 300  # a dense tile: the comparison means something
    f1 = object_scores(ref_lab, lab)["obj_f1"]
    assert f1 >= 0.995, f"{engine}/{precision}: nucleus F1 vs torch fp32 {f1:.4f}"
    assert abs(aji(gt, lab) - aji(gt, ref_lab)) <= 0.005
    if precision == "fp32":  # same arithmetic up to summation order
        p_ref = reference.predict_maps(img, 0.25)[0]
        p = seg.predict_maps(img, 0.25)[0]
        assert float(np.abs(p - p_ref).max()) < 1e-3


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_dynamic_shapes_match_torch(engine, reference):
    _installed(engine, "fp32")
    eng = build_engine(reference.model, torch.device("cpu"), engine, "fp32", threads=1)
    for shape in [(1, 3, 160, 224), (2, 3, 96, 64)]:
        x = np.ascontiguousarray(np.repeat(probe_tile(max(shape[2:]))[:, :, :shape[2], :shape[3]], shape[0], 0))
        want = reference.engine.run(x)[0]
        got = eng.run(x)[0]
        assert got.shape == want.shape == (shape[0], 4, shape[2], shape[3])
        assert float(np.abs(got - want).max()) < 1e-3


def test_export_refuses_dual_mode(reference):
    import copy

    model = copy.deepcopy(reference.model)
    model.fusion = torch.nn.Identity()
    model.teacher = torch.nn.Identity()
    with pytest.raises(ModelError, match="--engine torch only"):
        export_onnx(model)


def test_unknown_engine_and_precision():
    with pytest.raises(ModelError, match="unknown engine 'tensorrt'"):
        load_model(device="cpu", engine="tensorrt")
    with pytest.raises(ModelError, match="unknown precision 'int4'"):
        load_model(device="cpu", precision="int4")
    with pytest.raises(ModelError, match="fp32 only"):
        load_model(device="cpu", engine="onnxruntime", precision="bf16")
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "predict", "x.png", "-o", "y.tif", "--engine", "tpu"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "--engine" in lines[0] and "tpu" in lines[0]


_HIDE = "import sys; [sys.modules.__setitem__(m, None) for m in ('onnxruntime', 'openvino')]; "


def test_missing_engine_one_line(tmp_path):
    """With the runtimes made unimportable: an explicit engine is a one-line error; auto runs torch."""
    import tifffile

    img = np.full((64, 64, 3), 230, np.uint8)
    tifffile.imwrite(tmp_path / "tile.tif", img)
    code = _HIDE + "from pipeline.cli import main; sys.exit(main(sys.argv[1:]))"
    res = subprocess.run([sys.executable, "-c", code, "predict", str(tmp_path / "tile.tif"), "-o",
                          str(tmp_path / "out.tif"), "--engine", "openvino"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert lines == ["cellsam: error: --engine openvino is not installed (pip install openvino)"]
    assert not (tmp_path / "out.tif").exists()
    code = _HIDE + "from pipeline.model import load_model; s = load_model(device='cpu'); print(s.engine.name)"
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "torch", res.stderr[-2000:]


def test_auto_engine_on_this_cpu():
    """``auto`` picks the measured-fastest runtime that is installed and passes the parity probe."""
    seg = load_model(device="cpu")
    if available("openvino"):
        bf16 = cpu_has_bf16()
        assert (seg.engine.name, seg.engine.precision) == ("openvino", "bf16" if bf16 else "fp32") or \
            (not bf16 and seg.engine.name == "onnxruntime")
    elif available("onnxruntime"):
        assert seg.engine.name == "onnxruntime"
    assert seg.metadata["engine"] == seg.engine.name


def _segment(slide: Path, out: Path, *extra) -> Path:
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "--quiet", "segment", str(slide), "-o", str(out),
                          "--slide-id", "s", "--chunk", "512", *extra], cwd=REPO, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def _finals(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())
            if p.is_file() and not p.name.endswith(".timings.json")}


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory):
    from pipeline.synthetic import write_synthetic_slide

    path = tmp_path_factory.mktemp("engine_slide") / "slide.tif"
    write_synthetic_slide(path, size_px=(1100, 1300), mpp=0.5, seed=3)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("engine,precision", [("onnxruntime", "fp32"), ("openvino", "bf16")])
def test_synthetic_slide_bytes_and_parity(engine, precision, small_slide, tmp_path):
    _installed(engine, precision)
    a = _segment(small_slide, tmp_path / "a", "--engine", engine, "--precision", precision)
    b = _segment(small_slide, tmp_path / "b", "--engine", engine, "--precision", precision)
    fa, fb = _finals(a), _finals(b)
    assert fa.keys() == fb.keys() and all(fa[k] == fb[k] for k in fa), "rerun with the same engine changed bytes"
    ref = _segment(small_slide, tmp_path / "ref", "--engine", "torch", "--precision", "fp32")
    ga = shapely.from_wkb(pq.read_table(a / "s.nuclei.parquet", columns=["geometry"])["geometry"].to_pylist())
    gr = shapely.from_wkb(pq.read_table(ref / "s.nuclei.parquet", columns=["geometry"])["geometry"].to_pylist())
    assert len(gr) > 80
    tree = shapely.STRtree(gr)
    pairs = tree.query(ga, predicate="intersects")
    inter = shapely.area(shapely.intersection(ga[pairs[0]], gr[pairs[1]]))
    iou = inter / (shapely.area(ga[pairs[0]]) + shapely.area(gr[pairs[1]]) - inter)
    matched = int(np.sum(iou > 0.5))
    f1 = 2 * matched / (len(ga) + len(gr))
    assert f1 >= 0.995, f"{engine}/{precision}: slide nuclei F1 vs torch fp32 {f1:.4f}"
