"""Nucleus classes in every output (issue 14, output side) with a stand-in typed model.

The stand-in is the tile-independent threshold model of tests/test_segment.py plus a type head
whose probabilities depend only on each nucleus's own pixels (its area), so windows on both
sides of a seam agree; it runs through the real pipeline (zarr store, dask, stitching, export).
"""

from __future__ import annotations

import gzip
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy import ndimage

from pipeline.config import Config, SegmentConfig, StoreConfig
from pipeline.data.classes import ClassVocabulary
from pipeline.paths import slide_paths
from pipeline.segment import run_segment

MPP = 0.5
CORE = 250
NAMES = ("Epithelial", "Inflammatory", "Fibroblast", "Other")


class TypedModel:
    """Threshold + 8-connected components; class probabilities from the component's area."""

    class_names = list(NAMES)

    def segment_batch(self, images, timings=None):
        out = []
        for img in images:
            labels, n = ndimage.label(img.mean(axis=2) < 120, structure=np.ones((3, 3)))
            area = ndimage.sum_labels(np.ones(labels.shape), labels, np.arange(1, n + 1))
            logits = np.stack([np.cos(area / 37.0 + k) * 3 for k in range(len(NAMES))], axis=1)
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            out.append((labels.astype(np.uint32), np.ones(n, np.float32), (p / p.sum(axis=1, keepdims=True)).astype(np.float32)))
        return out


def untyped_model(images):
    return [r[:2] for r in TypedModel().segment_batch(images)]


def config(chunk_px):
    return Config(store=StoreConfig(chunk_px=chunk_px, pyramid_levels=2), segment=SegmentConfig(halo_px=40))


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory):
    from pipeline.synthetic import write_synthetic_slide

    return write_synthetic_slide(tmp_path_factory.mktemp("slide") / "syn.tif", size_px=(900, 1000), mpp=MPP, seed=3)


@pytest.fixture(scope="module")
def typed(slide_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("typed")
    summary = run_segment(slide_path, out, model_path=TypedModel(), cfg=config(CORE), quiet=True)
    return out, summary


def test_parquet_class_columns_consistent_across_seams(typed, slide_path, tmp_path):
    out, _ = typed
    t = pq.read_table(slide_paths(out, "syn").parquet)
    assert t.column_names[-5:] == ["class", "p_Epithelial", "p_Inflammatory", "p_Fibroblast", "p_Other"]
    assert str(t.schema.field("p_Other").type) == "float"
    p = np.column_stack([t[f"p_{n}"].to_numpy() for n in NAMES])
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)
    cls = np.asarray(t["class"].to_pylist())
    assert (cls == np.asarray(NAMES)[p.argmax(axis=1)]).all()
    assert len(set(cls)) >= 3  # the stand-in spreads nuclei over the classes
    assert t["nucleus_id"].to_pylist() == list(range(1, t.num_rows + 1))
    # one window (no seams): same nuclei, same classes and probabilities at the same places
    run_segment(slide_path, tmp_path, model_path=TypedModel(), cfg=config(1024), quiet=True)
    w = pq.read_table(slide_paths(tmp_path, "syn").parquet)
    assert w.num_rows == t.num_rows
    key = lambda tab: sorted(zip(np.round(tab["centroid_x_um"].to_numpy(), 2), np.round(tab["centroid_y_um"].to_numpy(), 2),  # noqa: E731
                                 tab["class"].to_pylist(), np.round(tab["p_Other"].to_numpy(), 5)))
    assert key(w) == key(t)


