"""Quality-control image of a segmented slide (``<slide_id>.qc.png``).

Layout (one RGB PNG, white background)::

    +----------------------+----------------------+----------------------+
    | thumbnail + tissue   | nucleus density      | full-resolution crop |
    | outline (green)      | heatmap over the     | of the densest chunk |
    |                      | thumbnail            | + nucleus outlines   |
    +----------------------+----------------------+----------------------+
    | one line of text: slide id, nuclei, tissue area, density           |
    +--------------------------------------------------------------------+

Drawn with PIL only and saved without metadata, so the same inputs give the same bytes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .paths import atomic_write

PANEL_PX = 512  # edge of each panel
CROP_PX = 512  # edge of the full-resolution crop, store pixels
TEXT_PX = 28  # height of the caption band
DENSITY_BINS = 48  # density grid cells along the longer side of the thumbnail
TISSUE_RGB = (0, 170, 0)
OUTLINE_RGB = (0, 90, 255)


def _fit(img: Image.Image, size: int) -> tuple[Image.Image, float]:
    """Resize ``img`` to fit a ``size`` square (aspect kept); return it and the scale used."""
    w, h = img.size
    scale = size / max(w, h, 1)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    return img.resize(new, Image.Resampling.BILINEAR), scale


def _mask_outline(mask: np.ndarray) -> np.ndarray:
    """Boolean outline (4-neighbour inner boundary) of a boolean mask."""
    m = np.pad(mask.astype(bool), 1)
    core = m[1:-1, 1:-1]
    inner = m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return core & ~inner


def _heat_rgb(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to a dark-blue -> red -> yellow ramp, uint8 (..., 3)."""
    stops = np.array([[0, 0, 80], [150, 0, 150], [230, 40, 20], [255, 220, 0]], np.float32)
    pos = np.clip(values, 0, 1) * (len(stops) - 1)
    i = np.minimum(pos.astype(int), len(stops) - 2)
    f = (pos - i)[..., None]
    return (stops[i] * (1 - f) + stops[i + 1] * f).astype(np.uint8)


