"""pipeline.data.classes: class vocabulary, colours, and the typed-annotation readers (point CSVs,
QuPath GeoJSON, label + type images) on small hand-written files and on the real CRCHisto CSVs."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import tifffile

from conftest import SHARED, shared_file
from pipeline.data import classes as C
from pipeline.errors import InputError

# --- vocabulary ------------------------------------------------------------------------------


def test_crchisto_vocabulary_names_colours_aliases():
    v = C.ClassVocabulary.crchisto()
    assert v.names == ("Epithelial", "Inflammatory", "Fibroblast", "Other")
    assert v.color("Other") == (255, 200, 0)  # QuPath's standard "Other"
    assert v.color("Epithelial") == C.FIXED_COLORS["Epithelial"]
    assert len(set(v.colors)) == 4
    assert [v.index(n) for n in ("epithelial", "INFLAMMATORY", "fibroblast", "others", "Other")] == [0, 1, 2, 3, 3]
    assert v.encode(["others", None, "Epithelial"]).tolist() == [3, -1, 0]
    assert v.to_dict() == {"names": list(v.names), "colors": [list(c) for c in v.colors]}


def test_qupath_standard_colours_and_palette():
    v = C.ClassVocabulary.from_names(["Tumor", "Stroma", "Immune cells", "Necrosis", "Positive", "Negative",
                                      "Goblet", "Paneth"])
    assert v.colors[:6] == ((200, 0, 0), (150, 200, 150), (160, 90, 160), (50, 50, 50), (200, 50, 50), (90, 90, 180))
    assert v.colors[6:] == C.PALETTE[:2]
    # deterministic, and a palette colour already used by a fixed name is skipped
    assert C.ClassVocabulary.from_names(["Goblet", "Paneth"]).colors == C.PALETTE[:2]
    many = C.ClassVocabulary.from_names([f"c{i}" for i in range(14)])
    assert len(set(many.colors)) == 14 and many == C.ClassVocabulary.from_names([f"c{i}" for i in range(14)])


def test_unknown_class_one_line_naming_file_and_class():
    v = C.ClassVocabulary.crchisto()
    with pytest.raises(InputError) as err:
        v.encode(["epithelial", "lymphocyte"], "tiles/a.csv")
    msg = str(err.value)
    assert msg.startswith("tiles/a.csv: unknown class 'lymphocyte'") and "\n" not in msg and "Epithelial" in msg


@pytest.mark.parametrize(
    "names,pattern",
    [(["A", "a"], "differ only in case"), (["unlabelled"], "reserved"), ([], "at least one"), ([" "], "invalid")],
)
def test_bad_vocabularies(names, pattern):
    with pytest.raises(InputError, match=pattern):
        C.ClassVocabulary.from_names(names)


def test_vocabulary_from_data():
    v = C.vocabulary_from_data(["b", None, "A", "b"])
    assert v.names == ("A", "b")
    with pytest.raises(InputError, match="differ only in case"):
        C.vocabulary_from_data(["Tumor", "tumor"])
    with pytest.raises(InputError, match="no typed annotations"):
        C.vocabulary_from_data([None, None])


# --- point CSVs ------------------------------------------------------------------------------


def test_point_csv_hand_written(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("\ufeffclass,y_px,extra,x_px\nepithelial,2.5,z,1\nUnlabelled,4,z,3\n,6,z,5\n\nothers,8,z,7\n",
                 encoding="utf-8")
    pts = C.read_point_csv(p)
    assert pts.xy_px.tolist() == [[1, 2.5], [3, 4], [5, 6], [7, 8]]
    assert pts.class_name == ("epithelial", None, None, "others")
    assert pts.encode(C.ClassVocabulary.crchisto()).tolist() == [0, -1, -1, 3]
    assert pts.source == str(p) and pts.label is None
    empty = tmp_path / "e.csv"
    empty.write_text("x_px,y_px,class\n")
    e = C.read_point_csv(empty)
    assert len(e) == 0 and e.xy_px.shape == (0, 2)


@pytest.mark.parametrize(
    "text,pattern",
    [("x,y,class\n1,2,a\n", "lacks column(s) x_px, y_px"), ("x_px,y_px,class\n1,abc,a\n", ":2: non-numeric"),
     ("x_px,y_px,class\n1,2,a\n1,nan,a\n", ":3: non-finite"), ("", "empty point CSV"),
     ("x_px,y_px,class\n1,2\n", ":2: 2 fields")],
)
def test_point_csv_errors(tmp_path, text, pattern):
    p = tmp_path / "bad.csv"
    p.write_text(text)
    with pytest.raises(InputError) as err:
        C.read_point_csv(p)
    assert pattern in str(err.value) and str(p) in str(err.value) and "\n" not in str(err.value)


def test_prediction_csv_with_labels(tmp_path):
    p = tmp_path / "x.nuclei.csv"
    p.write_text("label,centroid_x_px,centroid_y_px,class\n3,1.5,2,Epithelial\n7,4,5,Other\n")
    pts = C.read_point_csv(p, "centroid_x_px", "centroid_y_px", "class", "label")
    assert pts.label.tolist() == [3, 7] and pts.class_name == ("Epithelial", "Other")
    p.write_text("label,centroid_x_px,centroid_y_px,class\n3,1.5,2,Epithelial\n3,4,5,Other\n")
    with pytest.raises(InputError, match="label 3 appears on more than one row"):
        C.read_point_csv(p, "centroid_x_px", "centroid_y_px", "class", "label")
    with pytest.raises(InputError, match="no such file"):
        C.read_point_csv(tmp_path / "missing.csv")


def test_all_crchisto_csvs():
    """Every shipped CRCHisto CSV parses; totals match the data README (23,298 points, 17,801 typed),
    every class is in the shipped vocabulary, coordinates lie in (or within 1 px of) the 500x500 tiles."""
    shared_file("nuclei/crchisto/points/img1.csv")
    files = sorted((SHARED / "nuclei/crchisto/points").glob("*.csv"))
    assert len(files) == 80
    v = C.ClassVocabulary.crchisto()
    counts = np.zeros(5, dtype=np.int64)
    for f in files:
        pts = C.read_point_csv(f)
        idx = pts.encode(v)
        counts += np.bincount(idx + 1, minlength=5)
        # 0-based pixel coordinates; a few centres sit up to 1 px outside the tile (img13: x = -0.73)
        assert pts.xy_px.min() > -1 and pts.xy_px.max() < 500
    assert counts.sum() == 23298 and counts[1:].sum() == 17801
    assert counts.tolist() == [5497, 6229, 5199, 4536, 1837]  # unlabelled, epi, infl, fib, others


# --- QuPath GeoJSON --------------------------------------------------------------------------


def _feature(geom, cls=None, object_type="annotation", **extra):
    props = {"objectType": object_type}
    if cls is not None:
        props["classification"] = cls
    return {"type": "Feature", "id": "x", "geometry": geom, "properties": props, **extra}


SQUARE = [[[2, 2], [8, 2], [8, 8], [2, 8], [2, 2]]]
FEATURES = [
    _feature({"type": "Point", "coordinates": [10.5, 20.25]}, {"name": "Tumor", "color": [200, 0, 0]}),
    _feature({"type": "MultiPoint", "coordinates": [[1, 2], [3, 4]]}, "Stroma"),
    _feature({"type": "Point", "coordinates": [5, 6]}),  # unclassified -> unlabelled
    _feature({"type": "Polygon", "coordinates": SQUARE}, {"name": "Tumor", "color": [200, 0, 0]}, "detection"),
    _feature({"type": "MultiPolygon", "coordinates": [SQUARE, [[[12, 12], [16, 12], [16, 16], [12, 12]]]]},
             {"names": ["Tumor", "Positive"], "color": [200, 50, 50]}, "detection"),
    _feature({"type": "Polygon", "coordinates": [[[20, 0], [40, 0], [40, 20], [20, 20], [20, 0]]]},
             {"name": "Immune cells", "color": [160, 90, 160]}, "cell",
             nucleusGeometry={"type": "Polygon", "coordinates": [[[25, 5], [30, 5], [30, 10], [25, 10], [25, 5]]]}),
    _feature({"type": "Polygon", "coordinates": [[[0, 0], [99, 0], [99, 99], [0, 0]]]}, {"name": "Region*", "color": [0, 0, 180]}),
    _feature({"type": "Point", "coordinates": [1, 1]}, {"name": "Ignore*", "color": [180, 180, 180]}),
    _feature({"type": "LineString", "coordinates": [[0, 0], [5, 5]]}, "Stroma"),
]


@pytest.mark.parametrize("form", ["collection", "list", "gz"])
def test_geojson_points_and_polygons(tmp_path, form):
    if form == "collection":
        path = tmp_path / "a.geojson"
        path.write_text(json.dumps({"type": "FeatureCollection", "features": FEATURES}))
    elif form == "list":
        path = tmp_path / "a.json"
        path.write_text(json.dumps(FEATURES))
    else:
        path = tmp_path / "a.geojson.gz"
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            json.dump({"type": "FeatureCollection", "features": FEATURES}, fh)
    pts, polys = C.read_geojson_classes(path)
    assert pts.xy_px.tolist() == [[10.5, 20.25], [1, 2], [3, 4], [5, 6]]
    assert pts.class_name == ("Tumor", "Stroma", "Stroma", None)
    assert polys.class_name == ("Tumor", "Tumor: Positive", "Immune cells")
    assert [len(p) for p in polys.parts] == [1, 2, 1]
    assert polys.parts[2][0].tolist()[0] == [25, 5]  # the cell's nucleus, not its outline
    vocab = C.ClassVocabulary.from_names(["Tumor", "Stroma", "Tumor: Positive", "Immune cells"])
    assert pts.encode(vocab).tolist() == [0, 1, 1, -1] and polys.encode(vocab).tolist() == [0, 2, 3]
    with pytest.raises(InputError) as err:
        polys.encode(C.ClassVocabulary.from_names(["Tumor", "Stroma"]))
    assert str(err.value).startswith(f"{path}: unknown class 'Tumor: Positive'")
    labels, obj = polys.rasterize((40, 40))
    assert labels.dtype == np.uint32 and obj.tolist() == [-1, 0, 1, 2]
    assert labels[5, 5] == 2  # the MultiPolygon's first part overwrites the first square
    assert labels[13, 15] == 2 and labels[15, 13] == 0 and labels[7, 27] == 3 and labels[15, 35] == 0
    assert set(np.unique(labels).tolist()) == {0, 2, 3}


def test_geojson_single_feature_and_bare_geometry(tmp_path):
    p = tmp_path / "one.geojson"
    p.write_text(json.dumps(FEATURES[0]))
    pts, polys = C.read_geojson_classes(p)
    assert pts.class_name == ("Tumor",) and len(polys) == 0
    p.write_text(json.dumps({"type": "Point", "coordinates": [1, 2]}))
    pts, _ = C.read_geojson_classes(p)
    assert pts.xy_px.tolist() == [[1, 2]] and pts.class_name == (None,)


@pytest.mark.parametrize(
    "content,pattern",
    [("{not json", "cannot parse GeoJSON"), (json.dumps({"a": 1}), "not GeoJSON features"),
     (json.dumps([_feature({"type": "Point", "coordinates": [1, 2]}, {"color": [1, 2, 3]})]),
      "feature 0: classification without 'name'"),
     (json.dumps([_feature({"type": "Circle", "coordinates": [1, 2]}, "A")]), "unsupported geometry type 'Circle'"),
     (json.dumps([_feature({"type": "Point", "coordinates": ["a", 2]}, "A")]), "malformed coordinates"),
     (json.dumps([_feature({"type": "Point", "coordinates": [1, 2]}, {"name": 3, "color": [1, 2, 3]})]),
      "class name must be a string")],
)
def test_geojson_errors(tmp_path, content, pattern):
    p = tmp_path / "bad.geojson"
    p.write_text(content)
    with pytest.raises(InputError) as err:
        C.read_geojson_classes(p)
    msg = str(err.value)
    assert msg.startswith(str(p)) and pattern in msg and "\n" not in msg
    with pytest.raises(InputError, match="no such file"):
        C.read_geojson_classes(tmp_path / "none.geojson")


# --- label + type images ---------------------------------------------------------------------

LABELS = np.array([[0, 1, 1, 0], [0, 1, 1, 0], [2, 2, 0, 4], [2, 2, 0, 4]], dtype=np.uint32)
TYPES = np.array([[0, 3, 3, 0], [0, 3, 3, 0], [1, 1, 0, 0], [1, 1, 0, 0]], dtype=np.uint8)
NAMES = ["background", "Inflammatory", "Fibroblast", "Epithelial"]


def test_instances_from_type_map():
    inst = C.instances_from_types(LABELS, TYPES, NAMES, "a.png")
    assert inst.instance_label.tolist() == [1, 2, 4]
    assert inst.class_name == ("Epithelial", "Inflammatory", None)  # label 4 has type 0: unlabelled
    v = C.ClassVocabulary.crchisto()
    assert inst.encode(v).tolist() == [0, 1, -1]
    lut = inst.class_lut(v)
    assert lut.tolist() == [-1, 0, 1, -1, -1]
    assert lut[LABELS][0, 1] == 0 and lut[LABELS][2, 0] == 1


def test_two_types_in_one_instance_is_an_error():
    bad = TYPES.copy()
    bad[0, 1] = 2
    with pytest.raises(InputError) as err:
        C.instances_from_types(LABELS, bad, NAMES, "a.png + a_type.png")
    msg = str(err.value)
    assert msg.startswith("a.png + a_type.png: instance 1 has two types, 'Fibroblast' (2) and 'Epithelial' (3)")


def test_per_instance_types_and_unnamed_type():
    inst = C.instances_from_types(LABELS, np.array([[3], [1], [0], [2]]), NAMES)  # CoNSeP inst_type (N, 1)
    assert inst.class_name == ("Epithelial", "Inflammatory", "Fibroblast")
    inst = C.instances_from_types(LABELS, {1: 2, 2: 0}, {1: "A", 2: "B"})
    assert inst.class_name == ("B", None, None)
    with pytest.raises(InputError, match="instance 2 has type 5, which has no class name"):
        C.instances_from_types(LABELS, {1: 1, 2: 5}, NAMES, "x")
    with pytest.raises(InputError, match="2 instance types for labels up to 4"):
        C.instances_from_types(LABELS, np.array([1, 1]), NAMES, "x")
    with pytest.raises(InputError, match="differs from the labels"):
        C.instances_from_types(LABELS, TYPES[:3], NAMES, "x")


def test_label_type_files(tmp_path):
    from PIL import Image
    from scipy.io import savemat

    tifffile.imwrite(tmp_path / "a.tif", LABELS)
    Image.fromarray(TYPES).save(tmp_path / "a_type.png")
    inst = C.read_label_type_pair(tmp_path / "a.tif", tmp_path / "a_type.png", NAMES)
    assert inst.class_name == ("Epithelial", "Inflammatory", None) and inst.labels.dtype == np.uint32
    (tmp_path / "types.csv").write_text("label,type\n1,2\n4,3\n")
    inst = C.read_label_type_pair(tmp_path / "a.tif", tmp_path / "types.csv", NAMES)
    assert inst.class_name == ("Fibroblast", None, "Epithelial")
    # HoVer-Net training patch: (H, W, 5) = RGB, instance, type
    patch = np.zeros((4, 4, 5), dtype=np.int32)
    patch[..., 3], patch[..., 4] = LABELS, TYPES
    np.save(tmp_path / "p.npy", patch)
    assert C.read_label_type_pair(tmp_path / "p.npy", None, NAMES).class_name == ("Epithelial", "Inflammatory", None)
    # CoNSeP .mat
    savemat(tmp_path / "c.mat", {"inst_map": LABELS.astype(np.float64), "inst_type": np.array([[3.0], [1], [0], [2]])})
    assert C.read_label_type_pair(tmp_path / "c.mat", None, NAMES).class_name == ("Epithelial", "Inflammatory", "Fibroblast")
    savemat(tmp_path / "d.mat", {"inst_map": LABELS, "type_map": TYPES})
    assert C.read_label_type_pair(tmp_path / "d.mat", None, NAMES).class_name == ("Epithelial", "Inflammatory", None)
    with pytest.raises(InputError, match="needs a type image"):
        C.read_label_type_pair(tmp_path / "a.tif", None, NAMES)
    with pytest.raises(InputError, match="no such file"):
        C.read_label_type_pair(tmp_path / "nope.tif", tmp_path / "a_type.png", NAMES)
    bad = TYPES.copy()
    bad[3, 3] = 3
    bad[2, 3] = 1
    Image.fromarray(bad).save(tmp_path / "b_type.png")
    with pytest.raises(InputError) as err:
        C.read_label_type_pair(tmp_path / "a.tif", tmp_path / "b_type.png", NAMES)
    assert "b_type.png: instance 4 has two types" in str(err.value)
