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


def test_render_draws_the_most_removed_chunk_as_a_fourth_panel():
    """A model that removed something: panel 4 holds the chunk where most was removed, its removed
    objects dotted; panel 3 is unchanged by it."""
    thumb = np.full((200, 300, 3), 220, np.uint8)
    dens = np.zeros(qc.density_layout(thumb.shape[:2], 8.0)[:2], np.float32)
    crop = np.full((256, 256, 3), 200, np.uint8)
    ring = [np.array([[10, 10], [10, 40], [40, 40], [40, 10]])]
    t = np.arange(60.0, 120.0, 2.0)  # a square outline with a vertex every 2 px, like a pixel outline
    removed = np.concatenate([np.stack([np.full_like(t, 60.0), t], 1), np.stack([t, np.full_like(t, 120.0)], 1),
                              np.stack([np.full_like(t, 120.0), t[::-1]], 1), np.stack([t[::-1], np.full_like(t, 60.0)], 1)])
    args = (thumb, 8.0, None, dens, crop, ring, "caption")
    three = np.asarray(qc.render_qc(*args, crop_mpp=0.5))
    img = qc.render_qc(*args, crop_mpp=0.5, removed_crop={
        "rgb": crop, "rings_rc": ring, "ring_rgb": None, "rejected_rings_rc": [removed], "title": "most removed"})
    assert img.size == (4 * qc.PANEL_PX, three.shape[0])
    a = np.asarray(img)
    panel = (slice(qc.TITLE_PX, qc.TITLE_PX + qc.PANEL_PX),)
    inner = slice(2 * qc.PANEL_PX, 3 * qc.PANEL_PX - 2)  # the divider to panel 4 covers the last column
    p3, p4 = a[panel + (inner,)], a[panel + (slice(3 * qc.PANEL_PX, None),)]
    assert (p3 == three[panel + (inner,)]).all()
    dotted = (p4 == qc.REJECTED_RGB).all(axis=2)
    assert dotted.sum() > 100 and not (p3 == qc.REJECTED_RGB).all(axis=2).any()
    # dotted, not solid: along the top edge of the square (row 60 x 2) about half the length is drawn
    row = dotted[118:122].any(axis=0)[125:235]
    assert 0.3 < row.mean() < 0.8
