"""Exports of the final nuclei: QuPath GeoJSON, GeoParquet, JSON (thin I/O, atomic, deterministic).

Every writer writes ``<final>.tmp-<pid>`` in the destination directory and ``os.replace``-s it,
so a file under its final name is always complete. Same table -> same bytes (gzip header without
mtime or file name, fixed key order, no timestamps in Parquet metadata).

Frames: the table's geometry is in store px; files get QuPath level-0 px,
``x_l0 = x_store * scale_x + offset_x``, ``y_l0 = y_store * scale_y + offset_y``, snapped to the
0.01 px grid QuPath >= 0.6 reduces to and kept valid. See ``docs/outputs.md`` for the schemas and
QuPath's reader rules.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import os
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shapely

from . import geometry
from .errors import OutputError
from .measure import MEASUREMENT_COLUMNS, QUPATH_NAMES
from .paths import atomic_target

log = logging.getLogger(__name__)

#: Namespace of the nucleus UUIDs: ``uuid5(NUCLEUS_NAMESPACE, f"{slide_key}/{nucleus_id}")``.
NUCLEUS_NAMESPACE = uuid.UUID("6f1c2a3e-5b7d-4e8f-9a0b-c1d2e3f4a5b6")
_NS_BYTES = NUCLEUS_NAMESPACE.bytes
#: QuPath classification of every exported nucleus.
NUCLEUS_CLASS = {"name": "Nucleus", "color": [0, 128, 255]}
#: Version of the schemas written here (GeoJSON properties, GeoParquet columns, metadata).
SCHEMA_VERSION = 1
#: Decimal places of measurement values in GeoJSON (Parquet keeps full precision).
GEOJSON_MEASUREMENT_DECIMALS = 4
_BATCH_ROWS = 20_000
_JSON = dict(allow_nan=False, ensure_ascii=False, separators=(",", ":"))


def nucleus_uuid(slide_key, nucleus_id):
    """Stable UUID string of a nucleus: ``uuid5(NUCLEUS_NAMESPACE, f"{slide_key}/{nucleus_id}")``.

    Same value as :func:`uuid.uuid5` (RFC 4122 SHA-1 name-based), computed with ``hashlib``
    directly (about 10x faster, which matters for millions of nuclei).
    """
    digest = bytearray(hashlib.sha1(_NS_BYTES + f"{slide_key}/{int(nucleus_id)}".encode("utf-8")).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _atomic(path, write):
    """Run ``write(tmp_path)`` then rename to ``path``; remove the temporary on failure."""
    path = Path(path)
    tmp = atomic_target(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def to_level0(geoms, scale_xy_l0, offset_xy_l0=(0.0, 0.0)):
    """Store-px polygons -> QuPath level-0 px, on the 0.01 px grid, valid, exterior CCW.

    Parameters
    ----------
    geoms : numpy.ndarray of shapely.Polygon, shape (K,)
        Store px.
    scale_xy_l0 : tuple of float
        Level-0 px per store px along x and y.
    offset_xy_l0 : tuple of float
        Added after scaling (level-0 px).

    Returns
    -------
    numpy.ndarray of shapely.Polygon, shape (K,)
    """
    g = geometry.scale_translate(geoms, scale_xy_l0, offset_xy_l0)
    return shapely.orient_polygons(geometry.clean_polygons(g))


def _batches(table, rows=_BATCH_ROWS):
    for start in range(0, table.num_rows, rows):
        yield table.slice(start, rows)


def _measurement_columns(table):
    cols = [c for c in MEASUREMENT_COLUMNS if c in table.column_names]
    if "score" in table.column_names:
        cols.append("score")
    return cols


def _features(batch, *, scale_xy_l0, offset_xy_l0, slide_key, cols):
    """JSON text of the Features of one batch (one string per kept nucleus)."""
    polys = to_level0(geometry.from_wkb(batch["geometry"]), scale_xy_l0, offset_xy_l0)
    names = [QUPATH_NAMES[c] for c in cols]
    values = np.column_stack([batch[c].to_numpy().astype(np.float64) for c in cols]) if cols else \
        np.zeros((batch.num_rows, 0))
    finite = np.isfinite(values)
    values = np.round(values, GEOJSON_MEASUREMENT_DECIMALS)
    rings, ring_geom = shapely.get_rings(polys, return_index=True)
    coords, coord_ring = shapely.get_coordinates(rings, return_index=True)
    coords = np.round(coords, 2)
    ring_start = np.searchsorted(coord_ring, np.arange(len(rings) + 1))
    geom_start = np.searchsorted(ring_geom, np.arange(len(polys) + 1))
    ids = batch["nucleus_id"].to_numpy()
    out = []
    for k in range(len(polys)):
        r0, r1 = geom_start[k], geom_start[k + 1]
        if r0 == r1:
            log.warning("nucleus %d has an empty outline on the level-0 grid; not exported", ids[k])
            continue
        coordinates = [coords[ring_start[r]:ring_start[r + 1]].tolist() for r in range(r0, r1)]
        meas = {n: v for n, v, ok in zip(names, values[k].tolist(), finite[k].tolist()) if ok}
        feature = {
            "type": "Feature",
            "id": nucleus_uuid(slide_key, ids[k]),
            "geometry": {"type": "Polygon", "coordinates": coordinates},
            "properties": {"objectType": "detection", "classification": NUCLEUS_CLASS, "measurements": meas},
        }
        out.append(json.dumps(feature, **_JSON))
    return out


def write_geojson(table, path, *, scale_xy_l0, slide_key, gz=True, offset_xy_l0=(0.0, 0.0)):
    """Write nuclei as a QuPath-readable GeoJSON FeatureCollection of detections.

    One Feature per row: ``id`` = :func:`nucleus_uuid`, ``geometry`` = Polygon in QuPath level-0
    px (2 decimals, closed rings, valid on the 0.01 grid), ``properties`` =
    ``{"objectType": "detection", "classification": {"name": "Nucleus", "color": [r, g, b]},
    "measurements": {QuPath name: finite number}}`` (non-finite values omitted, QuPath 0.4
    cannot read them). UTF-8, compact separators, streamed in batches (memory independent of the
    number of nuclei); ``gz`` writes gzip with ``mtime=0`` and no file name (deterministic bytes).

    Parameters
    ----------
    table : pyarrow.Table
        Final nuclei: ``nucleus_id``, ``geometry`` (WKB, store px), ``score`` and measurement
        columns (:func:`pipeline.stitch.assign_ids` output).
    path : str or os.PathLike
        Destination (``.geojson.gz`` or ``.geojson``).
    scale_xy_l0 : tuple of float
        Level-0 px per store px (x, y).
    slide_key : str
        Stable slide identity for the UUIDs (e.g. the slide file's SHA-256).
    gz : bool
        Gzip the output.
    offset_xy_l0 : tuple of float
        Added to level-0 coordinates (0 when the store starts at QuPath's origin).

    Raises
    ------
    OutputError
        If the file cannot be written.
    """
    cols = _measurement_columns(table)

    def write(tmp):
        with open(tmp, "wb") as raw:
            stream = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) if gz else raw
            try:
                stream.write(b'{"type":"FeatureCollection","features":[')
                first = True
                for batch in _batches(table):
                    feats = _features(batch, scale_xy_l0=scale_xy_l0, offset_xy_l0=offset_xy_l0,
                                      slide_key=slide_key, cols=cols)
                    if feats:
                        stream.write(((",\n" if not first else "\n") + ",\n".join(feats)).encode("utf-8"))
                        first = False
                stream.write(b"\n]}\n")
            finally:
                if gz:
                    stream.close()

    _atomic(path, write)


def geoparquet_table(table, *, scale_xy_l0, slide_key, offset_xy_l0=(0.0, 0.0)):
    """The GeoParquet table (level-0 geometry, uuid) of final nuclei, without writing it.

    Columns: ``nucleus_id`` int64, ``uuid`` string, ``geometry`` WKB (QuPath level-0 px),
    ``score`` float32, ``chunk_row``/``chunk_col`` int32, measurement columns float64 (µm, OD).
    Schema metadata: ``geo`` (GeoParquet 1.1.0, ``crs`` null = pixel coordinates) and ``cellsam``.
    """
    n = table.num_rows
    polys = to_level0(geometry.from_wkb(table["geometry"]), scale_xy_l0, offset_xy_l0) if n else \
        np.empty(0, dtype=object)
    ids = table["nucleus_id"].to_numpy() if n else np.zeros(0, np.int64)
    cols = {
        "nucleus_id": pa.array(ids, type=pa.int64()),
        "uuid": pa.array([nucleus_uuid(slide_key, i) for i in ids.tolist()], type=pa.string()),
        "geometry": pa.array(geometry.to_wkb(polys), type=pa.binary()),
        "score": table["score"].combine_chunks().cast(pa.float32()),
        "chunk_row": table["chunk_row"].combine_chunks().cast(pa.int32()),
        "chunk_col": table["chunk_col"].combine_chunks().cast(pa.int32()),
    }
    for c in MEASUREMENT_COLUMNS:
        cols[c] = table[c].combine_chunks().cast(pa.float64())
    bbox = None
    if n:
        b = shapely.bounds(polys)
        bbox = [float(np.nanmin(b[:, 0])), float(np.nanmin(b[:, 1])), float(np.nanmax(b[:, 2])),
                float(np.nanmax(b[:, 3]))]
    geo_col = {"encoding": "WKB", "geometry_types": ["Polygon"], "crs": None}
    if bbox and all(math.isfinite(v) for v in bbox):
        geo_col["bbox"] = bbox
    geo = {"version": "1.1.0", "primary_column": "geometry", "columns": {"geometry": geo_col}}
    meta = {
        "schema_version": SCHEMA_VERSION,
        "frame": "QuPath level-0 pixels (x = column, y = row, origin top-left)",
        "scale_xy_l0": [float(v) for v in scale_xy_l0],
        "offset_xy_l0": [float(v) for v in offset_xy_l0],
        "units": "µm, µm^2; OD unitless; centroid_*_um in the store frame",
    }
    out = pa.table(cols)
    return out.replace_schema_metadata({
        b"geo": json.dumps(geo, sort_keys=True).encode(),
        b"cellsam": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8"),
    })


def write_geoparquet(table, path, *, scale_xy_l0, slide_key, offset_xy_l0=(0.0, 0.0), row_group_rows=100_000):
    """Write final nuclei as GeoParquet 1.1 (readable by ``geopandas.read_parquet``).

    Parameters
    ----------
    table : pyarrow.Table
        Final nuclei (:func:`pipeline.stitch.assign_ids` output).
    path : str or os.PathLike
        Destination ``.parquet``.
    scale_xy_l0 : tuple of float
        Level-0 px per store px (x, y).
    slide_key : str
        Stable slide identity for the ``uuid`` column (same UUIDs as the GeoJSON).
    offset_xy_l0 : tuple of float
        Added to level-0 coordinates.
    row_group_rows : int
        Rows per row group (streaming readers).

    Raises
    ------
    OutputError
        If the file cannot be written.
    """
    out = geoparquet_table(table, scale_xy_l0=scale_xy_l0, slide_key=slide_key, offset_xy_l0=offset_xy_l0)

    def write(tmp):
        pq.write_table(out, tmp, compression="zstd", row_group_size=row_group_rows, write_statistics=True)

    _atomic(path, write)


def write_json_atomic(obj, path):
    """Write ``obj`` as UTF-8 JSON (sorted keys, indent 2, no NaN), atomically.

    Raises
    ------
    OutputError
        If ``obj`` holds a non-finite float or the file cannot be written.
    """
    try:
        text = json.dumps(obj, sort_keys=True, indent=2, allow_nan=False, ensure_ascii=False) + "\n"
    except ValueError as exc:
        raise OutputError(f"cannot write {path}: {exc} (use None for undefined values)") from exc

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    _atomic(path, write)
