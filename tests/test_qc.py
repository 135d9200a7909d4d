"""QC figure: representative (median-density) crop, model label, layout with title/key bands."""

from __future__ import annotations

import numpy as np

from pipeline import qc


def test_representative_chunk_is_the_median_not_the_densest():
    counts = {(0, 0): 5, (0, 1): 900, (1, 0): 40, (1, 1): 60, (2, 0): 0}
    assert qc.representative_chunk(counts, []) == (1, 0)  # counts 5, 40, 60, 900: the lower median
    assert qc.representative_chunk({}, [[3, 4], [1, 2]]) == (1, 2)
    assert qc.representative_chunk({}, []) is None


def test_model_label_names_the_model_not_its_class():
    info = {"name": "Segmenter", "weights_file": "cellsam_default.pt", "mode": "lite", "version": "0.1.0",
            "engine": "torch"}
    assert qc.model_label(info) == "cellsam_default (lite, v0.1.0, torch)"
    assert qc.model_label({"name": "classical"}) == "classical"


def test_render_has_title_key_and_caption_bands():
    thumb = np.full((200, 300, 3), 220, np.uint8)
    layout = qc.density_layout(thumb.shape[:2], 8.0)
    dens = np.zeros(layout[:2], np.float32)
    dens[3, 4] = 10
    crop = np.full((256, 256, 3), 200, np.uint8)
    img = qc.render_qc(thumb, 8.0, np.ones((200, 300), bool), dens, crop, [np.array([[10, 10], [10, 40], [40, 40]])],
                       "caption", crop_mpp=0.5)
    assert img.size == (3 * qc.PANEL_PX, qc.TITLE_PX + qc.PANEL_PX + qc.KEY_PX + qc.TEXT_PX)
    a = np.asarray(img)
    # the colour bar of the density key is drawn in the key band under the middle panel
    band = a[qc.TITLE_PX + qc.PANEL_PX : qc.TITLE_PX + qc.PANEL_PX + qc.KEY_PX, qc.PANEL_PX : 2 * qc.PANEL_PX]
    assert (np.abs(band.astype(int) - 255).sum(axis=2) > 200).sum() > 1000
    # a black scale bar on the thumbnail panel (20 px at 1 px per 8 µm fits: >= 10 µm bars exist)
    panel1 = a[qc.TITLE_PX : qc.TITLE_PX + qc.PANEL_PX, : qc.PANEL_PX]
    assert ((panel1 == 0).all(axis=2)).sum() > 20
