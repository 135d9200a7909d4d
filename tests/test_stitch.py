"""Stitching invariants: tiled equals untiled; disagreeing tiles leave one nucleus each."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pytest
import shapely
from skimage.draw import ellipse
from skimage.segmentation import expand_labels, relabel_sequential

from pipeline import geometry
from pipeline.errors import ModelError, StitchError
from pipeline.measure import MEASUREMENT_COLUMNS
from pipeline.stitch import (
    CHUNK_SCHEMA,
    assign_ids,
    check_halo,
    extract_chunk_instances,
    resolve_duplicates,
)

MPP = 0.5
EPS = 3.0
MIN_AREA_UM2 = 3.0


def make_blobs(shape=(320, 290), n_try=400, seed=0):
    """Non-overlapping random ellipses (10-20 px), uint32 labels 1..K, RGB and per-label scores."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint32)
    k = 0
    for _ in range(n_try):
        r, c = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        a, b = rng.uniform(5, 10), rng.uniform(4, 8)
        rr, cc = ellipse(r, c, a, b, shape=shape, rotation=rng.uniform(0, np.pi))
        if len(rr) < 20 or labels[rr, cc].any():
            continue
        k += 1
        labels[rr, cc] = k
    scores = rng.uniform(0.5, 1.0, k).astype(np.float32)
    rgb = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
    return labels, scores, rgb


def chunk_tables(labels, scores, rgb, core, halo, perturb=None):
    """Chunk tables of a tiled run, {(row, col): table}; the 'model' returns the window crop.

    ``perturb`` changes what alternate windows see: ``"expand"`` grows every label by 1 px
    (near-duplicates: dropped), ``"shift"`` moves the labels by (4, -3) px (partial overlaps: clipped).
    """
    H, W = labels.shape
    out = {}
    for i, r0 in enumerate(range(0, H, core)):
        for j, c0 in enumerate(range(0, W, core)):
            r1, c1 = min(r0 + core, H), min(c0 + core, W)
            wr0, wc0 = max(r0 - halo, 0), max(c0 - halo, 0)
            wr1, wc1 = min(r1 + halo, H), min(c1 + halo, W)
            crop = labels[wr0:wr1, wc0:wc1]
            if perturb == "expand" and (i + j) % 2:
                crop = expand_labels(crop, 1)
            elif perturb == "shift" and (i + j) % 2:
                crop = np.roll(crop, (4, -3), axis=(0, 1))
            local, fw, _ = relabel_sequential(crop)  # model ids are window-local
            present = np.unique(crop[crop > 0]).astype(np.int64)
            local_scores = np.zeros(int(local.max()), np.float32)
            local_scores[fw[present] - 1] = scores[present - 1]
            out[(i, j)] = extract_chunk_instances(
                local.astype(np.uint32), local_scores, rgb[wr0:wr1, wc0:wc1],
                window_origin_rc=(wr0, wc0), core_box_rc=(r0, c0, r1, c1), store_shape_rc=(H, W),
                mpp=MPP, eps_px=EPS, min_area_um2=MIN_AREA_UM2, chunk_rc=(i, j))
    return out


def run_tiled(labels, scores, rgb, core, halo, perturb=False):
    """Cut the slide into cores + halo and stitch (``perturb``: alternate windows see grown labels)."""
    tables = chunk_tables(labels, scores, rgb, core, halo, "expand" if perturb else None)
    table = pa.concat_tables([tables[k] for k in sorted(tables)])
    return assign_ids(resolve_duplicates(table, mpp=MPP, dedup_iou=0.5, min_area_px=MIN_AREA_UM2 / MPP**2))


def run_untiled(labels, scores, rgb):
    H, W = labels.shape
    t = extract_chunk_instances(labels, scores, rgb, window_origin_rc=(0, 0), core_box_rc=(0, 0, H, W),
                                store_shape_rc=(H, W), mpp=MPP, eps_px=EPS, min_area_um2=MIN_AREA_UM2,
                                chunk_rc=(0, 0))
    return assign_ids(resolve_duplicates(t, mpp=MPP))


