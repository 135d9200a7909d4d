"""One place that names every artifact of a run (used by the CLI and the Snakemake workflow).

Layout of ``OUTDIR`` for a slide with id ``S`` (default: the slide file name without extension)::

    OUTDIR/S.geojson.gz          QuPath detections (FeatureCollection), final
    OUTDIR/S.geojson             optional, uncompressed (--geojson-plain)
    OUTDIR/S.nuclei.parquet      GeoParquet, one row per nucleus, final
    OUTDIR/S.summary.json        per-slide statistics, versions, parameters, final (deterministic)
    OUTDIR/S.timings.json        wall-clock seconds per stage (the one non-deterministic output)
    OUTDIR/S.qc.png              QC image, final
    OUTDIR/rejected/S.geojson.gz       a model that rejects: what it removed as "not a nucleus" (QuPath
    OUTDIR/rejected/S.nuclei.parquet   ``Ignore*`` detections / GeoParquet), final; absent otherwise
    OUTDIR/.work/S/store.ome.zarr    OME-Zarr 0.4 tile store (intermediate, resumable)
    OUTDIR/.work/S/chunks/           one parquet per processed chunk (intermediate, resumable)
    OUTDIR/.work/S/tissue.png        tissue-mask preview

Final files are written to ``<name>.tmp-<pid>`` in the same directory and renamed, so a file
under its final name is always complete.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def slide_id_from_path(path: str | os.PathLike) -> str:
    """Default slide id: file name without its (possibly double) extension, e.g. ``a.ome.tif`` -> ``a``."""
    name = Path(path).name
    for ext in (".ome.tiff", ".ome.tif", ".ome.zarr"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def check_slide_id(slide_id: str) -> str:
    """Refuse ids that could escape the output directory or clash with the layout."""
    if not _SAFE_ID.match(slide_id) or ".." in slide_id:
        raise InputError(f"unsafe slide id {slide_id!r}: use letters, digits, '.', '_' or '-' (no '/', no '..')")
    return slide_id


@dataclass(frozen=True)
class SlidePaths:
    outdir: Path
    slide_id: str

    @property
    def geojson_gz(self) -> Path:
        return self.outdir / f"{self.slide_id}.geojson.gz"

    @property
    def geojson(self) -> Path:
        return self.outdir / f"{self.slide_id}.geojson"

    @property
    def parquet(self) -> Path:
        return self.outdir / f"{self.slide_id}.nuclei.parquet"

    @property
    def rejected_geojson_gz(self) -> Path:
        """What a model that rejects removed as "not a nucleus" (QuPath ``Ignore*`` detections);
        a sub-folder, so no slide id can clash with it."""
        return self.outdir / "rejected" / f"{self.slide_id}.geojson.gz"

    @property
    def rejected_parquet(self) -> Path:
        return self.outdir / "rejected" / f"{self.slide_id}.nuclei.parquet"

    @property
    def summary(self) -> Path:
        return self.outdir / f"{self.slide_id}.summary.json"

    @property
    def qc_png(self) -> Path:
        return self.outdir / f"{self.slide_id}.qc.png"

    @property
    def timings(self) -> Path:
        """Stage timings of the last run (kept out of the summary, which is byte-reproducible)."""
        return self.outdir / f"{self.slide_id}.timings.json"

    @property
    def workdir(self) -> Path:
        return self.outdir / ".work" / self.slide_id

    @property
    def store(self) -> Path:
        return self.workdir / "store.ome.zarr"

    @property
    def chunks(self) -> Path:
        return self.workdir / "chunks"

    @property
    def tissue_png(self) -> Path:
        return self.workdir / "tissue.png"

    def finals(self) -> list[Path]:
        return [self.geojson_gz, self.parquet, self.summary, self.qc_png]


def slide_paths(outdir: str | os.PathLike, slide_id: str) -> SlidePaths:
    return SlidePaths(Path(outdir), check_slide_id(slide_id))


def atomic_target(path: Path) -> Path:
    """Temporary sibling of ``path`` to write to before ``os.replace(tmp, path)``."""
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def atomic_write(path, write, what: str = "", *, mkdir: bool = False) -> Path:
    """Write a file atomically: ``write(tmp)`` to :func:`atomic_target`, then ``os.replace`` it onto
    ``path``. On any failure the temporary is removed (nothing incomplete under any name) and an
    ``OSError`` (disk full, unwritable directory...) becomes one :class:`OutputError` line naming
    ``path``. ``mkdir``: create the parent directory first. Returns ``path``."""
    path = Path(path)
    tmp = atomic_target(path)
    try:
        if mkdir:
            path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        unlink_quietly(tmp)
        raise output_error(path, exc, what) from exc
    except BaseException:
        unlink_quietly(tmp)
        raise
    return path


def output_error(path, exc: OSError, what: str = ""):
    """The one-line :class:`OutputError` for a failed write of ``path`` (``what``: which output)."""
    from .errors import OutputError

    return OutputError(f"cannot write {path}{f' ({what})' if what else ''}: {exc.strerror or exc}")


def unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


_ABS_PATH = re.compile(r"^(/|~|[A-Za-z]:[\\/]|\\\\)")


def public_value(obj):
    """``obj`` (JSON-like) with every absolute path string replaced by its file name.

    Outputs must not depend on where the software, the model or the data sit on the machine
    (reproducible bytes across checkouts; no user names or mount points leak into shared results).
    A string is a path when it starts with ``/``, ``~``, ``C:\\`` or ``\\\\``; its last component
    is kept (``/home/u/w/cellsam_default.pt`` -> ``cellsam_default.pt``). Dict keys are kept.
    """
    if isinstance(obj, dict):
        return {k: public_value(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [public_value(v) for v in obj]
    if isinstance(obj, str) and _ABS_PATH.match(obj):
        return re.split(r"[\\/]", obj.rstrip("/\\"))[-1] or obj
    return obj