def test_geojson_classification_and_probabilities_follow_qupath_rules(typed):
    out, _ = typed
    fc = json.loads(gzip.decompress(slide_paths(out, "syn").geojson_gz.read_bytes()))
    t = pq.read_table(slide_paths(out, "syn").parquet)
    vocab = ClassVocabulary.crchisto()
    assert len(fc["features"]) == t.num_rows
    by_uuid = dict(zip(t["uuid"].to_pylist(), zip(t["class"].to_pylist(), t["p_Inflammatory"].to_pylist())))
    for f in fc["features"]:
        c = f["properties"]["classification"]
        assert set(c) == {"name", "color"}  # QuPath: name + color (else "Unable to parse PathClass")
        assert c["name"] in NAMES and c["color"] == list(vocab.color(c["name"]))
        assert all(isinstance(v, int) and 0 <= v <= 255 for v in c["color"]) and len(c["color"]) == 3
        m = f["properties"]["measurements"]
        assert isinstance(m, dict) and all(isinstance(v, (int, float)) for v in m.values())  # flat map, finite numbers
        probs = [m[f"Class probability: {n}"] for n in NAMES]
        assert abs(sum(probs) - 1) < 1e-3 and NAMES[int(np.argmax(probs))] == c["name"]
        name, p_inf = by_uuid[f["id"]]
        assert name == c["name"] and abs(m["Class probability: Inflammatory"] - p_inf) < 1e-4
    assert vocab.color("Other") == (255, 200, 0)  # QuPath's standard "Other"


def test_summary_classes_sum_to_totals(typed):
    out, summary = typed
    s = json.loads(slide_paths(out, "syn").summary.read_text())
    assert sorted(s["classes"]) == sorted(NAMES)  # JSON keys are written sorted
    assert sum(c["count"] for c in s["classes"].values()) == s["nuclei"] > 50
    assert abs(sum(c["fraction"] for c in s["classes"].values()) - 1) < 1e-5
    assert abs(sum(c["density_per_mm2"] for c in s["classes"].values()) - s["nuclei_per_mm2"]) < 0.01
    t = pq.read_table(slide_paths(out, "syn").parquet)
    assert s["classes"]["Other"]["count"] == t["class"].to_pylist().count("Other")
    assert s["model"]["classes"] == list(NAMES)  # class names are part of the model identity


def test_untyped_model_keeps_nucleus_class(slide_path, tmp_path):
    s = run_segment(slide_path, tmp_path, model_path=untyped_model, cfg=config(CORE), quiet=True)
    sp = slide_paths(tmp_path, "syn")
    fc = json.loads(gzip.decompress(sp.geojson_gz.read_bytes()))
    assert {json.dumps(f["properties"]["classification"]) for f in fc["features"]} == \
        {json.dumps({"name": "Nucleus", "color": [0, 128, 255]})}
    assert not any(k.startswith("Class probability") for f in fc["features"] for k in f["properties"]["measurements"])
    t = pq.read_table(sp.parquet)
    assert "class" not in t.column_names and not any(c.startswith("p_") for c in t.column_names)
    assert "classes" not in s and "classes" not in s["model"]


def test_changed_head_invalidates_chunks(slide_path, tmp_path):
    from pipeline.infer import chunks_meta, resolve_model

    typed_m = resolve_model(TypedModel(), device="cpu", refine=False, store_mpp=MPP)
    plain = resolve_model(untyped_model, device="cpu", refine=False, store_mpp=MPP)
    assert typed_m.class_names == NAMES and plain.class_names == ()
    attrs = {"mpp": MPP, "shape_rc": [10, 10], "chunk_px": 256}
    cfg = SegmentConfig()
    assert chunks_meta(attrs, typed_m, cfg)["model"]["classes"] == list(NAMES)
    other = TypedModel()
    other.class_names = ["A", "B", "C", "D"]
    assert chunks_meta(attrs, resolve_model(other, device="cpu", refine=False, store_mpp=MPP), cfg) != \
        chunks_meta(attrs, typed_m, cfg)


