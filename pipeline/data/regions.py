"""Hand-drawn negative regions on slides (no nucleus inside): GeoJSON polygons in level-0 pixels.

Format (e.g. ``pipeline/data/negatives/cmu1_negatives.geojson``): a FeatureCollection of Polygon
features, each with ``properties.slide`` = the slide's path relative to a data root. Used by joint
training (:func:`pipeline.training.joint.load_negative_regions`) and by the type head's
"not a nucleus" output (:func:`pipeline.training.typehead.negative_region_examples`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import InputError


def read_negative_regions(path, data_root, margin_um: float) -> list[dict]:
    """Per slide, the level-0 pixels around its negative polygons and the polygons' mask.

    Parameters
    ----------
    path : path-like
        The GeoJSON file.
    data_root : path-like
        Folder the ``properties.slide`` paths are relative to.
    margin_um : float
        The bounding box of a slide's polygons is grown by this much (µm) on each side.

    Returns
    -------
    list of dict, one per slide (sorted by relative path): ``name`` (slide stem), ``image`` uint8
    (h, w, 3) level-0 RGB, ``mask`` bool (h, w) (inside a polygon), ``mpp`` (µm/px of level 0),
    ``origin_xy`` (level-0 x, y of the image's top-left pixel).
    """
    from skimage.draw import polygon as draw_polygon

    from ..slide import open_slide

    path = Path(path)
    gj = json.loads(path.read_text())
    by_slide: dict[str, list] = {}
    for k, feat in enumerate(gj["features"]):
        rel = feat.get("properties", {}).get("slide")
        if not rel:
            raise InputError(f"{path}: region {feat.get('id', k)} has no properties.slide")
        by_slide.setdefault(rel, []).append(np.asarray(feat["geometry"]["coordinates"][0], np.float64))
    out = []
    for rel, rings in sorted(by_slide.items()):
        slide_path = Path(data_root) / rel
        if not slide_path.exists():
            raise InputError(f"{path}: slide {slide_path} not found")
        with open_slide(slide_path) as sl:
            pad = margin_um / sl.mpp_x
            allp = np.concatenate(rings)
            x0, y0 = np.maximum(np.floor(allp.min(0) - pad), 0).astype(int)
            x1, y1 = np.ceil(allp.max(0) + pad).astype(int)
            x1, y1 = min(x1, sl.dimensions_l0[0]), min(y1, sl.dimensions_l0[1])
            img = np.ascontiguousarray(sl.read_region_l0(int(x0), int(y0), int(x1 - x0), int(y1 - y0), 0)[..., :3])
            mpp = float(sl.mpp_x)
        m = np.zeros(img.shape[:2], bool)
        for ring in rings:
            rr, cc = draw_polygon(ring[:, 1] - y0, ring[:, 0] - x0, m.shape)
            m[rr, cc] = True
        out.append({"name": slide_path.stem, "image": img, "mask": m, "mpp": mpp, "origin_xy": (int(x0), int(y0))})
    return out
