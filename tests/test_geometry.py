"""Label images -> polygons: area, validity, one per label, touching labels do not overlap."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from skimage.draw import disk

from pipeline import geometry
from pipeline.errors import InputError


def test_disks_and_rectangles():
    labels = np.zeros((120, 140), np.uint32)
    rr, cc = disk((30, 30), 12)
    labels[rr, cc] = 1
    labels[60:80, 90:131] = 7  # rectangle, label ids need not be consecutive
    rr, cc = disk((95, 40), 5.5)
    labels[rr, cc] = 3
    ids, polys = geometry.labels_to_polygons(labels, offset_rc=(1000, 2000))
    assert ids.tolist() == [1, 3, 7] and ids.dtype == np.int64
    counts = np.bincount(labels.ravel())[ids]
    area = shapely.area(polys)
    np.testing.assert_allclose(area, counts - 0.5)  # marching squares at 0.5: n - 4 * 1/8
    assert shapely.is_valid(polys).all()
    assert (shapely.get_type_id(polys) == 3).all()
    for p in polys:
        ring = np.asarray(p.exterior.coords)
        assert (ring[0] == ring[-1]).all()
    # rectangle: pixel edges in global continuous coordinates (pixel (r, c) covers [c, c+1))
    minx, miny, maxx, maxy = shapely.bounds(polys[2])
    assert (minx, miny, maxx, maxy) == (2090.0, 1060.0, 2131.0, 1080.0)
    # disk centroid = pixel centre + offset
    c = shapely.centroid(polys[0])
    assert abs(c.x - 2030.5) < 1e-9 and abs(c.y - 1030.5) < 1e-9
    # on the 0.01 px grid
    coords = shapely.get_coordinates(polys)
    assert np.allclose(np.round(coords, 2), coords)


def test_holes_dropped_and_largest_part_kept():
    labels = np.zeros((60, 60), np.uint32)
    labels[10:40, 10:40] = 5
    labels[20:30, 20:30] = 0  # hole
    labels[50:53, 50:53] = 5  # second, smaller part
    ids, polys = geometry.labels_to_polygons(labels)
    assert ids.tolist() == [5]
    assert shapely.get_num_interior_rings(polys[0]) == 0
    assert abs(shapely.area(polys[0]) - (900 - 0.5)) < 1e-9


def test_touching_labels_do_not_overlap():
    labels = np.zeros((80, 80), np.uint32)
    rr, cc = disk((40, 40), 25)
    labels[rr, cc] = 1
    labels[:, 40:][labels[:, 40:] == 1] = 2  # two touching halves
    labels[40:, :][labels[40:, :] == 1] = 3
    labels[30:50, 60:70] = 4  # overlaps the disk edge: touches 2 and 3
    ids, polys = geometry.labels_to_polygons(labels)
    assert len(ids) == 4
    a, b = np.triu_indices(4, 1)
    iou, inter = geometry.pair_iou(polys[a], polys[b])
    assert inter.max() < 1e-9
    assert shapely.intersects(polys[1], polys[2])  # they do share a boundary


def test_empty_and_bad_input():
    ids, polys = geometry.labels_to_polygons(np.zeros((10, 10), np.uint32))
    assert ids.shape == (0,) and polys.shape == (0,)
    with pytest.raises(InputError, match="2-D integer"):
        geometry.labels_to_polygons(np.zeros((4, 4), np.float32))


def test_clean_polygons_repairs_bowtie():
    bowtie = shapely.Polygon([(0, 0), (10, 10), (10, 0), (0, 10), (0, 0)])
    out = geometry.clean_polygons(np.array([bowtie], dtype=object))
    assert shapely.is_valid(out).all() and out[0].geom_type == "Polygon"
    assert abs(out[0].area - 25) < 1e-9


def test_pair_iou():
    a = np.array([shapely.box(0, 0, 2, 2), shapely.box(0, 0, 1, 1)], dtype=object)
    b = np.array([shapely.box(1, 0, 3, 2), shapely.box(5, 5, 6, 6)], dtype=object)
    iou, inter = geometry.pair_iou(a, b)
    np.testing.assert_allclose(iou, [2 / 6, 0])
    np.testing.assert_allclose(inter, [2, 0])


def _find_contours_outline(labels, label):
    """Reference: the largest ``find_contours`` ring of one label's padded mask (the definition)."""
    from skimage.measure import find_contours

    mask = np.pad(labels == label, 1).astype(np.float32)
    rings = [c for c in find_contours(mask, 0.5) if len(c) >= 4]
    best = max(rings, key=lambda c: abs(shapely.Polygon(c).area))
    return shapely.Polygon(best[:, ::-1] - 0.5)  # padded index -> continuous (x = col, y = row)


def test_matches_find_contours_on_ragged_labels():
    # random labels: holes, several parts, diagonal contacts (saddles), labels touching the image edge
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 7, (60, 70)).astype(np.uint32)
    labels[rng.random(labels.shape) < 0.3] = 0
    ids, polys = geometry.labels_to_polygons(labels)
    assert ids.tolist() == sorted(set(labels.ravel().tolist()) - {0})
    assert shapely.is_valid(polys).all() and (shapely.get_type_id(polys) == 3).all()
    assert shapely.is_ccw(shapely.get_exterior_ring(polys)).all()
    assert (shapely.get_num_interior_rings(polys) == 0).all()
    coords = shapely.get_coordinates(polys)
    assert np.array_equal(coords * 2, np.round(coords * 2))  # pixel-edge midpoints: multiples of 0.5
    for i, p in zip(ids, polys):
        assert shapely.equals(p, _find_contours_outline(labels, i)), i
    # no collinear vertices left (lossless simplification)
    for p in polys:
        ring = np.asarray(p.exterior.coords)
        d = np.diff(np.vstack([ring, ring[1:2]]), axis=0)
        assert (np.abs(d[:-1, 0] * d[1:, 1] - d[:-1, 1] * d[1:, 0]) > 0).all()


def test_outline_is_identical_from_any_window_and_ids_subset():
    rng = np.random.default_rng(2)
    labels = np.zeros((90, 100), np.uint32)
    for k in range(1, 30):
        rr, cc = disk((rng.uniform(10, 80), rng.uniform(10, 90)), rng.uniform(3, 9), shape=labels.shape)
        labels[rr, cc] = k  # later disks overwrite: touching and ragged neighbours
    ids, polys = geometry.labels_to_polygons(labels, offset_rc=(500, 700))
    sub_ids, sub = geometry.labels_to_polygons(labels[7:83, 5:97], offset_rc=(507, 705))
    inside = {int(i) for i in np.unique(labels[7:83, 5:97]) if i} - set(np.unique(np.concatenate(
        [labels[7, 5:97], labels[82, 5:97], labels[7:83, 5], labels[7:83, 96]])).tolist())
    common = [i for i in ids.tolist() if i in inside]
    assert len(common) > 10
    wkb = dict(zip(ids.tolist(), geometry.to_wkb(polys)))
    sub_wkb = dict(zip(sub_ids.tolist(), geometry.to_wkb(sub)))
    assert all(wkb[i] == sub_wkb[i] for i in common)  # same vertices, same order, same start
    pick = np.array(common[::2])
    got_ids, got = geometry.labels_to_polygons(labels, offset_rc=(500, 700), ids=pick)
    assert got_ids.tolist() == pick.tolist()
    assert all(a == wkb[i] for i, a in zip(pick.tolist(), geometry.to_wkb(got)))
