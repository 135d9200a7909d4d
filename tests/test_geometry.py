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