def test_cohort_per_class_columns_and_plot(typed, slide_path, tmp_path):
    import pandas as pd

    from pipeline.cohort import COLUMNS, report_paths, run_cohort

    out, summary = typed
    sheet = tmp_path / "samples.tsv"
    sheet.write_text(f"slide_id\tpath\tmpp\nsyn\t{slide_path}\t\n", encoding="utf-8")
    prefix = tmp_path / "report" / "cohort"
    run_cohort(out, sheet, prefix)
    table = pd.read_parquet(report_paths(prefix)["parquet"])
    cols = [f"{n}{s}" for n in NAMES for s in ("_count", "_per_mm2", "_fraction")]
    assert [c for c in table.columns if c not in COLUMNS] == cols and table.columns[-1] == "runtime_s"
    row = table.iloc[0]
    assert row["status"] == "ok"
    assert sum(int(row[f"{n}_count"]) for n in NAMES) == int(row["nuclei"])
    for n in NAMES:
        assert row[f"{n}_per_mm2"] == pytest.approx(summary["classes"][n]["density_per_mm2"])
    from PIL import Image

    png = tmp_path / "cohort.png"
    png.write_bytes(report_paths(prefix)["png"].read_bytes())
    px = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3)
    for n in NAMES:  # every class bar in its fixed colour
        assert (np.abs(px.astype(int) - ClassVocabulary.crchisto().color(n)).sum(axis=1) < 6).sum() > 20, n


def test_qc_outlines_in_class_colours_with_legend(typed, tmp_path):
    from PIL import Image

    from pipeline.qc import KEY_PX, PANEL_PX, TITLE_PX

    out, _ = typed
    im = np.asarray(Image.open(slide_paths(out, "syn").qc_png).convert("RGB")).astype(int)
    crop = im[TITLE_PX:TITLE_PX + PANEL_PX, 2 * PANEL_PX:].reshape(-1, 3)
    key = im[TITLE_PX + PANEL_PX:TITLE_PX + PANEL_PX + KEY_PX, 2 * PANEL_PX:].reshape(-1, 3)
    vocab = ClassVocabulary.crchisto()
    seen = [n for n in NAMES if (np.abs(crop - vocab.color(n)).sum(axis=1) < 10).sum() > 30]
    assert len(seen) >= 2, seen  # outlines drawn in at least two class colours
    for n in NAMES:  # one legend swatch per class
        assert (np.abs(key - vocab.color(n)).sum(axis=1) == 0).sum() >= 14 * 6, n


def test_vectorised_geojson_matches_reference_for_typed_rows():
    import shapely

    from pipeline.export import _features, _features_json, _measurement_columns
    from pipeline.geometry import from_wkb
    from pipeline.stitch import assign_ids, extract_chunk_instances

    labels = np.zeros((64, 64), np.uint32)
    labels[5:15, 5:15], labels[30:42, 20:30], labels[50:60, 40:52] = 1, 2, 3
    probs = np.array([[0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.2, 0.6], [0.2, 0.5, 0.2, 0.1]], np.float32)
    t = extract_chunk_instances(labels, np.ones(3, np.float32), np.full((64, 64, 3), 128, np.uint8),
                                window_origin_rc=(0, 0), core_box_rc=(0, 0, 64, 64), store_shape_rc=(64, 64),
                                mpp=0.5, eps_px=2, min_area_um2=1, chunk_rc=(0, 0), class_probs=probs,
                                class_names=NAMES)
    t = assign_ids(t)
    assert t["class"].to_pylist() == ["Epithelial", "Other", "Inflammatory"]
    cols = _measurement_columns(t)
    fast, n = _features(t, scale_xy_l0=(1.0, 1.0), offset_xy_l0=(0.0, 0.0), slide_key="k", cols=cols)
    polys = from_wkb(t["geometry"])
    values = np.column_stack([t[c].to_numpy().astype(np.float64) for c in cols])
    ref, m = _features_json(t, polys, values, np.isfinite(values), t["nucleus_id"].to_numpy(), slide_key="k", cols=cols)
    assert n == m == 3 and shapely.is_valid(polys).all()
    assert [json.loads(line) for line in fast.split(b",\n")] == [json.loads(line) for line in ref.split(b",\n")]
