"""What a model that rejects removes as "not a nucleus" is exported apart, for review:
``rejected/<id>.geojson.gz`` (QuPath ``Ignore*`` detections) and ``rejected/<id>.nuclei.parquet``,
a summary block and dotted outlines in the QC crop.

The real shipped default (its patch typer rejects above 0.7) runs on a CMU-1-Small-Region crop
around the hair follicle, where the keratin lamellae are detected and removed. The key property:
rejection only flags, so the nuclei at ``--reject-threshold 1`` are exactly the kept nuclei plus the
rejected ones at the shipped threshold (same instances, same stitching)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import cmu1_crop_tiff
from test_export import validate_qupath_geojson

from pipeline.assemble import split_rejected
from pipeline.cli import main

SID = "cmu_follicle"
CROP_L0 = (1100, 600, 1024, 1024)  # x, y, width, height (level-0 px): the follicle's keratin and its epithelium


def test_split_rejected_renumbers_both_sets_in_order():
    strips = [
        pa.table({"nucleus_id": pa.array([1, 2, 3], pa.int64()), "rejected": [False, True, False], "v": [10, 11, 12]}),
        pa.table({"nucleus_id": pa.array([4, 5], pa.int64()), "rejected": [True, True], "v": [13, 14]}),
        pa.table({"nucleus_id": pa.array([6], pa.int64()), "rejected": [False], "v": [15]}),
    ]
    got = []
    kept = list(split_rejected(strips, got.append))
    assert [t["nucleus_id"].to_pylist() for t in kept] == [[1, 2], [3]]  # the all-rejected strip yields nothing
    assert [t["v"].to_pylist() for t in kept] == [[10, 12], [15]]
    assert [t["nucleus_id"].to_pylist() for t in got] == [[1], [2, 3]]
    assert [t["v"].to_pylist() for t in got] == [[11], [13, 14]]
    assert all("rejected" not in t.column_names for t in kept + got)
    # the UUIDs derive from the id before the split
    assert [t["instance_id"].to_pylist() for t in kept] == [[1, 3], [6]]
    assert [t["instance_id"].to_pylist() for t in got] == [[2], [4, 5]]
    # a threshold re-flags from the probabilities, whatever the stored flag
    strips = [t.append_column("not_nucleus_prob", pa.array(p, pa.float32()))
              for t, p in zip(strips, ([0.1, 0.95, 0.8], [0.5, 0.99], [0.2]))]
    got = []
    kept = list(split_rejected(strips, got.append, threshold=0.9))
    assert [t["v"].to_pylist() for t in kept] == [[10, 12], [13], [15]]
    assert [t["v"].to_pylist() for t in got] == [[11], [14]]


@pytest.fixture(scope="module")
def follicle(tmp_path_factory) -> Path:
    return cmu1_crop_tiff(tmp_path_factory.mktemp("follicle") / f"{SID}.tif", CROP_L0)[0]


@pytest.fixture(scope="module")
def runs(follicle, tmp_path_factory):
    out = {}
    for name, extra in (("shipped", []), ("keep_all", ["--reject-threshold", "1"])):
        d = tmp_path_factory.mktemp(name)
        assert main(["--quiet", "segment", str(follicle), "-o", str(d), "--chunk", "512", *extra]) == 0
        out[name] = d
    return out


def _table(path):
    return pq.read_table(path)


def _summary(d):
    return json.loads((d / f"{SID}.summary.json").read_text())


def test_rejected_outputs_are_written_counted_and_readable_by_qupath(runs):
    d = runs["shipped"]
    s = _summary(d)
    rej = _table(d / "rejected" / f"{SID}.nuclei.parquet")
    kept = _table(d / f"{SID}.nuclei.parquet")
    assert s["rejected"]["count"] == rej.num_rows >= 50  # the keratin lamellae
    assert s["rejected"]["threshold"] == pytest.approx(0.7)
    assert s["rejected"]["fraction"] == pytest.approx(rej.num_rows / (rej.num_rows + kept.num_rows), abs=1e-6)
    assert s["outputs"]["rejected_geojson_gz"] == f"rejected/{SID}.geojson.gz"
    assert s["nuclei"] == kept.num_rows >= 100
    # the flag follows the threshold; both tables carry the probability
    assert rej["not_nucleus_prob"].to_numpy().min() > 0.7
    assert kept["not_nucleus_prob"].to_numpy().max() <= 0.7
    assert rej["nucleus_id"].to_pylist() == list(range(1, rej.num_rows + 1))
    assert kept["nucleus_id"].to_pylist() == list(range(1, kept.num_rows + 1))
    doc = validate_qupath_geojson(gzip.open(d / "rejected" / f"{SID}.geojson.gz").read())
    feats = doc["features"]
    assert len(feats) == rej.num_rows
    assert {json.dumps(f["properties"]["classification"]) for f in feats} == {
        json.dumps({"name": "Ignore*", "color": [180, 180, 180]})}
    assert all("Not-a-nucleus probability" in f["properties"]["measurements"] for f in feats)
    nuc = validate_qupath_geojson(gzip.open(d / f"{SID}.geojson.gz").read())["features"]
    assert "Not-a-nucleus probability" in nuc[0]["properties"]["measurements"]
    # their UUIDs never collide with the nuclei's (QuPath would merge or drop objects)
    assert not {f["id"] for f in feats} & {f["id"] for f in nuc}
    assert set(rej["uuid"].to_pylist()) == {f["id"] for f in feats}


def test_rejection_only_flags_kept_plus_rejected_equals_keep_all(runs):
    """Same instances, same stitching: the nuclei kept at 1 are the kept + rejected at 0.7."""
    import shapely

    from pipeline import geometry

    def polys(path):  # (outline, UUID) of every row
        t = _table(path)
        return sorted(zip(shapely.to_wkt(geometry.from_wkb(t["geometry"]), rounding_precision=2).tolist(),
                          t["uuid"].to_pylist()))

    d = runs["shipped"]
    both = sorted(polys(d / f"{SID}.nuclei.parquet") + polys(d / "rejected" / f"{SID}.nuclei.parquet"))
    everything = polys(runs["keep_all"] / f"{SID}.nuclei.parquet")
    assert both == everything  # the same objects, each with the same UUID whatever the threshold
    s = _summary(runs["keep_all"])
    assert s["rejected"]["count"] == 0 and s["rejected"]["threshold"] == 1.0


def test_qc_crop_shows_rejected_outlines_dotted(runs):
    from PIL import Image

    from pipeline.qc import PANEL_PX, REJECTED_RGB, TITLE_PX

    img = np.asarray(Image.open(runs["shipped"] / f"{SID}.qc.png").convert("RGB"))
    assert img.shape[1] == 3 * PANEL_PX  # the crop's chunk is where most was removed: no fourth panel
    crop = img[TITLE_PX:TITLE_PX + PANEL_PX, 2 * PANEL_PX:]
    shipped = (crop == REJECTED_RGB).all(axis=2).sum()
    img1 = np.asarray(Image.open(runs["keep_all"] / f"{SID}.qc.png").convert("RGB"))
    keep_all = (img1[TITLE_PX:TITLE_PX + PANEL_PX, 2 * PANEL_PX:] == REJECTED_RGB).all(axis=2).sum()
    assert shipped > 500 and shipped > 20 * max(keep_all, 1)
    key = img[TITLE_PX + PANEL_PX:TITLE_PX + PANEL_PX + 30, 2 * PANEL_PX:]
    assert (key == REJECTED_RGB).all(axis=2).any()  # the legend has the entry


def test_many_removed_is_a_one_line_warning(runs, tmp_path, caplog):
    """Half of the follicle crop's detections are keratin: the export says to review rejected/."""
    import logging

    d = runs["shipped"]
    store, work = d / ".work" / SID / "store.ome.zarr", d / ".work" / SID / "chunks"
    with caplog.at_level(logging.WARNING, logger="pipeline.segment"):
        assert main(["--quiet", "export", str(store), str(work), "-o", str(tmp_path / "e")]) == 0
    lines = [r.getMessage() for r in caplog.records if "removed as not nuclei" in r.getMessage()]
    assert len(lines) == 1 and "rejected" in lines[0] and "\n" not in lines[0]
    assert _summary(tmp_path / "e")["rejected"]["fraction"] > 0.2