def render_qc(
    thumb_rgb: np.ndarray,
    thumb_mpp: float,
    tissue_mask: np.ndarray | None,
    anchors_rc_um: np.ndarray,
    crop_rgb: np.ndarray | None,
    crop_rings_rc: Sequence[np.ndarray],
    caption: str,
) -> Image.Image:
    """Compose the QC figure (pure: arrays in, image out).

    Parameters
    ----------
    thumb_rgb : ndarray of shape (H, W, 3), uint8
        Whole-slide thumbnail (store frame) at ``thumb_mpp``.
    thumb_mpp : float
        µm/px of the thumbnail.
    tissue_mask : ndarray of shape (h, w), bool, optional
        Tissue mask in the store frame at any resolution (resized to the thumbnail).
    anchors_rc_um : ndarray of shape (N, 2), float
        Nucleus anchors (row, col) in µm from the store origin.
    crop_rgb : ndarray of shape (h, w, 3), uint8, optional
        Full-resolution crop; ``None`` draws an empty panel.
    crop_rings_rc : sequence of ndarray of shape (M, 2), float
        Nucleus outlines (row, col) in crop pixels.
    caption : str
        One line of text under the panels (ASCII; other characters become "?").

    Returns
    -------
    PIL.Image.Image
        RGB image of size (3 * PANEL_PX, PANEL_PX + TEXT_PX).
    """
    canvas = Image.new("RGB", (3 * PANEL_PX, PANEL_PX + TEXT_PX), (255, 255, 255))
    thumb = Image.fromarray(np.ascontiguousarray(thumb_rgb, dtype=np.uint8))
    small, scale = _fit(thumb, PANEL_PX)
    sw, sh = small.size

    # panel 1: thumbnail + tissue outline
    panel1 = np.asarray(small).copy()
    if tissue_mask is not None and tissue_mask.size:
        mask_img = Image.fromarray(tissue_mask.astype(np.uint8) * 255).resize((sw, sh), Image.Resampling.NEAREST)
        outline = _mask_outline(np.asarray(mask_img) > 127)
        panel1[outline] = TISSUE_RGB
    canvas.paste(Image.fromarray(panel1), (0, 0))

    # panel 2: nucleus density (anchors binned on a coarse grid, smoothed) over the grey thumbnail
    grey = np.asarray(small.convert("L"), np.float32)[..., None].repeat(3, axis=2)
    px_um = thumb_mpp / scale  # µm per panel pixel
    cell_px = max(4.0, max(sw, sh) / DENSITY_BINS)  # panel px per density bin
    gh, gw = int(np.ceil(sh / cell_px)), int(np.ceil(sw / cell_px))
    density = np.zeros((gh, gw), np.float32)
    if len(anchors_rc_um):
        rc = np.floor(np.asarray(anchors_rc_um, np.float64) / (px_um * cell_px)).astype(np.int64)
        ok = (rc[:, 0] >= 0) & (rc[:, 0] < gh) & (rc[:, 1] >= 0) & (rc[:, 1] < gw)
        np.add.at(density, (rc[ok, 0], rc[ok, 1]), 1.0)
        from scipy.ndimage import gaussian_filter

        density = gaussian_filter(density, sigma=1.0, mode="constant")
    top = float(density.max())
    density = density / top if top > 0 else density
    up = np.asarray(
        Image.fromarray(density).resize((round(gw * cell_px), round(gh * cell_px)), Image.Resampling.BILINEAR),
        np.float32,
    )[:sh, :sw]
    up = np.pad(up, ((0, sh - up.shape[0]), (0, sw - up.shape[1])))
    alpha = np.clip(up * 4.0, 0.0, 0.8)[..., None]  # faint where sparse, opaque where dense
    panel2 = (grey * (1 - alpha) + _heat_rgb(up) * alpha).astype(np.uint8)
    canvas.paste(Image.fromarray(panel2), (PANEL_PX, 0))

    # panel 3: full-resolution crop with outlines
    if crop_rgb is not None and crop_rgb.size:
        crop = Image.fromarray(np.ascontiguousarray(crop_rgb, dtype=np.uint8))
        cscale = PANEL_PX / max(crop.size)
        crop = crop.resize((round(crop.size[0] * cscale), round(crop.size[1] * cscale)), Image.Resampling.NEAREST)
        draw = ImageDraw.Draw(crop)
        for ring in crop_rings_rc:
            pts = [(float(c) * cscale, float(r) * cscale) for r, c in np.asarray(ring)]
            if len(pts) >= 2:
                draw.line(pts + [pts[0]], fill=OUTLINE_RGB, width=1)
        canvas.paste(crop, (2 * PANEL_PX, 0))

    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i, title in enumerate(("tissue outline", "nucleus density", "densest chunk, full resolution")):
        x0, y0, x1, y1 = draw.textbbox((i * PANEL_PX + 6, 4), title, font=font)
        draw.rectangle((x0 - 3, y0 - 2, x1 + 3, y1 + 2), fill=(255, 255, 255))
        draw.text((i * PANEL_PX + 6, 4), title, fill=(0, 0, 0), font=font)
    draw.text((6, PANEL_PX + 8), caption.encode("ascii", "replace").decode(), fill=(0, 0, 0), font=font)
    return canvas


def save_png_atomic(img: Image.Image, path: str | os.PathLike) -> Path:
    """Save ``img`` as PNG (no metadata chunks, deterministic bytes) via temp + rename."""
    path = Path(path)
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG", optimize=False, compress_level=6))
    return path


THUMB_MAX_PX = 2048  # the thumbnail is read from the first pyramid level at most this large


