"""Exports: a validator written from QuPath's GeoJSON reader rules, round trips, determinism."""

from __future__ import annotations

import gzip
import io
import json
import math
import uuid

import geopandas
import numpy as np
import pyarrow.parquet as pq
import pytest
import shapely
from skimage.draw import ellipse

from pipeline import export
from pipeline.errors import OutputError
from pipeline.measure import MEASUREMENT_COLUMNS, QUPATH_NAMES
from pipeline.stitch import assign_ids, extract_chunk_instances, resolve_duplicates

SCALE = (2.0, 2.0)


def validate_qupath_geojson(data: bytes):
    """QuPath 0.4-0.6 reader rules (QuPathTypeAdapters.java, ROITypeAdapters.java; docs/outputs.md)."""
    text = data.decode("utf-8")  # UTF-8 required (qupath#1174)
    doc = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-finite constant {c}"))
    assert doc["type"] == "FeatureCollection" and isinstance(doc["features"], list)
    ids = set()
    for f in doc["features"]:
        assert f["type"] == "Feature"
        ids.add(str(uuid.UUID(f["id"])))  # must parse with UUID.fromString
        geom = f["geometry"]
        assert geom["type"] == "Polygon"
        for ring in geom["coordinates"]:
            assert len(ring) >= 4 and ring[0] == ring[-1]  # closed
            for x, y in ring:
                assert round(x, 2) == x and round(y, 2) == y
        g = shapely.geometry.shape(geom)
        assert shapely.is_valid(shapely.set_precision(g, 0.01))  # QuPath 0.6 precision reduction
        props = f["properties"]
        assert props["objectType"] in ("detection", "cell")  # otherwise: annotation fallback
        if props["objectType"] == "cell":  # QuPath reads the nucleus only for cells, as a Feature member
            assert "nucleusGeometry" not in props
            nuc = f["nucleusGeometry"]
            assert nuc["type"] == "Polygon"
            for ring in nuc["coordinates"]:
                assert len(ring) >= 4 and ring[0] == ring[-1]
                for x, y in ring:
                    assert round(x, 2) == x and round(y, 2) == y
            n = shapely.geometry.shape(nuc)
            assert shapely.is_valid(shapely.set_precision(n, 0.01))
            assert shapely.area(shapely.difference(n, g)) < 0.1  # the nucleus lies inside its cell
        else:
            assert "nucleusGeometry" not in f
        cls = props["classification"]
        assert isinstance(cls["name"], str) and len(cls["color"]) == 3
        meas = props["measurements"]
        assert isinstance(meas, dict)  # flat map (v0.4+)
        for k, v in meas.items():
            assert isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
            assert math.isfinite(v)  # QuPath 0.4: NaN breaks the import (qupath#1293)
    assert len(ids) == len(doc["features"])
    return doc


@pytest.fixture(scope="module")
def nuclei():
    shape = (160, 150)
    rng = np.random.default_rng(1)
    labels = np.zeros(shape, np.uint32)
    k = 0
    for _ in range(120):
        rr, cc = ellipse(rng.uniform(0, 160), rng.uniform(0, 150), rng.uniform(4, 8), rng.uniform(4, 8),
                         shape=shape, rotation=rng.uniform(0, 3))
        if len(rr) < 20 or labels[rr, cc].any():
            continue
        k += 1
        labels[rr, cc] = k
    labels[5, 5] = k + 1  # one-pixel nucleus: its OD std dev is NaN and must be omitted
    rgb = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
    t = extract_chunk_instances(labels, rng.uniform(0, 1, k + 1).astype(np.float32), rgb, window_origin_rc=(0, 0),
                                core_box_rc=(0, 0) + shape, store_shape_rc=shape, mpp=0.5, eps_px=3.0,
                                min_area_um2=0.0, chunk_rc=(0, 0))
    return assign_ids(resolve_duplicates(t, mpp=0.5))


