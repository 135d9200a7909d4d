"""QuPath cells (--cell-expansion-um): Voronoi-limited expansion, no overlaps at chunk seams, QuPath reader
rules, byte-identical reruns; the pure rule on a hand-made tile."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import shapely
from test_export import validate_qupath_geojson

from pipeline import geometry
from pipeline.cells import CELL_COLUMNS, tile_cells
from pipeline.cli import main
from pipeline.errors import ConfigError
from pipeline.cells import check_reach


def _disk(cx, cy, r):
    return shapely.Point(cx, cy).buffer(r, quad_segs=16)


def test_tile_cells_split_between_neighbours_and_stay_in_tissue():
    # two nuclei 20 px apart, expansion 8 px: the cells meet half way and do not overlap
    nuclei = np.array([_disk(20.0, 20.0, 5.0), _disk(40.0, 20.0, 5.0)], dtype=object)
    tissue = np.ones((40, 70), bool)
    tissue[:, 50:] = False  # the right cell is clipped by the tissue edge
    rgb = np.full((40, 70, 3), 180, np.uint8)
    cells, values = tile_cells(nuclei, np.array([1, 2]), np.array([True, True]), expansion_px=8.0, box=(0, 0, 40, 70),
                               tissue=tissue, rgb=rgb, mpp=0.5)
    assert shapely.area(shapely.intersection(cells[0], cells[1])) == 0
    assert all(shapely.covers(cells, nuclei))
    assert shapely.bounds(cells[0])[2] <= 30.5 and shapely.bounds(cells[1])[0] >= 29.5  # split at x = 30
    assert shapely.bounds(cells[1])[2] <= 50.0  # not outside tissue
    assert shapely.bounds(cells[0])[0] <= 12.5  # grown by ~8 px where nothing competes
    assert set(values) == set(CELL_COLUMNS)
    assert np.all((values["nucleus_cell_area_ratio"] > 0.1) & (values["nucleus_cell_area_ratio"] < 1))


def test_expansion_larger_than_the_chunk_allows_is_refused():
    check_reach(1024, 96, 3, 10)
    with pytest.raises(ConfigError, match="chunk"):
        check_reach(256, 96, 3, 40)


@pytest.fixture(scope="module")
def cmu_cells(tmp_path_factory):
    from conftest import shared_file

    slide = shared_file("slides/CMU-1-Small-Region.svs")
    runs = []
    for name in ("a", "b"):
        out = tmp_path_factory.mktemp(name)
        assert main(["--quiet", "segment", str(slide), "-o", str(out), "--chunk", "512", "--cell-expansion-um", "5"]) == 0
        runs.append(out)
    return runs


def test_cmu_cells_are_valid_disjoint_and_seam_free(cmu_cells):
    out = cmu_cells[0]
    doc = validate_qupath_geojson(gzip.open(out / "CMU-1-Small-Region.geojson.gz").read())
    feats = doc["features"]
    assert len(feats) > 1000 and all(f["properties"]["objectType"] == "cell" for f in feats)
    meas = feats[0]["properties"]["measurements"]
    for name in ("Nucleus: Area µm^2", "Cell: Area µm^2", "Cell: Circularity", "Cell: Hematoxylin OD mean",
                 "Nucleus/Cell area ratio"):
        assert name in meas
    assert any("Cytoplasm: Eosin OD mean" in f["properties"]["measurements"] for f in feats)
    # GeoParquet: cell geometry column, slide id; cells never overlap, even across chunk seams
    t = pq.read_table(out / "CMU-1-Small-Region.nuclei.parquet")
    assert set(t["slide_id"].to_pylist()) == {"CMU-1-Small-Region"}
    geo = json.loads(t.schema.metadata[b"geo"])
    assert set(geo["columns"]) == {"geometry", "cell_geometry"}
    cells = geometry.from_wkb(t["cell_geometry"])
    nuclei = geometry.from_wkb(t["geometry"])
    assert shapely.is_valid(cells).all()
    assert (shapely.area(shapely.difference(nuclei, cells)) < 0.1).all()  # each nucleus inside its cell
    assert np.median(shapely.area(cells) / shapely.area(nuclei)) > 1.5  # really grown
    a, b = shapely.STRtree(cells).query(cells, predicate="intersects")
    sel = a < b
    overlap = shapely.area(shapely.intersection(cells[a[sel]], cells[b[sel]]))
    # exactly 0 in store px; snapping level-0 coordinates to QuPath's 0.01 px grid leaves slivers < 0.1 px^2
    assert sel.sum() > 1000 and overlap.max() < 0.1
    # neighbours across seams exist: touching cells owned by different store chunks
    scale = json.loads(t.schema.metadata[b"cellsam"])["scale_xy_l0"][0]
    minx, _, maxx, _ = shapely.bounds(cells).T
    seam = np.floor(minx / (512 * scale)) != np.floor(maxx / (512 * scale))
    assert seam.sum() > 20
    summary = json.loads((out / "CMU-1-Small-Region.summary.json").read_text())
    assert summary["cells"] is True and summary["parameters"]["segment"]["cell_expansion_um"] == 5.0
    assert isinstance(summary["stitch_conflicts"], int) and isinstance(summary["nuclei_dropped_implausible"], int)


def test_cmu_cells_are_byte_identical_across_runs(cmu_cells):
    a, b = cmu_cells
    names = sorted(p.name for p in a.iterdir() if p.is_file() and not p.name.endswith(".timings.json"))
    assert "CMU-1-Small-Region.geojson.gz" in names and "CMU-1-Small-Region.summary.json" in names
    names += [f"rejected/{p.name}" for p in (a / "rejected").iterdir()]  # what the default's typer removed
    assert "rejected/CMU-1-Small-Region.geojson.gz" in names
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_cmu_real_model_stitch_loses_no_owned_instance(cmu_cells):
    """With the real model and 512-px chunks (many seams), every instance a window owned is still
    covered by the final nuclei, or by the rejected instances (``rejected/``, the default's patch
    typer): dedup (conflicts included) drops only duplicates, and rejected ones get no cell."""
    import pyarrow as pa

    from pipeline.infer import list_chunk_files

    out = cmu_cells[0]
    files = list_chunk_files(out / ".work" / "CMU-1-Small-Region" / "chunks")
    cand = pa.concat_tables([pq.read_table(p) for p in files.values()])
    owned = geometry.from_wkb(cand.filter(cand["owned"])["geometry"])
    kept = pq.read_table(out / "CMU-1-Small-Region.nuclei.parquet")
    rejected = pq.read_table(out / "rejected" / "CMU-1-Small-Region.nuclei.parquet")
    assert rejected.num_rows > 500 and "cell_geometry" not in rejected.column_names
    final = geometry.from_wkb(pa.concat_arrays([kept["geometry"].combine_chunks(), rejected["geometry"].combine_chunks()]))
    scale = json.loads(kept.schema.metadata[b"cellsam"])["scale_xy_l0"]
    final = geometry.scale_translate(final, (1 / scale[0], 1 / scale[1]))
    tree = shapely.STRtree(final)
    a, b = tree.query(owned, predicate="intersects")
    covered = np.zeros(len(owned))
    np.add.at(covered, a, shapely.area(shapely.intersection(owned[a], final[b])))
    frac = covered / shapely.area(owned)
    assert len(owned) > 1000 and frac.min() > 0.5
    summary = json.loads((out / "CMU-1-Small-Region.summary.json").read_text())
    assert summary["stitch_conflicts"] >= 0


def test_cmu_qc_shows_where_most_was_removed(cmu_cells):
    """512-px chunks: the median-density crop and the chunk with most removed differ, so the QC image
    gets a fourth panel, the follicle's keratin dotted there."""
    from PIL import Image

    from pipeline.qc import PANEL_PX, REJECTED_RGB, TITLE_PX

    a = np.asarray(Image.open(cmu_cells[0] / "CMU-1-Small-Region.qc.png").convert("RGB"))
    assert a.shape[1] == 4 * PANEL_PX
    p4 = a[TITLE_PX:TITLE_PX + PANEL_PX, 3 * PANEL_PX:]
    assert (p4 == REJECTED_RGB).all(axis=2).sum() > 2000  # many removed objects outlined there