@pytest.fixture(scope="module")
def blobs():
    return make_blobs()


@pytest.fixture(scope="module")
def untiled(blobs):
    return run_untiled(*blobs)


def test_untiled_keeps_every_blob(blobs, untiled):
    labels = blobs[0]
    assert untiled.num_rows == labels.max() > 100
    assert untiled["nucleus_id"].to_pylist() == list(range(1, untiled.num_rows + 1))
    assert untiled.schema.remove(0).equals(CHUNK_SCHEMA, check_metadata=False)


@pytest.mark.parametrize("core", [64, 100, 128])
def test_tiled_equals_untiled(blobs, untiled, core):
    tiled = run_tiled(*blobs, core=core, halo=24)
    assert tiled.num_rows == untiled.num_rows
    for col in ["nucleus_id", "score", "anchor_y_px", "anchor_x_px", "geometry", *MEASUREMENT_COLUMNS]:
        assert tiled[col].equals(untiled[col]), col
    # exactly one owner per nucleus, and nothing was dropped by dedup
    assert all(tiled["owned"].to_pylist())


def test_nuclei_on_tile_lines_are_whole(blobs, untiled):
    labels = blobs[0]
    core = 64
    tiled = run_tiled(*blobs, core=core, halo=24)
    polys = geometry.from_wkb(tiled["geometry"])
    minx, miny, maxx, maxy = shapely.bounds(polys).T
    straddle = (np.floor(minx / core) != np.floor((maxx - 1e-9) / core)) | (
        np.floor(miny / core) != np.floor((maxy - 1e-9) / core))
    assert straddle.sum() > 20
    # each straddling polygon covers its whole blob: area = pixel count up to simplification
    counts = np.bincount(labels.ravel())
    cy = tiled["anchor_y_px"].to_numpy()[straddle].astype(int)
    cx = tiled["anchor_x_px"].to_numpy()[straddle].astype(int)
    ids = labels[cy, cx]
    assert (ids > 0).all()
    area = shapely.area(polys[straddle])
    assert np.allclose(area, counts[ids], rtol=0.06)


def test_tiles_that_disagree_leave_one_nucleus_each(blobs, untiled):
    labels = blobs[0]
    tiled = run_tiled(*blobs, core=64, halo=24, perturb=True)
    polys = geometry.from_wkb(tiled["geometry"])
    # match every survivor to the true blob under its anchor
    cy = np.floor(tiled["anchor_y_px"].to_numpy()).astype(int)
    cx = np.floor(tiled["anchor_x_px"].to_numpy()).astype(int)
    ids = labels[cy, cx]
    assert (ids > 0).all()
    assert np.array_equal(np.sort(ids), np.arange(1, labels.max() + 1))  # one survivor per nucleus
    tree = shapely.STRtree(polys)
    a, b = tree.query(polys, predicate="intersects")
    sel = a < b
    iou, _ = geometry.pair_iou(polys[a[sel]], polys[b[sel]])
    assert sel.sum() > 0 and iou.max() <= 0.1
    assert shapely.is_valid(polys).all()


