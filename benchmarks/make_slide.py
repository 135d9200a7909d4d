"""Large, realistic benchmark slides: pyramidal tiled TIFFs assembled from real H&E tissue.

Sources (read from ``../shared/data``, never copied into the repository), all resampled to
``mpp`` (0.5 µm/px):

* ``slides/CMU-1-Small-Region.svs`` (Aperio, 0.499 µm/px) read with OpenSlide; only crops that are
  at least 80 % tissue (HSV saturation > 0.07) are used;
* ``nuclei/monuseg2018_train/images/*.tif`` (40x, ~0.25 µm/px -> halved);
* ``nuclei/cpm15/images/*.png`` (01-07 at 20x ~0.5 µm/px, 08-15 at 40x -> halved).

Layout (everything derives from ``seed``; same arguments -> same bytes):

* **Tissue mask**: a smooth random field (white noise on a grid of one value per ``FIELD_PX``
  level-0 px, Gaussian-smoothed at two scales, damped near the slide border), thresholded at the
  quantile that gives ``tissue_fraction`` of the area; evaluated per pixel by bilinear
  interpolation, so tissue borders are smooth curves, not tile steps. Tissue pieces scale with
  the slide (a 100k² slide looks like a 10k² slide, only larger).
* **Content**: the level-0 plane is cut into ``CELL_PX`` (256 px = 128 µm) cells. Each cell inside
  tissue shows a crop of one source image (crop origin on a 32 px grid), under one of the 8
  rotations/flips; neighbouring cells of one ``BLOCK_CELLS`` x ``BLOCK_CELLS`` block (1 mm) share a
  source, like one stain/organ per tissue piece. The background is near-white (243).
* **Pyramid**: every level is rendered directly from 2^k-block-averaged copies of the sources
  (crops and cells are 2^k-aligned), so level ``k`` costs only its own pixels; levels are
  added until the smallest is below ``MIN_LEVEL_PX``.

The file is written tile by tile (``tile`` px tiles, JPEG quality 90 or zlib), levels as
successive IFDs with resolution tags in pixels/cm, so OpenSlide's ``generic-tiff`` driver reports
``openslide.mpp-x/y``; memory stays flat (sources + mask field, ~150 MB for a 100k² slide).

Usage::

    python benchmarks/make_slide.py --size 10000 [--seed 0] [--compression jpeg] [-o PATH] [--force]

Default output: ``benchmarks/data/bench_<size>_s<seed>.tif`` (git-ignored); an existing file with
the same parameters (recorded in ``<file>.json``) is reused unless ``--force``.
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CELLSAM_SHARED_DATA", ROOT.parent / "shared" / "data"))
DATA_DIR = ROOT / "benchmarks" / "data"

CELL_PX = 256  # level-0 px per content cell (one source crop)
ALIGN_PX = 32  # crop origins are multiples of this: levels down to 1/32 stay pixel-aligned
MAX_LEVELS = 6  # 2^5 = 32 = ALIGN_PX
BLOCK_CELLS = 8  # cells per block side sharing one source image
FIELD_PX = 64  # level-0 px per tissue-field grid value
MIN_LEVEL_PX = 2048  # add levels until the largest edge of the last level is at most this
BACKGROUND = 243
CMU_WEIGHT = 0.25  # share of blocks drawn from the CMU slide (the rest: the nucleus tiles)
MIN_CROP_TISSUE = 0.8
SCHEMA_VERSION = 1

log = logging.getLogger("benchmarks.make_slide")


@dataclass
class Source:
    """One source image at the slide's µm/px with its block-averaged pyramid.

    Attributes
    ----------
    name : str
    levels : list of ndarray of shape (H / 2**k, W / 2**k, 3), uint8
        ``levels[k]`` is the 2^k block mean of ``levels[0]`` (H, W multiples of ``ALIGN_PX``).
    origins_rc : ndarray of shape (K, 2), int64
        Allowed level-0 crop origins (multiples of ``ALIGN_PX``, crops of ``CELL_PX`` inside).
    """

    name: str
    levels: list
    origins_rc: np.ndarray


def _resample(img: np.ndarray, factor: float) -> np.ndarray:
    """Resize ``uint8 (H, W, 3)`` by ``factor`` (Lanczos, PIL: deterministic)."""
    from PIL import Image

    if abs(factor - 1.0) < 1e-3:
        return img
    h, w = img.shape[:2]
    size = (max(1, int(round(w * factor))), max(1, int(round(h * factor))))
    return np.asarray(Image.fromarray(img).resize(size, Image.LANCZOS))


def _tissue_fraction_map(img: np.ndarray) -> np.ndarray:
    """bool (H, W): HSV saturation > 0.07 and not black (the tissue detector's idea of tissue)."""
    r, g, b = (img[..., i].astype(np.int16) for i in range(3))
    mx = np.maximum(np.maximum(r, g), b)
    mn = np.minimum(np.minimum(r, g), b)
    return ((mx - mn) > 0.07 * mx) & (mx > 30)


def _make_source(name: str, img: np.ndarray, min_tissue: float) -> Source | None:
    h = img.shape[0] // ALIGN_PX * ALIGN_PX
    w = img.shape[1] // ALIGN_PX * ALIGN_PX
    if h < CELL_PX or w < CELL_PX:
        return None
    img = np.ascontiguousarray(img[:h, :w, :3])
    levels, cur = [img], img.astype(np.float32)
    for _ in range(1, MAX_LEVELS):  # 2x2 means of the float level above = 2^k block means
        cur = 0.25 * (cur[0::2, 0::2] + cur[1::2, 0::2] + cur[0::2, 1::2] + cur[1::2, 1::2])
        levels.append(np.round(cur).astype(np.uint8))
    tissue = _tissue_fraction_map(img).astype(np.int64)
    integral = np.zeros((h + 1, w + 1), np.int64)
    integral[1:, 1:] = tissue.cumsum(0).cumsum(1)
    ys = np.arange(0, h - CELL_PX + 1, ALIGN_PX)
    xs = np.arange(0, w - CELL_PX + 1, ALIGN_PX)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    s = integral[yy + CELL_PX, xx + CELL_PX] - integral[yy, xx + CELL_PX] - integral[yy + CELL_PX, xx] + integral[yy, xx]
    ok = s >= min_tissue * CELL_PX * CELL_PX
    origins = np.stack([yy[ok], xx[ok]], 1).astype(np.int64)
    if len(origins) == 0:
        return None
    return Source(name, levels, origins)


@functools.lru_cache(maxsize=2)
def load_sources(shared: Path = SHARED, mpp: float = 0.5) -> list[Source]:
    """The real H&E source images at ``mpp`` µm/px, CMU slide first (cached per process).

    Raises
    ------
    FileNotFoundError
        If the shared data is missing.
    """
    import openslide
    from PIL import Image

    cmu = shared / "slides" / "CMU-1-Small-Region.svs"
    if not cmu.exists():
        raise FileNotFoundError(f"{cmu}: shared slide missing (set CELLSAM_SHARED_DATA)")
    with openslide.OpenSlide(str(cmu)) as s:
        w, h = s.dimensions
        img = np.asarray(s.read_region((0, 0), 0, (w, h)).convert("RGB"))
        src_mpp = float(s.properties.get("openslide.mpp-x", 0.499))
    sources = [_make_source("CMU-1-Small-Region", _resample(img, src_mpp / mpp), MIN_CROP_TISSUE)]
    tiles = []
    for path in sorted(glob.glob(str(shared / "nuclei" / "monuseg2018_train" / "images" / "*.tif"))):
        tiles.append((path, 0.25))  # MoNuSeg: 40x
    for path in sorted(glob.glob(str(shared / "nuclei" / "cpm15" / "images" / "*.png"))):
        num = int(Path(path).stem.replace("image", "") or 0)
        tiles.append((path, 0.5 if num <= 7 else 0.25))  # CPM15: 01-07 at 20x, 08-15 at 40x
    for path, src_mpp in tiles:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
        src = _make_source(Path(path).stem, _resample(arr, src_mpp / mpp), 0.5)
        if src is not None:
            sources.append(src)
    sources = [s for s in sources if s is not None]
    if not sources:
        raise FileNotFoundError(f"{shared}: no usable source images")
    return sources


# ----------------------------------------------------------------------------------------------
# Tissue field


def tissue_field(size_px: tuple[int, int], seed: int, tissue_fraction: float) -> tuple[np.ndarray, float]:
    """Smooth random field on a ``FIELD_PX`` grid and its tissue threshold.

    Returns
    -------
    field : ndarray of shape (ceil(H / FIELD_PX) + 1, ceil(W / FIELD_PX) + 1), float32
        Value at grid node ``(i, j)`` = level-0 point ``(i * FIELD_PX, j * FIELD_PX)``.
    threshold : float
        Tissue where the (bilinearly interpolated) field is >= threshold.
    """
    from scipy import ndimage as ndi

    gh = -(-int(size_px[0]) // FIELD_PX) + 1
    gw = -(-int(size_px[1]) // FIELD_PX) + 1
    rng = np.random.default_rng([seed, 7])
    scale = max(gh, gw)
    coarse = ndi.gaussian_filter(rng.standard_normal((gh, gw)), scale / 14, mode="reflect")
    fine = ndi.gaussian_filter(rng.standard_normal((gh, gw)), max(scale / 60, 1.0), mode="reflect")
    field = coarse / (coarse.std() or 1) + 0.35 * fine / (fine.std() or 1)
    # damp towards the border: tissue pieces lie on the glass, not cut by the scan edge
    ry = np.minimum(np.arange(gh), np.arange(gh)[::-1]) / max(gh * 0.06, 1)
    rx = np.minimum(np.arange(gw), np.arange(gw)[::-1]) / max(gw * 0.06, 1)
    damp = np.minimum(np.minimum.outer(ry, rx), 1.0)
    field = (field - field.min()) * damp
    threshold = float(np.quantile(field, 1.0 - tissue_fraction))
    return field.astype(np.float32), threshold


def _interp_index(coords: np.ndarray, n_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Left node index (int64) and weight of the right node (float32) for field-grid coordinates."""
    i0 = np.clip(np.floor(coords).astype(np.int64), 0, n_nodes - 2)
    return i0, np.clip(coords - i0, 0.0, 1.0).astype(np.float32)


def tissue_mask(field: np.ndarray, threshold: float, y0: int, x0: int, h: int, w: int, level: int) -> np.ndarray | bool:
    """Tissue mask of level-``level`` pixels ``[y0, y0+h) x [x0, x0+w)``: bool (h, w), or a bool
    scalar when the whole box is (not) tissue. Bilinear interpolation of ``field`` (gathers, no
    BLAS: multi-threaded BLAS on tiny products is slow on a loaded machine)."""
    f = float(2**level)
    iy, ty = _interp_index(((np.arange(y0, y0 + h) + 0.5) * f) / FIELD_PX, field.shape[0])
    ix, tx = _interp_index(((np.arange(x0, x0 + w) + 0.5) * f) / FIELD_PX, field.shape[1])
    patch = field[iy[0] : iy[-1] + 2, ix[0] : ix[-1] + 2]
    if patch.max() < threshold:
        return False
    if patch.min() >= threshold:
        return True
    fy, fx = iy - iy[0], ix - ix[0]
    rows = patch[fy] * (1 - ty)[:, None] + patch[fy + 1] * ty[:, None]  # (h, m)
    return (rows[:, fx] * (1 - tx) + rows[:, fx + 1] * tx) >= threshold


# ----------------------------------------------------------------------------------------------
# Content


class SlideContent:
    """Deterministic content of one benchmark slide (any level, any box)."""

    def __init__(self, size_px: tuple[int, int], seed: int, sources: list[Source], tissue_fraction: float):
        self.size_px = (int(size_px[0]), int(size_px[1]))
        self.seed = int(seed)
        self.sources = sources
        self.field, self.threshold = tissue_field(self.size_px, seed, tissue_fraction)
        n = len(sources)
        if n == 1:
            self.weights = np.ones(1)
        else:
            self.weights = np.concatenate([[CMU_WEIGHT], np.full(n - 1, (1 - CMU_WEIGHT) / (n - 1))])
        self._block_cache: dict = {}

    def _block_source(self, brow: int, bcol: int) -> int:
        key = (brow, bcol)
        if key not in self._block_cache:
            if len(self._block_cache) > 100_000:
                self._block_cache.clear()
            rng = np.random.default_rng([self.seed, 2, brow, bcol])
            self._block_cache[key] = int(rng.choice(len(self.sources), p=self.weights))
        return self._block_cache[key]

    def cell(self, row: int, col: int, level: int) -> np.ndarray:
        """Content of cell ``(row, col)`` at ``level``: uint8 (CELL_PX >> level, CELL_PX >> level, 3)."""
        src = self.sources[self._block_source(row // BLOCK_CELLS, col // BLOCK_CELLS)]
        rng = np.random.default_rng([self.seed, 1, row, col])
        oy, ox = src.origins_rc[int(rng.integers(len(src.origins_rc)))]
        k = int(rng.integers(8))
        f = 2**level
        cs = CELL_PX // f
        crop = src.levels[level][oy // f : oy // f + cs, ox // f : ox // f + cs]
        crop = np.rot90(crop, k % 4)
        if k >= 4:
            crop = crop[:, ::-1]
        return crop

    def render(self, y0: int, x0: int, h: int, w: int, level: int) -> np.ndarray:
        """Pixels ``[y0, y0+h) x [x0, x0+w)`` of ``level``: uint8 (h, w, 3)."""
        out = np.full((h, w, 3), BACKGROUND, np.uint8)
        mask = tissue_mask(self.field, self.threshold, y0, x0, h, w, level)
        if mask is False:
            return out
        cs = CELL_PX >> level
        for r in range(y0 // cs, (y0 + h - 1) // cs + 1):
            for c in range(x0 // cs, (x0 + w - 1) // cs + 1):
                ya, yb = max(r * cs, y0), min((r + 1) * cs, y0 + h)
                xa, xb = max(c * cs, x0), min((c + 1) * cs, x0 + w)
                if mask is not True and not mask[ya - y0 : yb - y0, xa - x0 : xb - x0].any():
                    continue
                cell = self.cell(r, c, level)
                out[ya - y0 : yb - y0, xa - x0 : xb - x0] = cell[ya - r * cs : yb - r * cs, xa - c * cs : xb - c * cs]
        if mask is not True:
            np.copyto(out, np.uint8(BACKGROUND), where=~mask[..., None])
        return out


def n_levels(size_px: tuple[int, int]) -> int:
    """Levels (2x steps) until the largest edge is below ``MIN_LEVEL_PX`` (at most ``MAX_LEVELS``)."""
    k = 1
    while max(size_px) / 2 ** (k - 1) > MIN_LEVEL_PX and k < MAX_LEVELS:
        k += 1
    return k


def write_slide(
    path: str | os.PathLike,
    size_px: int | tuple[int, int],
    *,
    seed: int = 0,
    mpp: float = 0.5,
    tissue_fraction: float = 0.5,
    compression: str = "jpeg",
    tile: int = 512,
    shared: Path = SHARED,
) -> dict:
    """Write a benchmark slide tile by tile; returns its description (also in ``<path>.json``).

    Parameters
    ----------
    path : path
        Output ``.tif`` (written to ``<path>.tmp-<pid>`` and renamed).
    size_px : int or (int, int)
        Level-0 (height, width), px at ``mpp``.
    seed : int
        Layout, source choice, crops and orientations.
    mpp : float
        µm/px of level 0 (TIFF resolution tags, read by OpenSlide as ``openslide.mpp-x/y``).
    tissue_fraction : float
        Target share of the slide area covered by tissue (0.4-0.6 realistic).
    compression : {"jpeg", "zlib"}
        Tile compression (JPEG quality 90, or zlib level 1).
    tile : int
        TIFF tile edge, px (multiple of 16).

    Returns
    -------
    dict
        ``size_px``, ``mpp``, ``seed``, ``levels``, ``tissue_fraction`` (measured on the lowest
        level), ``bytes``, ``seconds``, ``sources``.
    """
    from pipeline.synthetic import write_pyramid_tiff

    if isinstance(size_px, int):
        size_px = (size_px, size_px)
    h, w = (int(v) for v in size_px)
    if h < CELL_PX or w < CELL_PX or mpp <= 0 or not 0 < tissue_fraction < 1:
        raise ValueError(f"bad slide parameters: size {size_px}, mpp {mpp}, tissue_fraction {tissue_fraction}")
    if compression not in ("jpeg", "zlib"):
        raise ValueError(f"compression must be jpeg or zlib, got {compression!r}")
    path = Path(path)
    t_start = time.perf_counter()
    sources = load_sources(Path(shared), float(mpp))
    content = SlideContent((h, w), seed, sources, tissue_fraction)
    levels = n_levels((h, w))
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    blank = np.full((tile, tile, 3), BACKGROUND, np.uint8)
    stats = {"tissue_px": 0, "px": 0}

    def tiles(level: int, lh: int, lw: int):
        last = level == levels - 1
        for y0 in range(0, lh, tile):
            for x0 in range(0, lw, tile):
                th, tw = min(tile, lh - y0), min(tile, lw - x0)
                block = content.render(y0, x0, th, tw, level)
                if last:
                    stats["tissue_px"] += int((block != BACKGROUND).any(-1).sum())
                    stats["px"] += th * tw
                if th == tile and tw == tile:
                    yield block
                else:
                    full = blank.copy()
                    full[:th, :tw] = block
                    yield full
            if level == 0 and (y0 // tile) % 20 == 0:
                log.info("level 0: row %d / %d", y0 // tile, -(-lh // tile))

    comp = ("jpeg", {"level": 90}) if compression == "jpeg" else ("zlib", {"level": 1})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_pyramid_tiff(tmp, (h, w), mpp, levels, tile, tiles, compression=comp[0], compressionargs=comp[1])
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    info = {
        "schema_version": SCHEMA_VERSION,
        "file": path.name,
        "size_px": [h, w],
        "mpp": mpp,
        "seed": seed,
        "tissue_fraction_target": tissue_fraction,
        "tissue_fraction": round(stats["tissue_px"] / max(stats["px"], 1), 4),
        "tissue_area_mm2_approx": round(stats["tissue_px"] / max(stats["px"], 1) * h * w * mpp * mpp / 1e6, 3),
        "levels": levels,
        "tile_px": tile,
        "compression": compression,
        "bytes": path.stat().st_size,
        "seconds": round(time.perf_counter() - t_start, 2),
        "sources": len(sources),
    }
    side = path.with_name(path.name + ".json")
    tmp_side = side.with_name(side.name + f".tmp-{os.getpid()}")
    tmp_side.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp_side, side)
    return info


_PARAMS = ("size_px", "mpp", "seed", "tissue_fraction_target", "compression", "tile_px", "schema_version")


def ensure_slide(
    size_px: int, *, seed: int = 0, mpp: float = 0.5, tissue_fraction: float = 0.5, compression: str = "jpeg",
    tile: int = 512, path: str | os.PathLike | None = None, force: bool = False,
) -> tuple[Path, dict]:
    """The benchmark slide of these parameters, written if missing (cached in ``benchmarks/data``)."""
    path = Path(path) if path else DATA_DIR / f"bench_{size_px}_s{seed}.tif"
    side = path.with_name(path.name + ".json")
    want = {"size_px": [size_px, size_px], "mpp": mpp, "seed": seed, "tissue_fraction_target": tissue_fraction,
            "compression": compression, "tile_px": tile, "schema_version": SCHEMA_VERSION}
    if not force and path.exists() and side.exists():
        try:
            info = json.loads(side.read_text(encoding="utf-8"))
            if {k: info.get(k) for k in _PARAMS} == want and info.get("bytes") == path.stat().st_size:
                return path, info
        except (OSError, ValueError):
            pass
    info = write_slide(path, size_px, seed=seed, mpp=mpp, tissue_fraction=tissue_fraction,
                       compression=compression, tile=tile)
    return path, info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, required=True, help="level-0 edge, px (e.g. 10000, 30000, 100000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--tissue-fraction", type=float, default=0.5)
    ap.add_argument("--compression", choices=["jpeg", "zlib"], default="jpeg")
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("-o", "--output", default=None, help="default: benchmarks/data/bench_<size>_s<seed>.tif")
    ap.add_argument("--force", action="store_true", help="rewrite even if a matching file exists")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        path, info = ensure_slide(args.size, seed=args.seed, mpp=args.mpp, tissue_fraction=args.tissue_fraction,
                                  compression=args.compression, tile=args.tile, path=args.output, force=args.force)
    except (OSError, ValueError) as exc:
        print(f"make_slide: error: {exc}", file=sys.stderr)
        return 2
    log.info("%s: %s", path, json.dumps(info, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