def test_changing_the_threshold_re_exports_from_the_same_chunks(follicle, runs, tmp_path):
    """``segment --reject-threshold 1`` on a finished run reuses its chunk files (no second
    inference) and writes what a fresh run at 1 writes; ``export --reject-threshold`` too."""
    import shutil

    d = tmp_path / "out"
    shutil.copytree(runs["shipped"], d)
    chunks = sorted((d / ".work" / SID / "chunks").glob("*.parquet"))
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in chunks}
    assert main(["--quiet", "segment", str(follicle), "-o", str(d), "--chunk", "512", "--reject-threshold", "1"]) == 0
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in chunks} == before  # not recomputed
    for name in (f"{SID}.nuclei.parquet", f"{SID}.geojson.gz", f"rejected/{SID}.nuclei.parquet", f"{SID}.summary.json"):
        assert (d / name).read_bytes() == (runs["keep_all"] / name).read_bytes(), name
    store, work = d / ".work" / SID / "store.ome.zarr", d / ".work" / SID / "chunks"
    assert main(["--quiet", "export", str(store), str(work), "-o", str(tmp_path / "e"), "--reject-threshold", "0.9"]) == 0
    s = _summary(tmp_path / "e")
    n0 = _summary(runs["shipped"])
    assert s["rejected"]["threshold"] == 0.9
    assert s["nuclei"] + s["rejected"]["count"] == n0["nuclei"] + n0["rejected"]["count"]
    assert 0 < s["rejected"]["count"] < n0["rejected"]["count"]  # a stricter bar removes fewer
    assert _table(tmp_path / "e" / "rejected" / f"{SID}.nuclei.parquet")["not_nucleus_prob"].to_numpy().min() > 0.9


def test_model_without_rejection_writes_no_rejected_outputs(follicle, runs, tmp_path):
    """Rerun into the same folder with a model that does not reject: the earlier rejected files go."""
    import shutil

    d = tmp_path / "out"
    shutil.copytree(runs["shipped"], d)
    assert (d / "rejected" / f"{SID}.geojson.gz").exists()
    assert main(["--quiet", "segment", str(follicle), "-o", str(d), "--chunk", "512", "--model", "classical"]) == 0
    s = _summary(d)
    assert s["rejected"] is None and s["outputs"]["rejected_parquet"] is None
    assert not (d / "rejected" / f"{SID}.geojson.gz").exists() and not (d / "rejected" / f"{SID}.nuclei.parquet").exists()
    assert "not_nucleus_prob" not in pq.read_schema(d / f"{SID}.nuclei.parquet").names
