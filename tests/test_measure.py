"""Measurements: known shapes, hand-computed optical densities, the summary."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pytest
import shapely
import shapely.affinity
from skimage.draw import disk

from pipeline import geometry, measure


def test_circle_shape_measurements():
    r_px, mpp = 40, 0.5
    labels = np.zeros((200, 200), np.uint32)
    rr, cc = disk((100, 100), r_px)
    labels[rr, cc] = 1
    _, polys = geometry.labels_to_polygons(labels)
    m = {k: float(v[0]) for k, v in measure.shape_measurements(polys, mpp).items()}
    r_um = r_px * mpp
    assert m["area_um2"] == pytest.approx(math.pi * r_um**2, rel=0.01)
    assert m["perimeter_um"] == pytest.approx(2 * math.pi * r_um, rel=0.04)
    assert 0.95 <= m["circularity"] <= 1.0
    assert m["solidity"] == pytest.approx(1.0, abs=0.01)
    for k in ("max_diameter_um", "max_caliper_um", "min_diameter_um"):
        assert m[k] == pytest.approx(2 * r_um, rel=0.02), k
    assert m["eccentricity"] < 0.05
    assert m["centroid_x_um"] == pytest.approx(100.5 * mpp) and m["centroid_y_um"] == pytest.approx(100.5 * mpp)


def test_rectangle_and_ellipse_shape_measurements():
    rect = shapely.box(0, 0, 10, 2)
    ell = shapely.affinity.scale(shapely.Point(0, 0).buffer(1, quad_segs=256), 10, 5)
    m = measure.shape_measurements(np.array([rect, ell], dtype=object), 1.0)
    assert m["area_um2"][0] == 20 and m["perimeter_um"][0] == 24
    assert m["max_caliper_um"][0] == pytest.approx(math.hypot(10, 2))
    assert m["min_diameter_um"][0] == pytest.approx(2)
    assert m["max_diameter_um"][0] == pytest.approx(math.hypot(10, 2))  # bounding circle
    assert m["eccentricity"][1] == pytest.approx(math.sqrt(1 - 0.25), abs=1e-3)
    assert m["eccentricity"][0] == pytest.approx(math.sqrt(1 - (2 / 10) ** 2), abs=1e-9)
    assert m["circularity"][0] == pytest.approx(4 * math.pi * 20 / 24**2)


def test_od_of_known_colours_by_hand():
    # hand computation: OD_c = -log10(max(v,1)/255); [H, E, R] = OD @ inv(M), M rows = unit stain vectors
    h = np.array([0.65, 0.70, 0.29]) / math.sqrt(0.65**2 + 0.70**2 + 0.29**2)
    e = np.array([0.2159, 0.8012, 0.5581]) / math.sqrt(0.2159**2 + 0.8012**2 + 0.5581**2)
    r = np.cross(h, e)
    r /= np.linalg.norm(r)
    # a pixel made of exactly 0.5 OD hematoxylin + 0.2 OD eosin
    od = 0.5 * h + 0.2 * e
    rgb_exact = 255 * 10 ** (-od)
    rgb = np.round(rgb_exact).astype(np.uint8)
    got = measure.stain_od(rgb[None, None, :])[0, 0]
    od_rounded = -np.log10(rgb.astype(float) / 255)
    want = od_rounded @ np.linalg.inv(np.stack([h, e, r]))
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert got[0] == pytest.approx(0.5, abs=0.01) and got[1] == pytest.approx(0.2, abs=0.01)
    # white is 0 OD, black is clamped to v = 1
    assert measure.optical_density(np.array([255, 255, 0], np.uint8)).tolist() == [0.0, 0.0, math.log10(255)]


def test_intensity_statistics_per_label():
    labels = np.zeros((4, 6), np.uint32)
    labels[:, :3] = 1
    labels[:, 3:5] = 4
    rgb = np.full((4, 6, 3), 255, np.uint8)
    rgb[:2, :3] = (60, 40, 140)
    rgb[2:, :3] = (180, 120, 200)
    out = measure.intensity_measurements(labels, rgb, np.array([1, 4]))
    conc = measure.stain_od(rgb)[..., 0]
    v1 = conc[:, :3].ravel()
    assert out["hematoxylin_od_mean"][0] == pytest.approx(v1.mean())
    assert out["hematoxylin_od_std"][0] == pytest.approx(v1.std(ddof=1))
    assert out["hematoxylin_od_max"][0] == pytest.approx(v1.max())
    assert out["hematoxylin_od_min"][0] == pytest.approx(v1.min())
    assert out["hematoxylin_od_mean"][1] == pytest.approx(0.0, abs=1e-12)  # white pixels
    assert set(out) == set(measure.INTENSITY_COLUMNS)


def test_summary_values_and_empty():
    vals = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    t = pa.table({"area_um2": vals, "score": np.float32(vals / 10), "centroid_x_um": vals})
    s = measure.summarize(t, tissue_area_mm2=0.5)
    a = s["measurements"]["area_um2"]
    assert s["count"] == 5 and s["nuclei_per_mm2"] == 10.0
    assert a["mean"] == 3 and a["median"] == 3 and a["q25"] == 2 and a["q75"] == 4 and a["iqr"] == 2
    assert a["sd"] == pytest.approx(np.std(vals, ddof=1)) and a["cv"] == pytest.approx(a["sd"] / 3)
    assert "centroid_x_um" not in s["measurements"]
    empty = measure.summarize(t.slice(0, 0), tissue_area_mm2=0.0)
    assert empty["count"] == 0 and empty["nuclei_per_mm2"] is None
    assert empty["measurements"]["area_um2"]["mean"] is None
    json.dumps(empty, allow_nan=False)  # JSON null, never NaN


def test_qupath_names_cover_measurements():
    assert set(measure.MEASUREMENT_COLUMNS) | {"score"} == set(measure.QUPATH_NAMES)
    assert measure.QUPATH_NAMES["hematoxylin_od_std"] == "Hematoxylin OD std dev"
    assert measure.QUPATH_NAMES["area_um2"] == "Area µm^2"


def test_diameters_match_geos_and_brute_force():
    # nucleus-like and odd shapes: ellipses, triangles (3-point bounding circles), thin slivers
    rng = np.random.default_rng(4)
    polys = []
    for _ in range(150):
        n = int(rng.integers(3, 40))
        ang = np.sort(rng.uniform(0, 2 * np.pi, n))
        rad = rng.uniform(2, 12) * rng.uniform(0.6, 1.0, n)
        polys.append(shapely.convex_hull(shapely.MultiPoint(np.column_stack(
            [100 + rad * np.cos(ang) * rng.uniform(0.3, 1), 50 + rad * np.sin(ang)]))))
    polys += [shapely.Polygon([(0, 0), (10, 0), (5, 3)]), shapely.box(0, 0, 10, 0.01)]
    polys = np.array([p for p in polys if p.geom_type == "Polygon"], dtype=object)
    m = measure.shape_measurements(polys, 0.5)
    np.testing.assert_allclose(m["max_diameter_um"], 2 * 0.5 * shapely.minimum_bounding_radius(polys), rtol=1e-9)
    for p, mx, mn in zip(polys, m["max_caliper_um"], m["min_diameter_um"]):
        v = np.asarray(p.exterior.coords)[:-1]
        assert mx == pytest.approx(0.5 * np.max(np.hypot(*(v[:, None] - v[None]).transpose(2, 0, 1))), rel=1e-12)
        e = np.roll(v, -1, axis=0) - v
        width = [np.max(np.abs(ex * (v[:, 1] - p0[1]) - ey * (v[:, 0] - p0[0]))) / np.hypot(ex, ey)
                 for (ex, ey), p0 in zip(e, v)]
        assert mn == pytest.approx(0.5 * min(width), rel=1e-9)