def test_geojson_follows_qupath_reader_rules(nuclei, tmp_path):
    path = tmp_path / "s.geojson.gz"
    export.write_geojson(nuclei, path, scale_xy_l0=SCALE, slide_key="abc")
    raw = path.read_bytes()
    assert raw[:2] == b"\x1f\x8b" and raw[4:8] == b"\0\0\0\0"  # gzip, mtime 0
    data = gzip.decompress(raw)
    doc = validate_qupath_geojson(data)
    assert len(doc["features"]) == nuclei.num_rows
    assert "µm".encode() in data and b"\\u00b5" not in data
    f0 = doc["features"][0]
    assert f0["id"] == str(uuid.uuid5(export.NUCLEUS_NAMESPACE, "abc/1"))
    assert f0["properties"]["classification"]["name"] == "Nucleus"
    m = f0["properties"]["measurements"]
    assert set(m) <= set(QUPATH_NAMES.values()) and "Area µm^2" in m and "Detection probability" in m
    # level-0 geometry = store geometry scaled by 2
    g_store = shapely.from_wkb(nuclei["geometry"][0].as_py())
    g_l0 = shapely.geometry.shape(f0["geometry"])
    assert abs(g_l0.area - 4 * g_store.area) < 1e-6 * g_l0.area + 1e-3
    # the one-pixel nucleus: std dev omitted, not NaN
    stds = [f["properties"]["measurements"].get("Hematoxylin OD std dev") for f in doc["features"]]
    assert None in stds


def test_geojson_is_read_by_geopandas(nuclei, tmp_path):
    path = tmp_path / "s.geojson.gz"
    export.write_geojson(nuclei, path, scale_xy_l0=SCALE, slide_key="abc")
    gdf = geopandas.read_file(io.BytesIO(gzip.decompress(path.read_bytes())))
    assert len(gdf) == nuclei.num_rows
    assert (gdf.geometry.geom_type == "Polygon").all()


def test_plain_geojson_and_determinism(nuclei, tmp_path):
    a, b, c = tmp_path / "a.geojson.gz", tmp_path / "b.geojson.gz", tmp_path / "c.geojson"
    export.write_geojson(nuclei, a, scale_xy_l0=SCALE, slide_key="abc")
    export.write_geojson(nuclei, b, scale_xy_l0=SCALE, slide_key="abc")
    export.write_geojson(nuclei, c, scale_xy_l0=SCALE, slide_key="abc", gz=False)
    assert a.read_bytes() == b.read_bytes()
    assert gzip.decompress(a.read_bytes()) == c.read_bytes()
    assert not list(tmp_path.glob("*.tmp-*"))


def test_geoparquet_round_trip_and_determinism(nuclei, tmp_path):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    export.write_geoparquet(nuclei, a, scale_xy_l0=SCALE, slide_key="abc")
    export.write_geoparquet(nuclei, b, scale_xy_l0=SCALE, slide_key="abc")
    assert a.read_bytes() == b.read_bytes()
    gdf = geopandas.read_parquet(a)
    assert len(gdf) == nuclei.num_rows and gdf.crs is None
    assert gdf["nucleus_id"].tolist() == list(range(1, nuclei.num_rows + 1))
    assert gdf["uuid"].iloc[0] == str(uuid.uuid5(export.NUCLEUS_NAMESPACE, "abc/1"))
    assert set(MEASUREMENT_COLUMNS) <= set(gdf.columns)
    assert shapely.is_valid(gdf.geometry.values).all()
    np.testing.assert_allclose(gdf.geometry.area.to_numpy(), 4 * shapely.area(shapely.from_wkb(
        nuclei["geometry"].to_numpy(zero_copy_only=False))), rtol=1e-3)
    meta = json.loads(pq.read_schema(a).metadata[b"cellsam"])
    assert meta["schema_version"] == export.SCHEMA_VERSION


