"""OME-Zarr (NGFF 0.4, Zarr v2) tile store of a slide at the model's µm/px.

Layout, axes, attributes and guarantees are documented in ``docs/store.md``. In short: the
store covers the slide's bounds region; store pixel ``(row, col)`` of level 0 is slide level-0
``(bounds_x + col * scale_x_l0, bounds_y + row * scale_y_l0)`` (QuPath's frame shifted by the
same scale). Only chunks touching tissue are written; absent chunks read as white (255).

Public API: :func:`write_store` (slide -> store), :func:`open_store` and :func:`read_window`
(used by the segmentation stage).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .config import StoreConfig, TissueConfig
from .errors import InputError, OutputError, StoreError
from .slide import SlideReader
from .testhooks import pause_point
from .tissue import chunks_touching_tissue, save_mask_png, tissue_area_mm2, tissue_mask

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
NGFF_VERSION = "0.4"

#: A slide coarser than the store's µm/px by more than this factor is refused (it would be
#: upsampled into a huge, blurry store); pass a larger ``--mpp`` or a correct ``--slide-mpp``.
MAX_UPSAMPLE = 2.0

_AXES = [
    {"name": "c", "type": "channel"},
    {"name": "y", "type": "space", "unit": "micrometer"},
    {"name": "x", "type": "space", "unit": "micrometer"},
]
_TISSUE_RGBA = [0, 200, 0, 128]


def _fix_malloc_mmap_threshold(threshold_bytes: int = 1 << 20) -> None:
    """On glibc, serve allocations >= 1 MiB by mmap (returned to the OS on free).

    glibc raises its mmap threshold dynamically after large frees, after which multi-MB chunk
    buffers come from per-thread heaps and fragment them: peak RSS then creeps up with the
    number of chunks. A fixed threshold keeps the tiler's memory flat. Harmless elsewhere.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, int(threshold_bytes))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def level_shapes(shape_rc: tuple[int, int], n_levels: int) -> list[tuple[int, int]]:
    """``(rows, cols)`` of each pyramid level: level ``k`` is ``ceil(level_0 / 2**k)``."""
    rows, cols = shape_rc
    return [(-(-rows // 2**k), -(-cols // 2**k)) for k in range(n_levels)]


def store_geometry(slide: SlideReader, cfg: StoreConfig) -> dict:
    """Store level-0 shape and the level-0 slide pixels per store pixel.

    Returns
    -------
    dict
        ``shape_rc`` ``[rows, cols]``, ``scale_x_l0``, ``scale_y_l0``.

    Raises
    ------
    InputError
        If the slide is coarser than ``cfg.mpp`` by more than :data:`MAX_UPSAMPLE`.
    """
    coarse = max(slide.mpp_x, slide.mpp_y)
    if coarse > cfg.mpp * MAX_UPSAMPLE:
        raise InputError(
            f"{slide.path}: slide is {coarse:.4g} µm/px, more than {MAX_UPSAMPLE:g}x coarser than the store's "
            f"{cfg.mpp:g} µm/px; pass a larger --mpp or a correct --slide-mpp"
        )
    _, _, bw, bh = slide.bounds_l0
    rows = max(1, round(bh * slide.mpp_y / cfg.mpp))
    cols = max(1, round(bw * slide.mpp_x / cfg.mpp))
    return {"shape_rc": [rows, cols], "scale_x_l0": cfg.mpp / slide.mpp_x, "scale_y_l0": cfg.mpp / slide.mpp_y}


def _multiscales(name: str, mpp: float, n_levels: int) -> list[dict]:
    return [
        {
            "version": NGFF_VERSION,
            "name": name,
            "axes": _AXES,
            "datasets": [
                {"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": [1.0, mpp * 2**k, mpp * 2**k]}]}
                for k in range(n_levels)
            ],
            "type": "mean",
            "metadata": {"description": "level k = 2x2 mean of level k-1 (edge-replicated at odd borders)"},
        }
    ]


def _omero(name: str) -> dict:
    window = {"start": 0, "end": 255, "min": 0, "max": 255}
    return {
        "version": NGFF_VERSION,
        "name": name,
        "rdefs": {"model": "color"},
        "channels": [
            {"label": lab, "color": col, "window": window, "active": True, "coefficient": 1.0, "family": "linear", "inverted": False}
            for lab, col in (("R", "FF0000"), ("G", "00FF00"), ("B", "0000FF"))
        ],
    }


def _chunk_box(r: int, c: int, chunk_px: int, shape_rc) -> tuple[int, int, int, int]:
    r0, c0 = r * chunk_px, c * chunk_px
    return r0, c0, min(chunk_px, shape_rc[0] - r0), min(chunk_px, shape_rc[1] - c0)


def _downsample2(block: np.ndarray) -> np.ndarray:
    """2x2 mean of ``uint8 (C, H, W)`` (odd H/W edge-replicated), rounded half up."""
    _, h, w = block.shape
    if h % 2 or w % 2:
        block = np.pad(block, ((0, 0), (0, h % 2), (0, w % 2)), mode="edge")
    b = block.astype(np.uint16)
    out = (b[:, 0::2, 0::2] + b[:, 1::2, 0::2] + b[:, 0::2, 1::2] + b[:, 1::2, 1::2] + 2) // 4
    return out.astype(np.uint8)


def _label_block(mask: np.ndarray, f: float, r0: int, c0: int, h: int, w: int) -> np.ndarray:
    """Nearest-neighbour lookup of ``mask`` for store pixels; ``f`` = thumbnail px per store px."""
    ri = np.minimum(((np.arange(r0, r0 + h) + 0.5) * f).astype(np.int64), mask.shape[0] - 1)
    ci = np.minimum(((np.arange(c0, c0 + w) + 0.5) * f).astype(np.int64), mask.shape[1] - 1)
    return mask[np.ix_(ri, ci)].astype(np.uint8)[None]


def _looks_like_store(path: Path) -> bool:
    return (path / ".zgroup").is_file() or (path.is_dir() and not any(path.iterdir()))


def _existing_matches(out: Path, want: dict) -> bool:
    try:
        attrs = json.loads((out / ".zattrs").read_text()).get("cellsam", {})
    except (OSError, ValueError):
        return False
    keys = ("schema_version", "source_sha256", "mpp", "chunk_px", "pyramid_levels", "slide_mpp_x", "slide_mpp_y", "tissue_config")
    return bool(attrs.get("complete")) and all(attrs.get(k) == want[k] for k in keys)


def _remove_stale_tmps(out: Path) -> None:
    for tmp in out.parent.glob(f"{out.name}.tmp-*"):
        try:
            pid = int(tmp.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if pid != os.getpid():
            try:
                os.kill(pid, 0)
                continue  # still running (another writer)
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        shutil.rmtree(tmp, ignore_errors=True)


def _discard_tree(path: Path, attempts: int = 20) -> None:
    """Remove a failed temp store, also after writes still in flight when the error surfaced.

    zarr runs metadata writes concurrently on its own event loop; when one fails (e.g. disk full)
    the others may still land after a first ``rmtree`` and recreate the directory.
    """
    for _ in range(attempts):
        shutil.rmtree(path, ignore_errors=True)
        time.sleep(0.05)
        if not path.exists():
            return


def write_store(
    slide: SlideReader,
    out_path: str | os.PathLike,
    cfg: StoreConfig = StoreConfig(),
    tissue_cfg: TissueConfig = TissueConfig(),
    slide_id: str | None = None,
    *,
    tissue_png: str | os.PathLike | None = None,
) -> Path:
    """Write (or reuse) the OME-Zarr tile store of ``slide``.

    Parameters
    ----------
    slide : SlideReader
    out_path : str or PathLike
        Store directory (e.g. ``S.ome.zarr``). Written as ``<out>.tmp-<pid>`` and renamed.
    cfg : StoreConfig
        Target µm/px, chunk edge, number of levels, worker threads.
    tissue_cfg : TissueConfig
    slide_id : str, optional
        Recorded in the attributes (default: the slide file name stem).
    tissue_png : str or PathLike, optional
        Where to write the tissue-mask preview PNG (none if omitted).

    Returns
    -------
    Path
        ``out_path``.

    Raises
    ------
    OutputError
        If the output cannot be created, or exists and is not a tile store.
    SlideReadError
        If the slide cannot be read.
    InputError
        If the slide is much coarser than ``cfg.mpp``.
    """
    import zarr
    from numcodecs import Blosc

    out = Path(out_path)
    if slide_id is None:
        slide_id = slide.path.stem
    geom = store_geometry(slide, cfg)
    shape_rc = tuple(geom["shape_rc"])
    want = {
        "schema_version": SCHEMA_VERSION,
        "source_sha256": slide.sha256,
        "mpp": cfg.mpp,
        "chunk_px": cfg.chunk_px,
        "pyramid_levels": cfg.pyramid_levels,
        "slide_mpp_x": slide.mpp_x,
        "slide_mpp_y": slide.mpp_y,
        "tissue_config": asdict(tissue_cfg),
    }
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out}: cannot create output directory {out.parent}: {exc.strerror or exc}") from exc
    if out.exists() or out.is_symlink():
        if not out.is_dir() or not _looks_like_store(out):
            raise OutputError(f"{out}: exists and is not a tile store; refusing to replace it")
        if _existing_matches(out, want):
            log.info("store up to date: %s", out)
            if tissue_png is not None and not Path(tissue_png).exists():
                thumb_mpp = max(tissue_cfg.thumb_mpp, slide.mpp_x, slide.mpp_y)
                save_mask_png(tissue_mask(slide.thumbnail(thumb_mpp), thumb_mpp, tissue_cfg), tissue_png)
            return out
    try:
        _remove_stale_tmps(out)
    except OSError:
        pass
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    t_start = time.perf_counter()
    _fix_malloc_mmap_threshold()

    # tissue detection on a thumbnail of the bounds region
    thumb_mpp = max(tissue_cfg.thumb_mpp, slide.mpp_x, slide.mpp_y)
    thumb = slide.thumbnail(thumb_mpp)
    mask = tissue_mask(thumb, thumb_mpp, tissue_cfg)
    del thumb
    chunks0 = chunks_touching_tissue(mask, thumb_mpp, shape_rc, cfg.chunk_px, cfg.mpp)
    area_mm2 = tissue_area_mm2(mask, thumb_mpp)
    log.info(
        "%s: store %dx%d px at %g µm/px, %d tissue chunks of %d, tissue %.3f mm²",
        slide.path, shape_rc[1], shape_rc[0], cfg.mpp, len(chunks0),
        (-(-shape_rc[0] // cfg.chunk_px)) * (-(-shape_rc[1] // cfg.chunk_px)), area_mm2,
    )
    if tissue_png is not None:
        save_mask_png(mask, tissue_png)

    shapes = level_shapes(shape_rc, cfg.pyramid_levels)
    compressor = Blosc(cname="zstd", clevel=1, shuffle=Blosc.NOSHUFFLE)
    key_enc = {"name": "v2", "separator": "/"}
    bx, by, bw, bh = slide.bounds_l0
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        root = zarr.open_group(str(tmp), mode="w", zarr_format=2)
        images, labels = [], []
        lab_root = root.create_group("labels")
        lab_grp = lab_root.create_group("tissue")
        for k, (rows, cols) in enumerate(shapes):
            images.append(
                root.create_array(
                    str(k), shape=(3, rows, cols), chunks=(3, cfg.chunk_px, cfg.chunk_px), dtype="uint8",
                    fill_value=cfg.fill_value, compressors=compressor, chunk_key_encoding=key_enc,
                    config={"write_empty_chunks": False},
                )
            )
            labels.append(
                lab_grp.create_array(
                    str(k), shape=(1, rows, cols), chunks=(1, cfg.chunk_px, cfg.chunk_px), dtype="uint8",
                    fill_value=0, compressors=compressor, chunk_key_encoding=key_enc,
                    config={"write_empty_chunks": False},
                )
            )
        sx, sy = geom["scale_x_l0"], geom["scale_y_l0"]
        f0 = cfg.mpp / thumb_mpp

        def write_level0(rc):
            r0, c0, h, w = _chunk_box(rc[0], rc[1], cfg.chunk_px, shape_rc)
            rgb = slide.read_at_mpp(bx + c0 * sx, by + r0 * sy, w, h, cfg.mpp)
            images[0][:, r0 : r0 + h, c0 : c0 + w] = np.ascontiguousarray(np.moveaxis(rgb, -1, 0))
            lab = _label_block(mask, f0, r0, c0, h, w)
            if lab.any():
                labels[0][:, r0 : r0 + h, c0 : c0 + w] = lab

        def make_down(k):
            def write_down(rc):
                r0, c0, h, w = _chunk_box(rc[0], rc[1], cfg.chunk_px, shapes[k])
                prow, pcol = shapes[k - 1]
                parent = images[k - 1][:, 2 * r0 : min(2 * (r0 + h), prow), 2 * c0 : min(2 * (c0 + w), pcol)]
                down = _downsample2(np.asarray(parent))[:, :h, :w]
                images[k][:, r0 : r0 + h, c0 : c0 + w] = np.ascontiguousarray(down)
                lab = _label_block(mask, f0 * 2**k, r0, c0, h, w)
                if lab.any():
                    labels[k][:, r0 : r0 + h, c0 : c0 + w] = lab

            return write_down

        chunk_sets = [chunks0]
        for k in range(1, len(shapes)):
            chunk_sets.append(sorted({(r // 2, c // 2) for r, c in chunk_sets[-1]}))
        from .progress import Progress  # a bar on a terminal, a line per 10 % in logs

        with ThreadPoolExecutor(max_workers=cfg.workers) as pool, \
                Progress(sum(len(c) for c in chunk_sets), "tile", "chunk") as bar:
            for _ in pool.map(write_level0, chunks0):
                bar.update()
            pause_point("tile")  # crash tests only (pipeline.testhooks)
            for k in range(1, len(shapes)):
                for _ in pool.map(make_down(k), chunk_sets[k]):
                    bar.update()

        lab_root.attrs.update({"labels": ["tissue"]})
        lab_grp.attrs.update(
            {
                "multiscales": _multiscales("tissue", cfg.mpp, len(shapes)),
                "image-label": {
                    "version": NGFF_VERSION,
                    "colors": [{"label-value": 1, "rgba": _TISSUE_RGBA}],
                    "properties": [{"label-value": 1, "name": "tissue"}],
                    "source": {"image": "../../"},
                },
            }
        )
        cellsam = {
            "schema_version": SCHEMA_VERSION,
            "slide_id": slide_id,
            "source_path": str(slide.path.resolve()) if slide.path.exists() else str(slide.path),
            "source_sha256": slide.sha256,
            "mpp": cfg.mpp,
            "slide_mpp_x": slide.mpp_x,
            "slide_mpp_y": slide.mpp_y,
            "slide_dimensions_l0": list(slide.dimensions_l0),
            "bounds_l0": [bx, by, bw, bh],
            "scale_x_l0": sx,
            "scale_y_l0": sy,
            "shape_rc": list(shape_rc),
            "chunk_px": cfg.chunk_px,
            "pyramid_levels": len(shapes),
            "tissue_area_mm2": area_mm2,
            "tissue_thumb_mpp": thumb_mpp,
            "tissue_config": asdict(tissue_cfg),
            "tissue_chunks": [list(rc) for rc in chunks0],
            "objective_power": slide.objective_power,
            "complete": True,
        }
        root.attrs.update(
            {"multiscales": _multiscales(slide_id, cfg.mpp, len(shapes)), "omero": _omero(slide_id), "cellsam": cellsam}
        )
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except OSError as exc:
        _discard_tree(tmp)
        where = exc.filename or tmp
        raise OutputError(f"{out}: cannot write tile store ({where}): {exc.strerror or exc}") from exc
    except BaseException:
        _discard_tree(tmp)
        raise
    log.info("wrote %s in %.1f s", out, time.perf_counter() - t_start)
    return out


def open_store(path: str | os.PathLike):
    """Open a complete tile store read-only.

    Returns
    -------
    group : zarr.Group
        The root group (level arrays ``"0"``, ``"1"``, ...; ``labels/tissue``).
    attrs : dict
        The ``cellsam`` attributes (see ``docs/store.md``).

    Raises
    ------
    StoreError
        If ``path`` is not a store, is incomplete or has another schema version.
    """
    import zarr

    p = Path(path)
    if not (p / ".zgroup").is_file():
        raise StoreError(f"{p}: no tile store here; run `cellsam tile` first")
    try:
        group = zarr.open_group(str(p), mode="r", zarr_format=2)
        attrs = dict(group.attrs).get("cellsam")
    except Exception as exc:
        raise StoreError(f"{p}: unreadable tile store ({exc}); delete it and rerun `cellsam tile`") from exc
    if not isinstance(attrs, dict) or not attrs.get("complete"):
        raise StoreError(f"{p}: incomplete tile store; delete it and rerun `cellsam tile`")
    if attrs.get("schema_version") != SCHEMA_VERSION:
        raise StoreError(f"{p}: store schema_version {attrs.get('schema_version')} != {SCHEMA_VERSION}; rerun `cellsam tile`")
    return group, attrs


def read_window(group, row0: int, col0: int, height: int, width: int) -> np.ndarray:
    """Read a window of store level 0.

    Parameters
    ----------
    group : zarr.Group
        From :func:`open_store`.
    row0, col0 : int
        Top-left in store level-0 pixels; may be negative or beyond the image.
    height, width : int
        Window size in pixels.

    Returns
    -------
    ndarray of shape (height, width, 3), dtype uint8
        RGB; pixels outside the image are white (255), as are absent (non-tissue) chunks.
    """
    return np.ascontiguousarray(np.moveaxis(_read_box(group["0"], row0, col0, height, width, 255), 0, -1))


def read_tissue_window(group, row0: int, col0: int, height: int, width: int) -> np.ndarray:
    """The tissue mask (``labels/tissue`` level 0) over a window: ``bool (height, width)``, False
    outside the image. Same window convention as :func:`read_window`."""
    return _read_box(group["labels/tissue/0"], row0, col0, height, width, 0)[0] > 0


def _read_box(arr, row0: int, col0: int, height: int, width: int, fill: int) -> np.ndarray:
    """``(C, height, width)`` box of a (C, rows, cols) array, ``fill`` outside it."""
    n, rows, cols = arr.shape
    out = np.full((n, height, width), fill, arr.dtype)
    r0, c0 = max(row0, 0), max(col0, 0)
    r1, c1 = min(row0 + height, rows), min(col0 + width, cols)
    if r1 > r0 and c1 > c0:
        out[:, r0 - row0 : r1 - row0, c0 - col0 : c1 - col0] = np.asarray(arr[:, r0:r1, c0:c1])
    return out