def test_result_is_independent_of_chunk_order(blobs):
    labels, scores, rgb = blobs
    H, W = labels.shape
    tabs = []
    for r0, c0 in [(0, 0), (0, 100), (100, 0), (100, 100)]:
        crop = (slice(max(r0 - 24, 0), min(r0 + 124, H)), slice(max(c0 - 24, 0), min(c0 + 124, W)))
        tabs.append(extract_chunk_instances(
            expand_labels(labels[crop], 1 if r0 else 0).astype(np.uint32), scores, rgb[crop],
            window_origin_rc=(crop[0].start, crop[1].start), core_box_rc=(r0, c0, min(r0 + 100, H), min(c0 + 100, W)),
            store_shape_rc=(H, W), mpp=MPP, eps_px=EPS, min_area_um2=MIN_AREA_UM2, chunk_rc=(r0 // 100, c0 // 100)))
    fwd = assign_ids(resolve_duplicates(pa.concat_tables(tabs), mpp=MPP))
    rev = assign_ids(resolve_duplicates(pa.concat_tables(tabs[::-1]), mpp=MPP))
    assert fwd.equals(rev)


def test_window_edge_masks_are_dropped_and_counted(blobs, caplog):
    labels, scores, rgb = blobs
    H, W = labels.shape
    # halo 0: nuclei crossing the core edge are truncated in their owner window
    with caplog.at_level(logging.WARNING):
        t = extract_chunk_instances(labels[:100, :100].copy(), scores, rgb[:100, :100], window_origin_rc=(0, 0),
                                    core_box_rc=(0, 0, 100, 100), store_shape_rc=(H, W), mpp=MPP, eps_px=EPS,
                                    min_area_um2=MIN_AREA_UM2, chunk_rc=(0, 0))
    edge = np.unique(np.concatenate([labels[99, :100], labels[:100, 99]]))
    edge = set(edge[edge > 0].tolist())
    assert edge and not edge & set(t["local_id"].to_pylist())
    assert int(t.schema.metadata[b"n_truncated_owned"]) > 0
    assert "halo_px" in caplog.text


def test_empty_window_gives_empty_table():
    labels = np.zeros((50, 60), np.uint32)
    t = extract_chunk_instances(labels, np.zeros(0, np.float32), np.zeros((50, 60, 3), np.uint8),
                                window_origin_rc=(0, 0), core_box_rc=(0, 0, 50, 60), store_shape_rc=(50, 60),
                                mpp=MPP, eps_px=EPS, min_area_um2=MIN_AREA_UM2, chunk_rc=(0, 0))
    assert t.num_rows == 0 and t.schema.equals(CHUNK_SCHEMA, check_metadata=False)
    out = assign_ids(resolve_duplicates(t, mpp=MPP))
    assert out.num_rows == 0 and out.column_names[0] == "nucleus_id"


def test_bad_model_output_raises():
    labels = np.zeros((10, 10), np.uint32)
    labels[2:5, 2:5] = 3
    rgb = np.zeros((10, 10, 3), np.uint8)
    kw = dict(window_origin_rc=(0, 0), core_box_rc=(0, 0, 10, 10), store_shape_rc=(10, 10), mpp=MPP,
              eps_px=EPS, min_area_um2=0.0, chunk_rc=(0, 0))
    with pytest.raises(ModelError, match="scores"):
        extract_chunk_instances(labels, np.ones(2, np.float32), rgb, **kw)
    with pytest.raises(ModelError, match="uint32"):
        extract_chunk_instances(labels.astype(np.int64), np.ones(3, np.float32), rgb, **kw)
    with pytest.raises(StitchError, match="outside the slide"):
        extract_chunk_instances(labels, np.ones(3, np.float32), rgb, **{**kw, "store_shape_rc": (8, 8)})


def test_check_halo_names_the_parameter():
    check_halo(64, 40.0, 3.0)
    with pytest.raises(StitchError, match=r"halo_px.*at least 44"):
        check_halo(32, 40.2, 3.0)


def _merge_split_windows(merged_score, split_score):
    """Two windows across the seam at col 64 that disagree: the left one merges two touching nuclei
    X (long, thin, mostly left) and Y (right), the right one splits them. The merged anchor lies in
    the left core; X's anchor is far from the right core, so the right window keeps only Y."""
    H, W = 60, 128
    truth = np.zeros((H, W), np.uint32)
    truth[20:30, 30:64] = 1  # X: 340 px, centroid col 47
    truth[13:37, 64:80] = 2  # Y: 384 px, centroid col 72
    rgb = np.full((H, W, 3), 200, np.uint8)
    merged = (truth > 0).astype(np.uint32)
    kw = dict(store_shape_rc=(H, W), mpp=MPP, eps_px=EPS, min_area_um2=MIN_AREA_UM2)
    left = extract_chunk_instances(merged[:, :96].copy(), np.array([merged_score], np.float32), rgb[:, :96],
                                   window_origin_rc=(0, 0), core_box_rc=(0, 0, H, 64), chunk_rc=(0, 0), **kw)
    right = extract_chunk_instances(truth[:, 32:].copy(), np.array([0.5, split_score], np.float32), rgb[:, 32:],
                                    window_origin_rc=(0, 32), core_box_rc=(0, 64, H, W), chunk_rc=(0, 1), **kw)
    return truth, left, right


@pytest.mark.parametrize("merged_score,split_score", [(0.6, 0.9), (0.9, 0.6)])
def test_windows_that_merge_and_split_lose_no_nucleus(merged_score, split_score):
    truth, left, right = _merge_split_windows(merged_score, split_score)
    assert left.num_rows == 1 and left["owned"].to_pylist() == [True]  # the merged instance, owned left
    assert right.num_rows == 1 and right["owned"].to_pylist() == [True]  # Y only: X's anchor is far away
    stats = {}
    out = assign_ids(resolve_duplicates(pa.concat_tables([left, right]), mpp=MPP, stats=stats))
    assert stats["conflicts"] == 1
    polys = geometry.from_wkb(out["geometry"])
    union = shapely.union_all(polys)
    _, x = geometry.labels_to_polygons((truth == 1).astype(np.uint32))
    _, y = geometry.labels_to_polygons((truth == 2).astype(np.uint32))
    for nucleus in (x[0], y[0]):  # every true nucleus stays covered
        assert shapely.area(shapely.intersection(nucleus, union)) >= 0.95 * shapely.area(nucleus)
    # and the survivors do not overlap
    if len(polys) == 2:
        assert shapely.area(shapely.intersection(polys[0], polys[1])) < 1e-6
    if split_score > merged_score:  # the split window wins: X is kept as the rest of the merged mask
        assert out.num_rows == 2


def test_merge_split_conflicts_are_counted_by_the_streaming_stitch(tmp_path):
    import pyarrow.parquet as pq

    from pipeline.assemble import iter_nuclei

    _, left, right = _merge_split_windows(0.6, 0.9)
    files = {}
    for rc, t in [((0, 0), left), ((0, 1), right)]:
        files[rc] = tmp_path / f"{rc[0]}_{rc[1]}.parquet"
        pq.write_table(t, files[rc])
    st = iter_nuclei(files, mpp=MPP, dedup_iou=0.5, min_area_um2=MIN_AREA_UM2, chunk_px=64)
    got = st.table()
    ref = assign_ids(resolve_duplicates(pa.concat_tables([left, right]).replace_schema_metadata(None), mpp=MPP))
    assert st.dedup.conflicts == 1 and got.num_rows == 2 and got.equals(ref)


def test_implausible_objects_are_dropped_and_counted():
    labels = np.zeros((120, 120), np.uint32)
    labels[10:20, 10:20] = 1  # 25 µm^2: a nucleus
    labels[40:80, 30:80] = 2  # 500 µm^2: not a nucleus
    labels[100:103, 5:100] = 3  # a 3-px line: circularity < 0.1
    rgb = np.full((120, 120, 3), 128, np.uint8)
    t = extract_chunk_instances(labels, np.ones(3, np.float32), rgb, window_origin_rc=(0, 0),
                                core_box_rc=(0, 0, 120, 120), store_shape_rc=(120, 120), mpp=MPP, eps_px=EPS,
                                min_area_um2=MIN_AREA_UM2, chunk_rc=(0, 0))
    assert t["local_id"].to_pylist() == [1]
    assert int(t.schema.metadata[b"n_implausible_owned"]) == 2