def test_empty_table_gives_valid_empty_outputs(nuclei, tmp_path):
    empty = nuclei.slice(0, 0)
    export.write_geojson(empty, tmp_path / "e.geojson.gz", scale_xy_l0=SCALE, slide_key="abc")
    doc = validate_qupath_geojson(gzip.decompress((tmp_path / "e.geojson.gz").read_bytes()))
    assert doc["features"] == []
    export.write_geoparquet(empty, tmp_path / "e.parquet", scale_xy_l0=SCALE, slide_key="abc")
    gdf = geopandas.read_parquet(tmp_path / "e.parquet")
    assert len(gdf) == 0 and "geometry" in gdf.columns


def test_write_json_atomic(tmp_path):
    p = tmp_path / "s.json"
    export.write_json_atomic({"b": 1, "a": None, "µ": [1.5]}, p)
    text = p.read_text(encoding="utf-8")
    assert text.index('"a"') < text.index('"b"') and json.loads(text)["a"] is None and "µ" in text
    with pytest.raises(OutputError, match="s2.json"):
        export.write_json_atomic({"x": float("nan")}, tmp_path / "s2.json")
    assert not (tmp_path / "s2.json").exists()
    with pytest.raises(OutputError, match="cannot write"):
        export.write_json_atomic({}, tmp_path / "missing-dir" / "s.json")


def test_nucleus_uuid_is_uuid5():
    for key, i in [("abc", 1), ("µ-slide", 123456789), ("", 0)]:
        assert export.nucleus_uuid(key, i) == str(uuid.uuid5(export.NUCLEUS_NAMESPACE, f"{key}/{i}"))


def test_fixed_point_text_parses_to_the_rounded_value():
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.normal(0, 1, 2000) * 10.0 ** rng.integers(-6, 9, 2000), [0.0, -0.0, -0.00004, 0.00005,
                        1e-12, 123456.00005, 99999.99995, -7.5, 1.0, 10.0, 100.0, 2.675, 1.005]])
    for decimals in (2, 4):
        chars, valid = export._fixed_point(v, decimals)
        rows = [bytes(c[m]).decode() for c, m in zip(chars, valid)]
        assert [float(t) for t in rows] == np.round(v, decimals).tolist()
        assert all("e" not in t and not t.endswith(".") and not (t.endswith("0") and "." in t) for t in rows)
        assert "-0" not in rows and all(not t.startswith("00") for t in rows)


@pytest.mark.parametrize("scale", [2.0, 1.0020040080160322])
def test_vectorised_features_equal_json_dumps_reference(nuclei, scale):
    import pyarrow as pa

    from pipeline import geometry

    g = nuclei["geometry"].to_pylist()
    g[0] = shapely.to_wkb(shapely.box(10, 20, 20, 30).difference(shapely.box(12, 22, 14, 24)))  # hole
    g[1] = shapely.to_wkb(shapely.Polygon())  # empty: skipped
    g[2] = shapely.to_wkb(shapely.box(0, 0, 3, 3).reverse())  # clockwise: reoriented
    for table in (nuclei, nuclei.set_column(nuclei.schema.get_field_index("geometry"), "geometry",
                                            pa.array(g, pa.binary()))):
        cols = export._measurement_columns(table)
        kw = dict(scale_xy_l0=(scale, scale), offset_xy_l0=(0.0, 0.0), slide_key="abc", cols=cols)
        fast, n = export._features(table, **kw)
        values = np.column_stack([table[c].to_numpy().astype(np.float64) for c in cols])
        polys = export.to_level0(geometry.from_wkb(table["geometry"]), (scale, scale))
        ref, n_ref = export._features_json(table, polys, values, np.isfinite(values), table["nucleus_id"].to_numpy(),
                                           slide_key="abc", cols=cols)
        assert n == n_ref > 40
        assert json.loads(b"[" + fast + b"]") == json.loads(b"[" + ref + b"]")
        assert fast.count(b"\n") == n - 1  # one Feature per line
