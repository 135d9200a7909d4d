"""Whole-slide image reading behind one small interface, in level-0 coordinates.

:func:`open_slide` returns a :class:`SlideReader`: OpenSlide first (SVS, generic tiled TIFF,
DICOM, MRXS, ...), then tifffile for (OME-)TIFF that OpenSlide does not recognise. For tests,
:class:`ArraySlide` wraps an in-memory ``uint8 (H, W, 3)`` array with the same interface.

Conventions
-----------
* Locations are level-0 pixel coordinates ``(x_l0, y_l0)`` of the slide file (OpenSlide's frame,
  *before* subtracting ``openslide.bounds-x/y``); sizes are ``(width, height)`` at the level read.
* Returned pixels are always ``uint8 (height, width, 3)`` RGB; transparent and out-of-slide
  pixels are composited on white (255).
* µm/px (``mpp_x``, ``mpp_y``) come from ``openslide.mpp-x/y`` (or the TIFF/OME resolution);
  a slide without them is refused unless ``slide_mpp`` is given. Nothing is guessed.

Resampling (:meth:`SlideReader.read_at_mpp`)
--------------------------------------------
The pyramid level used is the lowest-resolution level whose µm/px is ``<= target * (1 +
MPP_TOLERANCE)``; the covering region is read from it and resampled with PIL's area filter
(``Image.Resampling.BOX``; bilinear when upsampling) using the exact floating-point source box,
so a region read in pieces matches the same region read at once. Compared with
``openslide.read_region`` of the whole level-0 image resized in one go with the same filter,
pixels agree within 2 grey levels (max) and 0.05 (mean); see ``tests/test_slide.py``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import InputError, SlideReadError

log = logging.getLogger(__name__)

#: Relative tolerance when picking a pyramid level for a target µm/px: a level whose µm/px
#: exceeds the target by at most 1 % counts as "not coarser" (pyramids such as TCGA's 2.0005x).
MPP_TOLERANCE = 0.01

#: Largest source-side edge (pixels) read at once by :meth:`SlideReader.thumbnail`.
_THUMB_BLOCK_SRC_PX = 2048


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """``uint8 (H, W, 4)`` RGBA (not premultiplied) -> ``uint8 (H, W, 3)`` RGB over white."""
    rgb = rgba[..., :3].astype(np.uint16)
    alpha = rgba[..., 3:4].astype(np.uint16)
    if np.all(alpha == 255):
        return np.ascontiguousarray(rgba[..., :3])
    out = (rgb * alpha + 255 * (255 - alpha) + 127) // 255
    return out.astype(np.uint8)


class SlideReader:
    """Common interface of all slide backends (see module docstring for the conventions).

    Attributes
    ----------
    path : Path
        The slide file (``Path("<array>")`` for :class:`ArraySlide`).
    dimensions_l0 : tuple of int
        ``(width, height)`` of level 0, pixels.
    level_count : int
    level_dimensions : list of tuple of int
        ``(width, height)`` per level, highest resolution first.
    level_downsamples : list of float
        Level-0 pixels per level-``k`` pixel.
    mpp_x, mpp_y : float
        µm per level-0 pixel (from metadata, or the ``slide_mpp`` override).
    objective_power : float or None
    bounds_l0 : tuple of int
        ``(x, y, width, height)`` of the non-empty region in level-0 pixels (``openslide.bounds-*``;
        the whole image when absent). QuPath's pixel (0, 0) is level-0 ``(x, y)``.
    properties : dict of str to str
        Raw metadata.
    """

    path: Path
    dimensions_l0: tuple[int, int]
    level_count: int
    level_dimensions: list[tuple[int, int]]
    level_downsamples: list[float]
    mpp_x: float
    mpp_y: float
    objective_power: float | None
    bounds_l0: tuple[int, int, int, int]
    properties: dict[str, str]

    _sha256: str | None = None

    # ----------------------------------------------------------------- backend hook
    def _read_level(self, x_l0: int, y_l0: int, width: int, height: int, level: int) -> np.ndarray:
        """Backend read: ``uint8 (height, width, 3)``; out-of-image pixels white."""
        raise NotImplementedError

    # ----------------------------------------------------------------- common API
    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the slide file (streamed, computed once)."""
        if self._sha256 is None:
            digest = hashlib.sha256()
            try:
                with open(self.path, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        digest.update(block)
            except OSError as exc:
                raise SlideReadError(f"{self.path}: cannot read file: {exc.strerror or exc}") from exc
            self._sha256 = digest.hexdigest()
        return self._sha256

    def level_mpp(self, level: int) -> float:
        """µm/px (x) of pyramid ``level``."""
        return self.mpp_x * self.level_downsamples[level]

    def best_level_for_mpp(self, mpp: float) -> int:
        """Lowest-resolution level whose µm/px is ``<= mpp * (1 + MPP_TOLERANCE)`` (else level 0)."""
        best = 0
        for level in range(self.level_count):
            if self.level_mpp(level) <= mpp * (1.0 + MPP_TOLERANCE):
                if self.level_downsamples[level] >= self.level_downsamples[best]:
                    best = level
        return best

    def read_region_l0(self, x_l0: int, y_l0: int, width: int, height: int, level: int) -> np.ndarray:
        """Read ``(width, height)`` pixels of ``level`` whose top-left is level-0 ``(x_l0, y_l0)``.

        Parameters
        ----------
        x_l0, y_l0 : int
            Top-left in level-0 pixels (slide file frame); may lie outside the image.
        width, height : int
            Size in pixels of ``level``.
        level : int

        Returns
        -------
        ndarray of shape (height, width, 3), dtype uint8
            RGB, transparency composited on white, out-of-slide pixels white.

        Raises
        ------
        SlideReadError
            If the slide data cannot be decoded.
        InputError
            For a bad level or a negative size.
        """
        if not 0 <= level < self.level_count:
            raise InputError(f"{self.path}: level {level} out of range 0..{self.level_count - 1}")
        if width < 0 or height < 0:
            raise InputError(f"{self.path}: negative read size {width}x{height}")
        if width == 0 or height == 0:
            return np.full((height, width, 3), 255, np.uint8)
        return self._read_level(int(x_l0), int(y_l0), int(width), int(height), level)

    def read_at_mpp(self, x_l0: float, y_l0: float, width_px: int, height_px: int, mpp: float) -> np.ndarray:
        """Read a region at a target resolution.

        Parameters
        ----------
        x_l0, y_l0 : float
            Top-left of the region, level-0 pixels (slide file frame).
        width_px, height_px : int
            Output size in pixels at ``mpp``.
        mpp : float
            Target µm/px. The region spans ``width_px * mpp / mpp_x`` level-0 pixels.

        Returns
        -------
        ndarray of shape (height_px, width_px, 3), dtype uint8

        Raises
        ------
        SlideReadError
            If the slide data cannot be decoded.
        """
        if mpp <= 0:
            raise InputError(f"{self.path}: target µm/px must be > 0, got {mpp}")
        if width_px <= 0 or height_px <= 0:
            return np.full((max(height_px, 0), max(width_px, 0), 3), 255, np.uint8)
        level = self.best_level_for_mpp(mpp)
        ds = self.level_downsamples[level]
        # region in level-`level` pixel coordinates (float)
        fx0, fy0 = x_l0 / ds, y_l0 / ds
        fx1 = (x_l0 + width_px * mpp / self.mpp_x) / ds
        fy1 = (y_l0 + height_px * mpp / self.mpp_y) / ds
        scale = max((fx1 - fx0) / width_px, (fy1 - fy0) / height_px)
        if (
            abs(scale - 1.0) < 1e-9
            and abs((fy1 - fy0) / height_px - 1.0) < 1e-9
            and float(fx0).is_integer()
            and float(fy0).is_integer()
        ):
            return self.read_region_l0(round(fx0 * ds), round(fy0 * ds), width_px, height_px, level)
        margin = int(math.ceil(max(scale, 1.0))) + 2  # filter support
        ix0, iy0 = int(math.floor(fx0)) - margin, int(math.floor(fy0)) - margin
        ix1, iy1 = int(math.ceil(fx1)) + margin, int(math.ceil(fy1)) + margin
        src = self.read_region_l0(round(ix0 * ds), round(iy0 * ds), ix1 - ix0, iy1 - iy0, level)
        resample = Image.Resampling.BOX if scale >= 1.0 else Image.Resampling.BILINEAR
        img = Image.fromarray(src, mode="RGB").resize(
            (width_px, height_px),
            resample=resample,
            box=(fx0 - ix0, fy0 - iy0, fx1 - ix0, fy1 - iy0),
        )
        return np.asarray(img, dtype=np.uint8)

    def thumbnail(self, mpp: float) -> np.ndarray:
        """The bounds region at ``mpp`` µm/px, read block by block (memory bounded).

        Returns
        -------
        ndarray of shape (round(bounds_h * mpp_y / mpp), round(bounds_w * mpp_x / mpp), 3), dtype uint8
            Pixel ``(row, col)`` covers level-0 ``(bx + col * mpp / mpp_x, by + row * mpp / mpp_y)``.
        """
        bx, by, bw, bh = self.bounds_l0
        width_px = max(1, round(bw * self.mpp_x / mpp))
        height_px = max(1, round(bh * self.mpp_y / mpp))
        level_mpp = self.level_mpp(self.best_level_for_mpp(mpp))
        block = max(16, int(_THUMB_BLOCK_SRC_PX * min(1.0, level_mpp / mpp)))
        out = np.empty((height_px, width_px, 3), np.uint8)
        for r0 in range(0, height_px, block):
            for c0 in range(0, width_px, block):
                h, w = min(block, height_px - r0), min(block, width_px - c0)
                out[r0 : r0 + h, c0 : c0 + w] = self.read_at_mpp(
                    bx + c0 * mpp / self.mpp_x, by + r0 * mpp / self.mpp_y, w, h, mpp
                )
        return out

    def close(self) -> None:
        """Release file handles."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions_l0
        return f"{type(self).__name__}({str(self.path)!r}, {w}x{h}, {self.level_count} levels, {self.mpp_x:.4g} µm/px)"

    # ----------------------------------------------------------------- helpers
    def _set_mpp(self, mpp_x: float | None, mpp_y: float | None, slide_mpp: float | None) -> None:
        if slide_mpp is not None:
            if not (slide_mpp > 0 and math.isfinite(slide_mpp)):
                raise InputError(f"--slide-mpp must be a positive number, got {slide_mpp}")
            mpp_x = mpp_y = float(slide_mpp)
        if mpp_x is None or not (mpp_x > 0 and math.isfinite(mpp_x)):
            raise SlideReadError(f"{self.path}: no µm/px metadata; pass --slide-mpp")
        if mpp_y is None or not (mpp_y > 0 and math.isfinite(mpp_y)):
            mpp_y = mpp_x
        self.mpp_x, self.mpp_y = float(mpp_x), float(mpp_y)


def _float_or_none(value) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) and out > 0 else None


class OpenSlideReader(SlideReader):
    """OpenSlide backend (thread-safe reads)."""

    def __init__(self, path: Path, handle, slide_mpp: float | None = None):
        self.path = path
        self._osr = handle
        props = dict(handle.properties)
        self.properties = props
        self.dimensions_l0 = tuple(handle.dimensions)
        self.level_count = handle.level_count
        self.level_dimensions = [tuple(d) for d in handle.level_dimensions]
        self.level_downsamples = [float(d) for d in handle.level_downsamples]
        self._set_mpp(_float_or_none(props.get("openslide.mpp-x")), _float_or_none(props.get("openslide.mpp-y")), slide_mpp)
        self.objective_power = _float_or_none(props.get("openslide.objective-power"))
        w, h = self.dimensions_l0
        bx = int(props.get("openslide.bounds-x", 0) or 0)
        by = int(props.get("openslide.bounds-y", 0) or 0)
        bw = int(props.get("openslide.bounds-width", w - bx) or (w - bx))
        bh = int(props.get("openslide.bounds-height", h - by) or (h - by))
        self.bounds_l0 = (bx, by, bw, bh)

    def _read_level(self, x_l0, y_l0, width, height, level):
        import openslide

        try:
            img = self._osr.read_region((x_l0, y_l0), level, (width, height))
        except openslide.OpenSlideError as exc:
            raise SlideReadError(f"{self.path}: file is truncated or corrupt: {exc}") from exc
        alpha = img.getchannel("A")
        if alpha.getextrema()[0] == 255:
            return np.asarray(img.convert("RGB"))
        out = Image.new("RGB", img.size, (255, 255, 255))
        out.paste(img.convert("RGB"), mask=alpha)  # un-premultiplied RGBA over white
        return np.asarray(out)

    def close(self):
        self._osr.close()


class _TifffileProblems(list):
    """Context manager: the messages tifffile logs at WARNING or above inside it (not shown)."""

    def __enter__(self):
        outer = self

        class _Handler(logging.Handler):
            def emit(self, record):
                outer.append(record.getMessage().replace("\n", " ")[:200])

        self._logger = logging.getLogger("tifffile")
        self._handler = _Handler(logging.WARNING)
        self._propagate = self._logger.propagate
        self._logger.addHandler(self._handler)
        self._logger.propagate = False
        return self

    def __exit__(self, *exc):
        self._logger.removeHandler(self._handler)
        self._logger.propagate = self._propagate
        return False


class TiffSlideReader(SlideReader):
    """tifffile backend for (OME-)TIFF that OpenSlide does not recognise (RGB uint8 only)."""

    def __init__(self, path: Path, slide_mpp: float | None = None):
        import tifffile
        import zarr

        self.path = path
        self._lock = threading.Lock()
        self._tif = None
        # tifffile logs (rather than raises) broken IFD chains, e.g. of a truncated SVS: collect
        # them and refuse the file with one clear error instead of a log line + a wrong diagnosis
        with _TifffileProblems() as problems:
            try:
                self._tif = tifffile.TiffFile(path)
                series = self._tif.series[0]
                levels = list(series.levels)
                page = series.pages[0] if series.pages else self._tif.pages[0]
                axes = series.axes
                shapes = [lvl.shape for lvl in levels]
                dtype = series.dtype
            except Exception as exc:  # tifffile raises many types on bad input
                if self._tif is not None:
                    self._tif.close()
                if problems:
                    raise SlideReadError(f"{path}: file is truncated or corrupt (tifffile: {problems[0]})") from exc
                raise SlideReadError(f"{path}: not a slide OpenSlide or tifffile can read ({exc})") from exc
        if problems:
            self._tif.close()
            raise SlideReadError(f"{path}: file is truncated or corrupt (tifffile: {problems[0]})")
        if axes.endswith(("YXS", "YXC")):
            self._channels_last, n_channels = True, shapes[0][-1]
        elif axes.endswith(("SYX", "CYX")):
            self._channels_last, n_channels = False, shapes[0][-3]
        else:
            self._tif.close()
            raise SlideReadError(f"{path}: not an RGB slide (tifffile axes {axes})")
        if dtype != np.uint8 or n_channels not in (3, 4) or math.prod(shapes[0][:-3]) != 1:
            self._tif.close()
            raise SlideReadError(f"{path}: not a single-plane RGB uint8 slide (axes {axes}, shape {shapes[0]}, dtype {dtype})")
        dims = []
        for shape in shapes:
            h, w = (shape[-3], shape[-2]) if self._channels_last else (shape[-2], shape[-1])
            dims.append((int(w), int(h)))
        self.dimensions_l0 = dims[0]
        self.level_count = len(dims)
        self.level_dimensions = dims
        self.level_downsamples = [dims[0][0] / d[0] for d in dims]
        try:
            self._levels = [zarr.open(series.aszarr(level=k), mode="r") for k in range(len(dims))]
        except Exception as exc:
            raise SlideReadError(f"{path}: not a slide OpenSlide or tifffile can read ({exc})") from exc
        self.properties = {"tifffile.axes": axes}
        mpp_x, mpp_y = self._tiff_mpp(page)
        self._set_mpp(mpp_x, mpp_y, slide_mpp)
        self.objective_power = None
        self.bounds_l0 = (0, 0, dims[0][0], dims[0][1])

    def _tiff_mpp(self, page) -> tuple[float | None, float | None]:
        ome = self._tif.ome_metadata
        if ome:
            import xml.etree.ElementTree as ET

            try:
                root = ET.fromstring(ome)
                for el in root.iter():
                    if el.tag.endswith("}Pixels") or el.tag == "Pixels":
                        factor = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}
                        unit = el.get("PhysicalSizeXUnit", "µm")
                        sx, sy = _float_or_none(el.get("PhysicalSizeX")), _float_or_none(el.get("PhysicalSizeY"))
                        if sx is not None and unit in factor:
                            self.properties["ome.PhysicalSizeX"] = str(sx)
                            return sx * factor[unit], (sy * factor[unit] if sy is not None else None)
                        break
            except ET.ParseError:
                pass
        tags = page.tags
        unit = tags.get("ResolutionUnit")
        unit = int(unit.value) if unit is not None else 2
        per = {2: 25400.0, 3: 10000.0}.get(unit)  # inch / centimetre in µm
        out = []
        for name in ("XResolution", "YResolution"):
            tag = tags.get(name)
            if tag is None or per is None:
                out.append(None)
                continue
            num, den = tag.value
            px_per_unit = num / den if den else 0.0
            out.append(per / px_per_unit if px_per_unit > 0 else None)
        return out[0], out[1]

    def _read_level(self, x_l0, y_l0, width, height, level):
        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        x0, y0 = int(math.floor(x_l0 / ds)), int(math.floor(y_l0 / ds))
        out = np.full((height, width, 3), 255, np.uint8)
        cx0, cy0 = max(x0, 0), max(y0, 0)
        cx1, cy1 = min(x0 + width, lw), min(y0 + height, lh)
        if cx1 <= cx0 or cy1 <= cy0:
            return out
        arr = self._levels[level]
        try:
            with self._lock:
                if self._channels_last:
                    data = np.asarray(arr[..., cy0:cy1, cx0:cx1, :])
                else:
                    data = np.moveaxis(np.asarray(arr[..., :, cy0:cy1, cx0:cx1]), -3, -1)
        except Exception as exc:
            raise SlideReadError(f"{self.path}: file is truncated or corrupt: {exc}") from exc
        data = data.reshape(data.shape[-3:])
        if data.shape[-1] == 4:
            data = _composite_on_white(data)
        out[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = data[..., :3]
        return out

    def close(self):
        self._tif.close()


class ArraySlide(SlideReader):
    """In-memory single-level slide (test double with the full reader interface).

    Parameters
    ----------
    array : ndarray of shape (H, W, 3), dtype uint8
        RGB pixels, level 0.
    mpp : float
        µm/px of ``array``.
    """

    def __init__(self, array: np.ndarray, mpp: float, *, objective_power: float | None = None):
        if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            raise InputError("ArraySlide needs a uint8 (H, W, 3) array")
        self.path = Path("<array>")
        self._array = array
        h, w = array.shape[:2]
        self.dimensions_l0 = (w, h)
        self.level_count = 1
        self.level_dimensions = [(w, h)]
        self.level_downsamples = [1.0]
        self._set_mpp(mpp, mpp, None)
        self.objective_power = objective_power
        self.bounds_l0 = (0, 0, w, h)
        self.properties = {}
        self._sha256 = hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()

    def _read_level(self, x_l0, y_l0, width, height, level):
        h, w = self._array.shape[:2]
        out = np.full((height, width, 3), 255, np.uint8)
        cx0, cy0 = max(x_l0, 0), max(y_l0, 0)
        cx1, cy1 = min(x_l0 + width, w), min(y_l0 + height, h)
        if cx1 > cx0 and cy1 > cy0:
            out[cy0 - y_l0 : cy1 - y_l0, cx0 - x_l0 : cx1 - x_l0] = self._array[cy0:cy1, cx0:cx1]
        return out


def open_slide(path: str | os.PathLike, slide_mpp: float | None = None) -> SlideReader:
    """Open a whole-slide image (OpenSlide, else tifffile).

    Parameters
    ----------
    path : str or PathLike
    slide_mpp : float, optional
        µm per level-0 pixel; overrides (or supplies missing) metadata.

    Returns
    -------
    SlideReader

    Raises
    ------
    InputError
        If the file does not exist, is a directory or is not readable.
    SlideReadError
        If neither OpenSlide nor tifffile can read it, it is corrupt, or it has no µm/px.
    """
    import openslide

    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    if p.is_dir() and not p.suffix.lower() == ".mrxs":
        raise InputError(f"{p}: is a directory, not a slide file")
    if not os.access(p, os.R_OK):
        raise InputError(f"{p}: permission denied")
    if p.stat().st_size == 0:
        raise SlideReadError(f"{p}: empty file (0 bytes); not a slide")
    try:
        handle = openslide.OpenSlide(str(p))
    except openslide.OpenSlideUnsupportedFormatError:
        handle = None
    except openslide.OpenSlideError as exc:
        raise SlideReadError(f"{p}: file is truncated or corrupt: {exc}") from exc
    except OSError as exc:
        raise InputError(f"{p}: cannot open: {exc.strerror or exc}") from exc
    if handle is not None:
        try:
            return OpenSlideReader(p, handle, slide_mpp)
        except Exception:
            handle.close()
            raise
    import tifffile

    try:
        with open(p, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise InputError(f"{p}: cannot open: {exc.strerror or exc}") from exc
    if head[:2] not in (b"II", b"MM"):
        raise SlideReadError(f"{p}: not a slide OpenSlide or tifffile can read")
    try:
        return TiffSlideReader(p, slide_mpp)
    except tifffile.TiffFileError as exc:
        raise SlideReadError(f"{p}: not a slide OpenSlide or tifffile can read ({exc})") from exc