def _thumbnail(group, attrs: dict) -> tuple[np.ndarray, np.ndarray | None, float]:
    """RGB thumbnail, tissue mask (same grid) and its µm/px, from the store's pyramid."""
    mpp = float(attrs["mpp"])
    n_levels = int(attrs.get("pyramid_levels", 1))
    level = n_levels - 1
    for k in range(n_levels):
        if max(group[str(k)].shape[1:]) <= THUMB_MAX_PX:
            level = k
            break
    arr = group[str(level)]
    step = max(1, -(-max(arr.shape[1:]) // THUMB_MAX_PX))
    thumb = np.moveaxis(np.asarray(arr[:, ::step, ::step]), 0, -1)
    mask = None
    try:
        lab = group["labels/tissue"][str(level)]
        mask = np.asarray(lab[0, ::step, ::step]) > 0
    except KeyError:
        pass
    return thumb, mask, mpp * 2**level * step


def densest_chunk(table, tissue_chunks) -> tuple[int, int] | None:
    """Tissue chunk holding the most nuclei (ties: smallest (row, col)); ``None`` if no tissue."""
    if table.num_rows:
        rc = np.stack([table["chunk_row"].to_numpy(), table["chunk_col"].to_numpy()], axis=1).astype(np.int64)
        uniq, counts = np.unique(rc, axis=0, return_counts=True)  # sorted by (row, col)
        best = uniq[int(np.argmax(counts))]
        return int(best[0]), int(best[1])
    if tissue_chunks:
        return tuple(int(v) for v in sorted(tuple(rc) for rc in tissue_chunks)[0])
    return None


def qc_image(group, attrs: dict, table, path: str | os.PathLike, *, caption: str = "") -> Path:
    """Write the QC PNG of a segmented slide.

    Parameters
    ----------
    group : zarr.Group
        Tile store root (:func:`pipeline.store.open_store`).
    attrs : dict
        Its ``cellsam`` attributes.
    table : pyarrow.Table
        Final nuclei (``anchor_y_px``, ``anchor_x_px``, ``chunk_row``, ``chunk_col``, ``geometry``
        WKB in store px).
    path : path
        Output PNG (written atomically).
    caption : str
        Text line under the panels.
    """
    from .geometry import from_wkb
    from .store import read_window

    mpp = float(attrs["mpp"])
    thumb, mask, thumb_mpp = _thumbnail(group, attrs)
    if table.num_rows:
        anchors_um = np.stack([table["anchor_y_px"].to_numpy(), table["anchor_x_px"].to_numpy()], axis=1) * mpp
    else:
        anchors_um = np.zeros((0, 2))
    crop, rings = None, []
    best = densest_chunk(table, attrs.get("tissue_chunks", []))
    if best is not None:
        chunk_px = int(attrs["chunk_px"])
        H, W = (int(v) for v in attrs["shape_rc"])
        side = min(CROP_PX, chunk_px)
        r0 = best[0] * chunk_px + (min(chunk_px, H - best[0] * chunk_px) - side) // 2
        c0 = best[1] * chunk_px + (min(chunk_px, W - best[1] * chunk_px) - side) // 2
        crop = read_window(group, r0, c0, side, side)
        if table.num_rows:
            ay, ax = table["anchor_y_px"].to_numpy(), table["anchor_x_px"].to_numpy()
            near = np.flatnonzero((ay >= r0 - side) & (ay < r0 + 2 * side) & (ax >= c0 - side) & (ax < c0 + 2 * side))
            if len(near):
                import shapely

                geoms = from_wkb(table["geometry"].take(near))
                box = shapely.box(c0, r0, c0 + side, r0 + side)
                for g in geoms[shapely.intersects(geoms, box)]:
                    xy = np.asarray(g.exterior.coords)
                    rings.append(np.stack([xy[:, 1] - r0, xy[:, 0] - c0], axis=1))
    img = render_qc(thumb, thumb_mpp, mask, anchors_um, crop, rings, caption)
    return save_png_atomic(img, path)
