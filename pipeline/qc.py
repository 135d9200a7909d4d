"""Quality-control image of a segmented slide (``<slide_id>.qc.png``).

Layout (one RGB PNG, white background)::

    +----------------------+----------------------+----------------------+
    | title                | title                | title                |
    +----------------------+----------------------+----------------------+
    | thumbnail + tissue   | nucleus density      | full-resolution crop |
    | outline (green)      | heatmap over the     | of a representative  |
    | + scale bar          | thumbnail            | chunk + outlines     |
    |                      |                      | + scale bar          |
    +----------------------+----------------------+----------------------+
    | key: tissue outline  | colour bar 0..max    | key: nucleus outline |
    |                      | nuclei/mm2           |                      |
    +----------------------+----------------------+----------------------+
    | one line of text: slide id, nuclei, tissue area, density, model    |
    +--------------------------------------------------------------------+

Tissue blocks whose image is soft (out of focus, or coarser than the model's µm/px;
:mod:`pipeline.focus`) are hatched in :data:`SOFT_RGB` on the thumbnail, with a key entry: nuclei
there are under-detected.

A model that rejects adds, when it removed anything outside the crop's chunk, a fourth panel: the
chunk where it removed most, with the removed objects dotted (:data:`REJECTED_RGB`), the place a
reviewer should look first (the crop draws them dotted too).

The crop is the tissue chunk of median nucleus count among the chunks holding nuclei that are
mostly tissue (:func:`representative_chunk`): the densest chunk is often not representative (it is
where false positives pile up, if any do). The crop window is centred on the mean position of that
chunk's nuclei, so it shows nuclei rather than the chunk's empty half.

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
TITLE_PX = 22  # height of the title band above the panels
KEY_PX = 30  # height of the key band under the panels
SCALE_BAR_UM = (10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)  # scale bar lengths to choose from
DENSITY_BINS = 48  # density grid cells along the longer side of the thumbnail
TISSUE_RGB = (0, 170, 0)
OUTLINE_RGB = (0, 90, 255)
REJECTED_RGB = (235, 235, 235)  # dotted: what a model that rejects removed as "not a nucleus"
REJECTED_LABEL = "not a nucleus"
SOFT_RGB = (255, 140, 0)  # hatching of the soft (out-of-focus / low-resolution) tissue blocks


def _fit(img: Image.Image, size: int) -> tuple[Image.Image, float]:
    """Resize ``img`` to fit a ``size`` square (aspect kept); return it and the scale used."""
    sw, sh, scale = _fit_size(*img.size, size)
    return img.resize((sw, sh), Image.Resampling.BILINEAR), scale


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


def _fit_size(w: int, h: int, size: int) -> tuple[int, int, float]:
    scale = size / max(w, h, 1)
    return max(1, round(w * scale)), max(1, round(h * scale)), scale


def _cell_px(sw: int, sh: int) -> float:
    return max(4.0, max(sw, sh) / DENSITY_BINS)  # panel px per density bin


def density_layout(thumb_hw: tuple[int, int], thumb_mpp: float) -> tuple[int, int, float]:
    """Density grid of the QC figure for a thumbnail: ``(rows, cols, bin edge in µm)``."""
    sw, sh, scale = _fit_size(int(thumb_hw[1]), int(thumb_hw[0]), PANEL_PX)
    cell_px = _cell_px(sw, sh)
    return int(np.ceil(sh / cell_px)), int(np.ceil(sw / cell_px)), thumb_mpp / scale * cell_px


def bin_anchors(anchors_rc_um: np.ndarray, layout: tuple[int, int, float]) -> np.ndarray:
    """Count nucleus anchors (row, col; µm from the store origin, shape (N, 2)) per density bin.

    Returns float32 counts of shape ``layout[:2]`` (:func:`density_layout`); anchors outside the
    grid are ignored. Counts of several batches add up to the counts of their union.
    """
    gh, gw, bin_um = layout
    density = np.zeros((gh, gw), np.float32)
    if len(anchors_rc_um):
        rc = np.floor(np.asarray(anchors_rc_um, np.float64) / bin_um).astype(np.int64)
        ok = (rc[:, 0] >= 0) & (rc[:, 0] < gh) & (rc[:, 1] >= 0) & (rc[:, 1] < gw)
        np.add.at(density, (rc[ok, 0], rc[ok, 1]), 1.0)
    return density


def _scale_bar(draw, x0: int, y1: int, px_per_um: float, panel_px: int, font) -> None:
    """Black-on-white scale bar at the bottom-left of a panel: the longest of :data:`SCALE_BAR_UM`
    that fits in a quarter of the panel."""
    if not px_per_um > 0:
        return
    fits = [um for um in SCALE_BAR_UM if um * px_per_um <= panel_px / 4]
    if not fits:
        return
    um = fits[-1]
    length = round(um * px_per_um)
    label = f"{um} um" if um < 1000 else f"{um // 1000} mm"
    tx0, ty0, tx1, ty1 = draw.textbbox((0, 0), label, font=font)
    bx, by = x0 + 10, y1 - 12
    draw.rectangle((bx - 4, by - (ty1 - ty0) - 8, bx + max(length, tx1 - tx0) + 4, by + 6), fill=(255, 255, 255))
    draw.rectangle((bx, by, bx + length, by + 3), fill=(0, 0, 0))
    draw.text((bx, by - (ty1 - ty0) - 4), label, fill=(0, 0, 0), font=font)


def render_qc(
    thumb_rgb: np.ndarray,
    thumb_mpp: float,
    tissue_mask: np.ndarray | None,
    density_counts: np.ndarray,
    crop_rgb: np.ndarray | None,
    crop_rings_rc: Sequence[np.ndarray],
    caption: str,
    crop_mpp: float | None = None,
    crop_title: str = "representative chunk, full resolution",
    ring_rgb: Sequence[tuple[int, int, int]] | None = None,
    legend: Sequence[tuple[str, tuple[int, int, int]]] | None = None,
    rejected_rings_rc: Sequence[np.ndarray] = (),
    removed_crop: dict | None = None,
    soft_mask: np.ndarray | None = None,
    soft_label: str = "soft: out of focus / low resolution",
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
    density_counts : ndarray of shape :func:`density_layout` ``[:2]``, float32
        Nuclei per density bin (:func:`bin_anchors`).
    crop_rgb : ndarray of shape (h, w, 3), uint8, optional
        Full-resolution crop; ``None`` draws an empty panel.
    crop_rings_rc : sequence of ndarray of shape (M, 2), float
        Nucleus outlines (row, col) in crop pixels.
    caption : str
        One line of text under the panels (ASCII; other characters become "?").
    crop_mpp : float, optional
        µm/px of the crop (for its scale bar; none without it).
    crop_title : str
        Title of the crop panel.
    ring_rgb : sequence of (int, int, int), optional
        Colour of each ring of ``crop_rings_rc`` (nucleus class colours of a typed model);
        default :data:`OUTLINE_RGB` for all.
    legend : sequence of (str, (int, int, int)), optional
        Class names and colours for the crop's key (typed model); default one "nucleus outline" entry.
    rejected_rings_rc : sequence of ndarray of shape (M, 2), float
        Outlines (row, col, crop pixels) of what the model removed as "not a nucleus", drawn
        dotted in :data:`REJECTED_RGB` under the nuclei.
    removed_crop : dict, optional
        A fourth panel (a model that removed something): ``{"rgb", "rings_rc", "ring_rgb",
        "rejected_rings_rc", "title"}`` of the chunk where most was removed, drawn like the crop.
    soft_mask : ndarray of shape (h, w), bool, optional
        Soft tissue in the store frame at any resolution (resized to the thumbnail), hatched in
        :data:`SOFT_RGB` on the thumbnail with a key entry ``soft_label``; nothing when None or empty.
    soft_label : str
        Key text of the hatching.

    Returns
    -------
    PIL.Image.Image
        RGB image of size (3 * PANEL_PX, TITLE_PX + PANEL_PX + KEY_PX + TEXT_PX); 4 * PANEL_PX
        wide with ``removed_crop``.
    """
    top = TITLE_PX
    n_panels = 4 if removed_crop is not None else 3
    canvas = Image.new("RGB", (n_panels * PANEL_PX, TITLE_PX + PANEL_PX + KEY_PX + TEXT_PX), (255, 255, 255))
    thumb = Image.fromarray(np.ascontiguousarray(thumb_rgb, dtype=np.uint8))
    small, scale = _fit(thumb, PANEL_PX)
    sw, sh = small.size

    # panel 1: thumbnail + tissue outline
    panel1 = np.asarray(small).copy()
    tissue_small = None
    if tissue_mask is not None and tissue_mask.size:
        mask_img = Image.fromarray(tissue_mask.astype(np.uint8) * 255).resize((sw, sh), Image.Resampling.NEAREST)
        tissue_small = np.asarray(mask_img) > 127
        outline = _mask_outline(tissue_small)
        panel1[outline] = TISSUE_RGB
    hatched = soft_mask is not None and bool(np.any(soft_mask))
    if hatched:
        soft = np.asarray(Image.fromarray(np.asarray(soft_mask, np.uint8) * 255).resize((sw, sh), Image.Resampling.NEAREST)) > 127
        if tissue_small is not None:
            soft &= tissue_small  # the tissue of a soft block, not the glass beside it
        rr, cc = np.mgrid[:sh, :sw]
        panel1[soft & ((rr + cc) % 6 < 2)] = SOFT_RGB
        panel1[_mask_outline(soft)] = SOFT_RGB
    canvas.paste(Image.fromarray(panel1), (0, top))

    # panel 2: nucleus density (anchors binned on a coarse grid, smoothed) over the grey thumbnail
    grey = np.asarray(small.convert("L"), np.float32)[..., None].repeat(3, axis=2)
    gh, gw, _ = density_layout(thumb_rgb.shape[:2], thumb_mpp)
    cell_px = _cell_px(sw, sh)
    density = np.asarray(density_counts, np.float32).reshape(gh, gw)
    if density.any():
        from scipy.ndimage import gaussian_filter

        density = gaussian_filter(density, sigma=1.0, mode="constant")
    peak = float(density.max())
    density = density / peak if peak > 0 else density
    up = np.asarray(
        Image.fromarray(density).resize((round(gw * cell_px), round(gh * cell_px)), Image.Resampling.BILINEAR),
        np.float32,
    )[:sh, :sw]
    up = np.pad(up, ((0, sh - up.shape[0]), (0, sw - up.shape[1])))
    alpha = np.clip(up * 4.0, 0.0, 0.8)[..., None]  # faint where sparse, opaque where dense
    panel2 = (grey * (1 - alpha) + _heat_rgb(up) * alpha).astype(np.uint8)
    canvas.paste(Image.fromarray(panel2), (PANEL_PX, top))

    # panel 3: full-resolution crop with outlines (panel 4: where most was removed)
    cscale = None
    if crop_rgb is not None and crop_rgb.size:
        crop, cscale = _crop_panel(crop_rgb, crop_rings_rc, ring_rgb, rejected_rings_rc)
        canvas.paste(crop, (2 * PANEL_PX, top))
    rscale = None
    if removed_crop is not None and removed_crop["rgb"] is not None and removed_crop["rgb"].size:
        crop, rscale = _crop_panel(removed_crop["rgb"], removed_crop["rings_rc"], removed_crop["ring_rgb"],
                                   removed_crop["rejected_rings_rc"])
        canvas.paste(crop, (3 * PANEL_PX, top))

    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    # titles in their own band, one per panel, with a gap between panels
    titles = ["thumbnail, tissue outline", "nucleus density", crop_title]
    if removed_crop is not None:
        titles.append(removed_crop["title"])
    for i, title in enumerate(titles):
        draw.text((i * PANEL_PX + 8, 5), title, fill=(0, 0, 0), font=font)
    for i in range(1, n_panels):
        draw.line((i * PANEL_PX, 0, i * PANEL_PX, top + PANEL_PX), fill=(255, 255, 255), width=3)
    # scale bars: thumbnail (panel px per µm = scale / thumb_mpp) and crop
    _scale_bar(draw, 0, top + sh, scale / thumb_mpp, PANEL_PX, font)
    if cscale is not None and crop_mpp:
        _scale_bar(draw, 2 * PANEL_PX, top + PANEL_PX, cscale / crop_mpp, PANEL_PX, font)
    if rscale is not None and crop_mpp:
        _scale_bar(draw, 3 * PANEL_PX, top + PANEL_PX, rscale / crop_mpp, PANEL_PX, font)
        x = 3 * PANEL_PX + 8
        for k in range(0, 16, 4):  # a dotted swatch, as drawn
            draw.line((x + k, top + PANEL_PX + 12, x + k + 2, top + PANEL_PX + 12), fill=(110, 110, 110), width=2)
        draw.text((x + 22, top + PANEL_PX + 6), "dotted: removed as not a nucleus (rejected/)", fill=(0, 0, 0),
                  font=font)
    # key band: what the colours mean
    ky = top + PANEL_PX + 8
    draw.rectangle((8, ky + 2, 26, ky + 6), fill=TISSUE_RGB)
    draw.text((32, ky - 2), "tissue outline (tissue mask)", fill=(0, 0, 0), font=font)
    if hatched:
        sx = 206
        for k in range(0, 18, 6):  # a hatched swatch, as drawn
            draw.line((sx + k, ky + 8, sx + k + 4, ky), fill=SOFT_RGB, width=2)
        draw.text((sx + 24, ky - 2), soft_label.encode("ascii", "replace").decode()[:46], fill=(0, 0, 0), font=font)
    bin_um = density_layout(thumb_rgb.shape[:2], thumb_mpp)[2]
    peak_mm2 = peak / (bin_um * bin_um) * 1e6 if peak > 0 else 0.0
    bar_x0, bar_w = PANEL_PX + 40, PANEL_PX - 140
    ramp = _heat_rgb(np.linspace(0, 1, bar_w)[None, :].repeat(10, axis=0))
    canvas.paste(Image.fromarray(ramp), (bar_x0, ky))
    draw.text((bar_x0 - 12, ky), "0", fill=(0, 0, 0), font=font)
    draw.text((bar_x0 + bar_w + 6, ky), f"{peak_mm2:.0f} nuclei/mm2", fill=(0, 0, 0), font=font)
    if legend:  # typed model: one swatch per class, names under/after it, spread over the panel width
        step = PANEL_PX // max(len(legend), 1)
        for k, (name, rgb) in enumerate(legend):
            x = 2 * PANEL_PX + 8 + k * step
            light = sum(rgb) > 600  # a pale swatch (the dotted "not a nucleus") gets a grey border
            draw.rectangle((x, ky + 1, x + 14, ky + 7), fill=tuple(rgb), outline=(110, 110, 110) if light else None)
            draw.text((x + 18, ky - 2), str(name).encode("ascii", "replace").decode()[: max(1, (step - 22) // 6)],
                      fill=(0, 0, 0), font=font)
    else:
        draw.rectangle((2 * PANEL_PX + 8, ky + 2, 2 * PANEL_PX + 26, ky + 6), fill=OUTLINE_RGB)
        draw.text((2 * PANEL_PX + 32, ky - 2), "nucleus outline (final, after stitching)", fill=(0, 0, 0), font=font)
    draw.text((6, top + PANEL_PX + KEY_PX + 8), caption.encode("ascii", "replace").decode(), fill=(0, 0, 0), font=font)
    return canvas


def _crop_panel(crop_rgb, rings_rc, ring_rgb, rejected_rings_rc):
    """A full-resolution crop scaled to the panel, with nucleus outlines (class colours or
    :data:`OUTLINE_RGB`) over the dotted outlines of what was removed; returns (image, scale)."""
    crop = Image.fromarray(np.ascontiguousarray(crop_rgb, dtype=np.uint8))
    cscale = PANEL_PX / max(crop.size)
    crop = crop.resize((round(crop.size[0] * cscale), round(crop.size[1] * cscale)), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(crop)
    for ring in rejected_rings_rc:  # dotted: every other segment of the outline
        pts = [(float(c) * cscale, float(r) * cscale) for r, c in np.asarray(ring)]
        for a, b in zip(pts[0::2], pts[1::2]):
            draw.line([a, b], fill=REJECTED_RGB, width=2)
    for k, ring in enumerate(rings_rc):
        pts = [(float(c) * cscale, float(r) * cscale) for r, c in np.asarray(ring)]
        if len(pts) >= 2:
            rgb = tuple(ring_rgb[k]) if ring_rgb is not None else OUTLINE_RGB
            draw.line(pts + [pts[0]], fill=rgb, width=2 if ring_rgb is not None else 1)
    return crop, cscale


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


MIN_CROP_TISSUE_FRACTION = 0.6  # the QC crop is drawn from chunks at least this much tissue, where any exist


def representative_chunk(chunk_counts: dict, tissue_chunks, tissue_fraction: dict | None = None) -> tuple[int, int] | None:
    """Chunk of median nucleus count among the chunks holding nuclei (the lower median, ties:
    smallest (row, col)); else the first tissue chunk; else ``None``.

    ``chunk_counts``: (chunk_row, chunk_col) -> nuclei. ``tissue_fraction``: (chunk_row,
    chunk_col) -> tissue fraction of the chunk (0..1); when given, only chunks with at least
    :data:`MIN_CROP_TISSUE_FRACTION` tissue compete (if any do), so the crop is not half
    background at the tissue's edge.
    """
    if chunk_counts:
        ranked = sorted((n, tuple(rc)) for rc, n in chunk_counts.items() if n > 0)
        if tissue_fraction:
            full = [(n, rc) for n, rc in ranked if tissue_fraction.get(rc, 0.0) >= MIN_CROP_TISSUE_FRACTION]
            ranked = full or ranked
        if ranked:
            return ranked[(len(ranked) - 1) // 2][1]
    if tissue_chunks:
        return tuple(int(v) for v in sorted(tuple(rc) for rc in tissue_chunks)[0])
    return None


class QCAccumulator:
    """Collects what the QC figure needs from final nuclei given strip by strip (bounded memory).

    :meth:`add` bins anchors into the density grid and counts nuclei per chunk; :meth:`write`
    picks the representative chunk (:func:`representative_chunk`), reads its crop from the store and draws the outlines of the nuclei
    that ``outlines(chunk_rc, crop)`` returns (store-px polygons near the crop, see :meth:`write`).
    """

    def __init__(self, group, attrs: dict):
        self.group, self.attrs = group, attrs
        self.mpp = float(attrs["mpp"])
        self.thumb, self.mask, self.thumb_mpp = _thumbnail(group, attrs)
        self.layout = density_layout(self.thumb.shape[:2], self.thumb_mpp)
        self.density = np.zeros(self.layout[:2], np.float32)
        self.chunk_counts: dict = {}
        self.chunk_anchor_sums: dict = {}  # (chunk_row, chunk_col) -> [sum of anchor y, x] store px
        self.rejected_counts: dict = {}  # the same for what a model that rejects removed (add_rejected)
        self.rejected_anchor_sums: dict = {}
        self.soft_mask: np.ndarray | None = None  # thumbnail frame (set_focus)
        self.soft_label = ""

    def set_focus(self, focus: dict, summary: dict) -> None:
        """Rasterise the soft blocks of :attr:`pipeline.assemble.ChunkScan.focus` (sharpness below
        ``summary["soft_below"]``, the export's ``summary["focus"]``) onto the thumbnail grid for the
        hatching of :meth:`write`; the key gives ``summary["soft_fraction"]``."""
        chunk_px = int(self.attrs["chunk_px"])
        f = self.mpp / self.thumb_mpp  # thumbnail px per store px
        mask = np.zeros(self.thumb.shape[:2], bool)
        for (r, c), (er, ec, vals) in focus.items():
            for i, j in zip(*np.nonzero(vals < summary["soft_below"])):
                r0, r1 = (r * chunk_px + er[i]) * f, (r * chunk_px + er[i + 1]) * f
                c0, c1 = (c * chunk_px + ec[j]) * f, (c * chunk_px + ec[j + 1]) * f
                mask[int(np.floor(r0)):max(int(np.ceil(r1)), int(np.floor(r0)) + 1),
                     int(np.floor(c0)):max(int(np.ceil(c1)), int(np.floor(c0)) + 1)] = True
        self.soft_mask = mask if summary["soft_blocks"] else None
        pct = 100.0 * (summary["soft_fraction"] or 0.0)
        self.soft_label = f"soft focus / low resolution ({pct:.0f}% of tissue)"

    def add(self, table) -> None:
        """Add final nuclei (``anchor_y_px``, ``anchor_x_px``, ``chunk_row``, ``chunk_col``)."""
        if not table.num_rows:
            return
        anchors = np.stack([table["anchor_y_px"].to_numpy(), table["anchor_x_px"].to_numpy()], axis=1) * self.mpp
        self.density += bin_anchors(anchors, self.layout)
        self._count(table, self.chunk_counts, self.chunk_anchor_sums)

    def add_rejected(self, table) -> None:
        """Add instances removed as "not a nucleus" (same columns): not in the density, counted per
        chunk for the "most removed" panel of :meth:`write`."""
        if table.num_rows:
            self._count(table, self.rejected_counts, self.rejected_anchor_sums)

    @staticmethod
    def _count(table, counts: dict, sums: dict) -> None:
        rc = np.stack([table["chunk_row"].to_numpy(), table["chunk_col"].to_numpy()], axis=1).astype(np.int64)
        uniq, inv, n_rc = np.unique(rc, axis=0, return_inverse=True, return_counts=True)
        inv = inv.reshape(-1)
        ys = np.bincount(inv, table["anchor_y_px"].to_numpy(), minlength=len(uniq))
        xs = np.bincount(inv, table["anchor_x_px"].to_numpy(), minlength=len(uniq))
        for (r, c), n, y, x in zip(uniq.tolist(), n_rc.tolist(), ys.tolist(), xs.tolist()):
            counts[(r, c)] = counts.get((r, c), 0) + n
            acc = sums.setdefault((r, c), [0.0, 0.0])
            acc[0] += y
            acc[1] += x

    def _tissue_fractions(self) -> dict:
        return chunk_tissue_fractions(self.mask, self.thumb_mpp, self.mpp, int(self.attrs["chunk_px"]))

    def _window(self, chunk, n: int, sums) -> tuple[int, int, int]:
        """Crop ``(r0, c0, side)`` (store px) inside ``chunk``: centred on the mean anchor ``sums / n``
        of its objects when ``n``, else on the chunk; ``side = min(CROP_PX, chunk_px)``."""
        chunk_px = int(self.attrs["chunk_px"])
        H, W = (int(v) for v in self.attrs["shape_rc"])
        side = min(CROP_PX, chunk_px)
        r0 = chunk[0] * chunk_px + (min(chunk_px, H - chunk[0] * chunk_px) - side) // 2
        c0 = chunk[1] * chunk_px + (min(chunk_px, W - chunk[1] * chunk_px) - side) // 2
        if n:  # centred on the chunk's objects (their mean anchor), kept inside the chunk
            cy, cx = (v / n for v in sums)
            lo_r, lo_c = chunk[0] * chunk_px, chunk[1] * chunk_px
            hi_r = max(lo_r, min(lo_r + chunk_px, H) - side)
            hi_c = max(lo_c, min(lo_c + chunk_px, W) - side)
            r0 = int(np.clip(round(cy - side / 2), lo_r, hi_r))
            c0 = int(np.clip(round(cx - side / 2), lo_c, hi_c))
        return r0, c0, side

    def write(self, path: str | os.PathLike, outlines, *, caption: str = "", class_names=(),
              rejected=None) -> Path:
        """Render and write the PNG atomically.

        ``outlines(chunk_rc, (r0, c0, side))`` returns shapely polygons (store px) of the final
        nuclei near the crop ``[r0, r0 + side) x [c0, c0 + side)`` inside chunk ``chunk_rc`` (at
        least those of that chunk and its 8 neighbours); those intersecting the crop are drawn.
        With ``class_names`` (a typed model) it returns ``(polygons, class name per polygon)`` and
        outlines are drawn in the class colours (:class:`pipeline.data.classes.ClassVocabulary`)
        with a legend. ``rejected`` (a model that rejects) is the same kind of callable for the
        instances removed as "not a nucleus" (polygons only); they are drawn dotted, with a key entry,
        and when :meth:`add_rejected` saw any, a fourth panel shows the chunk where most were removed.
        """
        import shapely

        from .store import read_window

        colors, legend = {}, None
        if class_names:
            from .data.classes import ClassVocabulary

            vocab = ClassVocabulary.from_names(class_names)
            colors = dict(zip(vocab.names, vocab.colors))
            legend = list(colors.items()) + ([(REJECTED_LABEL, REJECTED_RGB)] if rejected is not None else [])

        def panel(chunk, counts, sums):
            """Crop of ``chunk`` centred on the mean anchor of ``counts``/``sums``, with its outlines."""
            r0, c0, side = self._window(chunk, counts.get(chunk, 0), sums.get(chunk))
            box = shapely.box(c0, r0, c0 + side, r0 + side)

            def crop_rings(geoms):
                geoms = np.asarray(geoms, dtype=object)
                hit = np.flatnonzero(shapely.intersects(geoms, box)) if len(geoms) else []
                return hit, [np.stack([xy[:, 1] - r0, xy[:, 0] - c0], axis=1)
                             for xy in (np.asarray(geoms[k].exterior.coords) for k in hit)]

            rings, ring_rgb, rejected_rings = [], [], []
            if self.chunk_counts:
                got = outlines(chunk, (r0, c0, side))
                geoms, names = (got if class_names else (got, None))
                hit, rings = crop_rings(geoms)
                if class_names:
                    ring_rgb = [colors.get(str(names[k]), OUTLINE_RGB) for k in hit]
            if rejected is not None:
                rejected_rings = crop_rings(rejected(chunk, (r0, c0, side)))[1]
            return {"rgb": read_window(self.group, r0, c0, side, side), "rings_rc": rings,
                    "ring_rgb": ring_rgb if class_names else None, "rejected_rings_rc": rejected_rings}

        main = {"rgb": None, "rings_rc": [], "ring_rgb": None, "rejected_rings_rc": []}
        best = representative_chunk(self.chunk_counts, self.attrs.get("tissue_chunks", []), self._tissue_fractions())
        if best is not None:
            main = panel(best, self.chunk_counts, self.chunk_anchor_sums)
        removed = None
        most = None
        if rejected is not None and self.rejected_counts:  # where most was removed (ties: first chunk)
            most = min(self.rejected_counts, key=lambda rc: (-self.rejected_counts[rc], rc))
        if most is not None and most != best:  # the same chunk as the crop: it shows them already
            removed = {**panel(most, self.rejected_counts, self.rejected_anchor_sums),
                       "title": f"most removed ({self.rejected_counts[most]} in its chunk), full resolution"}
        img = render_qc(self.thumb, self.thumb_mpp, self.mask, self.density, main["rgb"], main["rings_rc"], caption,
                        crop_mpp=self.mpp, ring_rgb=main["ring_rgb"], legend=legend,
                        rejected_rings_rc=main["rejected_rings_rc"], removed_crop=removed,
                        soft_mask=self.soft_mask, soft_label=self.soft_label,
                        crop_title="median-density chunk, full resolution" if self.chunk_counts else
                        "first tissue chunk, full resolution")
        return save_png_atomic(img, path)


def chunk_tissue_fractions(mask: np.ndarray | None, mask_mpp: float, store_mpp: float, chunk_px: int) -> dict:
    """Tissue fraction per store chunk ``(row, col) -> 0..1`` from a low-resolution tissue mask
    ``bool (h, w)`` at ``mask_mpp`` µm/px (the QC thumbnail's)."""
    if mask is None or not mask.size:
        return {}
    cell = chunk_px * store_mpp / mask_mpp  # chunk edge in mask pixels
    out = {}
    for r in range(int(np.ceil(mask.shape[0] / cell))):
        for c in range(int(np.ceil(mask.shape[1] / cell))):
            sub = mask[int(r * cell):max(int((r + 1) * cell), int(r * cell) + 1),
                       int(c * cell):max(int((c + 1) * cell), int(c * cell) + 1)]
            if sub.size:
                out[(r, c)] = float(sub.mean())
    return out


def model_label(info: dict | None) -> str:
    """Short model identity for the caption: weights file, mode, version, engine (not a class name)."""
    info = info or {}
    name = info.get("weights_file") or info.get("name") or "unknown model"
    if str(name).endswith(".pt"):
        name = str(name)[:-3]
    extra = [str(info[k]) for k in ("mode",) if info.get(k)]
    if info.get("version"):
        extra.append(f"v{info['version']}")
    if info.get("engine"):
        extra.append(str(info["engine"]))
    return f"{name} ({', '.join(extra)})" if extra else str(name)
