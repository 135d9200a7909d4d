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

import contextlib
import gzip
import hashlib
import json
import logging
import math
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shapely

from . import geometry
from .errors import OutputError
from .cells import CELL_COLUMNS, CELL_QUPATH_NAMES, nucleus_name
from .measure import MEASUREMENT_COLUMNS, QUPATH_NAMES
from .stitch import CLASS_COLUMN, CLASS_PROB_PREFIX, INSTANCE_ID_COLUMN, NOT_NUCLEUS_COLUMN, table_class_names
from .paths import atomic_target, atomic_write, output_error, unlink_quietly

log = logging.getLogger(__name__)

#: Namespace of the nucleus UUIDs: ``uuid5(NUCLEUS_NAMESPACE, f"{slide_key}/{nucleus_id}")``.
NUCLEUS_NAMESPACE = uuid.UUID("6f1c2a3e-5b7d-4e8f-9a0b-c1d2e3f4a5b6")
_NS_BYTES = NUCLEUS_NAMESPACE.bytes
#: QuPath classification of every exported nucleus of a model without a type head.
NUCLEUS_CLASS = {"name": "Nucleus", "color": [0, 128, 255]}
#: QuPath measurement name of a class probability column ``p_<class>`` (typed models).
CLASS_PROBABILITY_NAME = "Class probability: {}"
#: QuPath measurement name of ``not_nucleus_prob`` (models that reject, :data:`pipeline.stitch.NOT_NUCLEUS_COLUMN`).
NOT_NUCLEUS_NAME = "Not-a-nucleus probability"
#: QuPath classification of the instances a model removed as "not a nucleus" (``rejected/<id>.geojson.gz``):
#: QuPath's standard ``Ignore*`` class and colour.
REJECTED_CLASS = {"name": "Ignore*", "color": [180, 180, 180]}
#: Version of the schemas written here (GeoJSON properties, GeoParquet columns, metadata).
SCHEMA_VERSION = 1
#: Decimal places of measurement values in GeoJSON (Parquet keeps full precision).
GEOJSON_MEASUREMENT_DECIMALS = 4
#: gzip level of ``.geojson.gz``. Deflate at level 1 runs ~2.5x faster than level 6 on this
#: text for ~35 % more bytes (``benchmarks/results/postmodel.json``, ``gzip_levels``); at a million
#: nuclei compression is the largest part of the export.
GEOJSON_GZIP_LEVEL = 1
_BATCH_ROWS = 20_000
_PARQUET_SLICE_ROWS = 100_000
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


_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_UUID_HEX_COLS = np.r_[0:8, 9:13, 14:18, 19:23, 24:36]  # where the 32 hex digits go in the 36 chars


def nucleus_uuids_ascii(slide_key, nucleus_ids):
    """:func:`nucleus_uuid` of many nuclei as ASCII bytes, shape (N, 36), uint8.

    The SHA-1 of the common prefix ``namespace + slide_key + "/"`` is computed once and copied per
    nucleus; version/variant bits and the hex formatting are vectorised.
    """
    ids = np.asarray(nucleus_ids, dtype=np.int64)
    out = np.full((len(ids), 36), ord("-"), dtype=np.uint8)
    if not len(ids):
        return out
    prefix = hashlib.sha1(_NS_BYTES + f"{slide_key}/".encode("utf-8"))

    def digest(i):
        h = prefix.copy()
        h.update(b"%d" % i)
        return h.digest()

    d = np.frombuffer(b"".join([digest(i) for i in ids.tolist()]), dtype=np.uint8).reshape(-1, 20)[:, :16].copy()
    d[:, 6] = (d[:, 6] & 0x0F) | 0x50  # version 5
    d[:, 8] = (d[:, 8] & 0x3F) | 0x80  # RFC 4122 variant
    hexd = np.empty((len(ids), 32), dtype=np.uint8)
    hexd[:, 0::2] = _HEX[d >> 4]
    hexd[:, 1::2] = _HEX[d & 0x0F]
    out[:, _UUID_HEX_COLS] = hexd
    return out



def _uuid_ids(table):
    """The ids the UUIDs of ``table``'s rows derive from: ``instance_id`` where present (the id
    before rejected instances were split off, stable across reject thresholds), else ``nucleus_id``."""
    col = INSTANCE_ID_COLUMN if INSTANCE_ID_COLUMN in table.column_names else "nucleus_id"
    return table[col].to_numpy() if table.num_rows else np.zeros(0, np.int64)


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
    return _to_level0(geoms, scale_xy_l0, offset_xy_l0)[0]


def _to_level0(geoms, scale_xy_l0, offset_xy_l0):
    """:func:`to_level0`, plus the coordinates when every result is a single ring (else None).

    Returns ``(polygons, coords (M, 2), coord_geom (M,))``: in the common case (no holes, nothing
    repaired, nothing reoriented) the snapped coordinates computed here are those of the
    polygons, so the GeoJSON writer need not extract them again.
    """
    geoms = np.asarray(geoms, dtype=object)
    if not len(geoms):
        return geoms.copy(), None, None
    snapped, index = shapely.get_coordinates(geoms, return_index=True)
    snapped *= np.asarray(scale_xy_l0, dtype=np.float64)
    snapped += np.asarray(offset_xy_l0, dtype=np.float64)
    # fast path: round to the grid in numpy (the double nearest k / 100, which QuPath's reduction
    # keeps as is) and keep what stays valid; the rest goes through clean_polygons (repair + GEOS)
    np.round(snapped, 2, out=snapped)
    out = shapely.set_coordinates(geoms.copy(), snapped)
    bad = ~shapely.is_valid(out)
    if bad.any():
        out[bad] = geometry.clean_polygons(geometry.scale_translate(geoms[bad], scale_xy_l0, offset_xy_l0))
    # exterior counter-clockwise: signed area of the (single) ring from the coordinates at hand;
    # polygons with holes and repaired ones go through GEOS
    x, y = snapped[:, 0], snapped[:, 1]
    same = index[1:] == index[:-1]
    cross = np.where(same, x[:-1] * y[1:] - x[1:] * y[:-1], 0.0)
    area2 = np.bincount(index[:-1], weights=cross, minlength=len(geoms))
    need = (area2 <= 0) | bad | (shapely.get_num_interior_rings(out) > 0)
    if need.any():
        out[need] = shapely.orient_polygons(out[need])
        return out, None, None
    return out, snapped, index


def _batches(table, rows=_BATCH_ROWS):
    for start in range(0, table.num_rows, rows):
        yield table.slice(start, rows)


def _measurement_columns(table):
    cols = [c for c in MEASUREMENT_COLUMNS if c in table.column_names]
    if "score" in table.column_names:
        cols.append("score")
    if NOT_NUCLEUS_COLUMN in table.column_names:
        cols.append(NOT_NUCLEUS_COLUMN)
    return cols + [CLASS_PROB_PREFIX + n for n in table_class_names(table.schema)]


def _qupath_name(column):
    """QuPath measurement name of a column (``p_<class>`` -> ``Class probability: <class>``)."""
    if column in QUPATH_NAMES:
        return QUPATH_NAMES[column]
    if column == NOT_NUCLEUS_COLUMN:
        return NOT_NUCLEUS_NAME
    return CLASS_PROBABILITY_NAME.format(column[len(CLASS_PROB_PREFIX):])


def _classifications(batch, fixed=None):
    """QuPath ``classification`` objects and each row's index into them (``fixed``: one
    classification dict for every row).

    Returns
    -------
    classes : list of dict
        ``{"name", "color": [r, g, b]}`` per class of the table (:func:`pipeline.stitch.table_class_names`,
        colours of :class:`pipeline.data.classes.ClassVocabulary`), or ``[NUCLEUS_CLASS]`` untyped.
    codes : numpy.ndarray, int64, shape (batch.num_rows,)
        Index of each row's ``class`` in ``classes``.
    """
    if fixed is not None:
        return [fixed], np.zeros(batch.num_rows, dtype=np.int64)
    names = table_class_names(batch.schema)
    if not names:
        return [NUCLEUS_CLASS], np.zeros(batch.num_rows, dtype=np.int64)
    from .data.classes import ClassVocabulary

    vocab = ClassVocabulary.from_names(names)
    classes = [{"name": n, "color": list(c)} for n, c in zip(vocab.names, vocab.colors)]
    row_names = np.asarray(batch[CLASS_COLUMN].to_numpy(zero_copy_only=False), dtype=object)
    lookup = {n: i for i, n in enumerate(names)}
    try:
        codes = np.fromiter((lookup[v] for v in row_names), dtype=np.int64, count=len(row_names))
    except KeyError as exc:
        raise OutputError(f"nucleus table: class {exc.args[0]!r} is not one of its p_<class> columns "
                          f"{list(names)}") from None
    return classes, codes


def _choice_literals(texts, codes):
    """Row ``i`` = ``texts[codes[i]]`` (UTF-8) as a (chars, valid) block of :func:`_text`."""
    enc = [t.encode("utf-8") for t in texts]
    width = max(len(b) for b in enc)
    table = np.zeros((len(enc), width), dtype=np.uint8)
    mask = np.zeros((len(enc), width), dtype=bool)
    for k, b in enumerate(enc):
        table[k, :len(b)] = np.frombuffer(b, dtype=np.uint8)
        mask[k, :len(b)] = True
    return table[codes], mask[codes]


#: Largest |value| written through the vectorised fixed-point formatter (int64 headroom).
_FIXED_POINT_MAX = 1e13


def _fixed_point(values, decimals):
    """Decimal text of ``round(values, decimals)`` as a char matrix, trailing zeros trimmed.

    Parameters
    ----------
    values : numpy.ndarray, float64, shape (n,)
        Finite, ``|v| < _FIXED_POINT_MAX``.
    decimals : int

    Returns
    -------
    chars : numpy.ndarray, uint8, shape (n, W)
    valid : numpy.ndarray, bool, shape (n, W)
        ``chars[valid]`` (row-major) is the concatenated text, e.g. ``-12.5``, ``3``, ``0.0125``:
        the digits of the double nearest ``round(v, decimals)`` (what ``json.dumps`` of that
        double shows, without exponent or trailing ``.0``).
    """
    q = np.rint(np.asarray(values, dtype=np.float64) * 10.0**decimals)  # = np.round's scaling
    n = len(q)
    top = float(np.abs(q).max()) if n else 0.0
    t = np.abs(q).astype(np.uint32 if top < 2**32 else np.uint64)
    n_int = max(1, len(str(int(top // 10**decimals))))
    width = 1 + n_int + 1 + decimals
    chars = np.empty((n, width), dtype=np.uint8)
    valid = np.empty((n, width), dtype=bool)
    chars[:, 0] = ord("-")
    valid[:, 0] = q < 0  # rint(-0.4) = -0.0 is not < 0: no "-0"
    n_frac = np.zeros(n, dtype=np.int8)  # significant fraction digits (trailing zeros trimmed)
    for c in range(decimals, 0, -1):  # least significant first
        t10 = t // 10
        digit = t - t10 * 10
        t = t10
        chars[:, 1 + n_int + c] = digit + 48
        n_frac[(n_frac == 0) & (digit != 0)] = c
    chars[:, 1 + n_int] = ord(".")
    valid[:, 1 + n_int] = n_frac > 0
    valid[:, 2 + n_int :] = np.arange(1, decimals + 1, dtype=np.int8)[None, :] <= n_frac[:, None]
    for c in range(n_int, 0, -1):
        t10 = t // 10
        chars[:, c] = t - t10 * 10 + 48
        valid[:, c] = t > 0  # no leading zeros: shown iff this or a more significant digit is nonzero
        t = t10
    valid[:, n_int] = True  # the units digit, also of 0
    return chars, valid


def _literal(text, n):
    """``text`` (UTF-8) repeated as an (n, len) char matrix and an all-true mask."""
    b = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    return np.broadcast_to(b, (n, len(b))), np.ones((n, len(b)), dtype=bool)


def _text(parts):
    """Concatenate (chars, valid) column blocks; returns the row-major text and per-row lengths."""
    n = parts[0][0].shape[0]
    width = sum(c.shape[1] for c, _ in parts)
    chars = np.empty((n, width), dtype=np.uint8)
    valid = np.empty((n, width), dtype=bool)
    col = 0
    for c, v in parts:
        chars[:, col : col + c.shape[1]] = c
        valid[:, col : col + c.shape[1]] = v
        col += c.shape[1]
    return chars[valid].tobytes(), np.count_nonzero(valid, axis=1)


def _features(batch, *, scale_xy_l0, offset_xy_l0, slide_key, cols, classification=None):
    """JSON text of the Features of one batch, joined by ``",\n"`` (bytes, UTF-8).

    Vectorised: numbers are formatted as fixed-point char matrices (``_fixed_point``) and literal
    pieces as constant columns; only the final interleaving of each feature's coordinates with
    its head and tail is a Python join of byte slices. Same JSON values as :func:`_features_json`
    (which batches with out-of-range numbers fall back to). Returns ``(text, n_features)``.
    """
    polys, coords, coord_ring = _to_level0(geometry.from_wkb(batch["geometry"]), scale_xy_l0, offset_xy_l0)
    ids = batch["nucleus_id"].to_numpy()
    values = np.column_stack([batch[c].to_numpy().astype(np.float64) for c in cols]) if cols else \
        np.zeros((batch.num_rows, 0))
    if coords is None:  # holes or repaired polygons in this batch: rings from GEOS
        rings, ring_geom = shapely.get_rings(polys, return_index=True)
        coords, coord_ring = shapely.get_coordinates(rings, return_index=True)
    else:  # one ring per polygon, coordinates at hand
        ring_geom = np.arange(len(polys))
        rings = ring_geom
    finite = np.isfinite(values)
    if (np.abs(values[finite]) >= _FIXED_POINT_MAX).any() or (np.abs(coords) >= _FIXED_POINT_MAX).any():
        return _features_json(batch, polys, values, finite, ids, slide_key=slide_key, cols=cols,
                              classification=classification)
    n_ring_of = np.bincount(ring_geom, minlength=len(polys))
    empty = n_ring_of == 0
    for i in ids[empty].tolist():
        log.warning("nucleus %d has an empty outline on the level-0 grid; not exported", i)
    keep = ~empty
    n = int(keep.sum())
    if not n:
        return b"", 0
    # coordinates: one row per vertex, "[[[x,y],[x,y]],[[x,y],...]]" per polygon
    nv = len(coords)
    first_v = np.ones(nv, dtype=bool)
    first_v[1:] = coord_ring[1:] != coord_ring[:-1]
    last_v = np.ones(nv, dtype=bool)
    last_v[:-1] = coord_ring[1:] != coord_ring[:-1]
    ring_no = np.arange(len(rings)) - np.searchsorted(ring_geom, ring_geom)  # ring number in its polygon
    last_ring = np.ones(len(rings), dtype=bool)
    last_ring[:-1] = ring_geom[1:] != ring_geom[:-1]
    first_ring_v = (ring_no == 0)[coord_ring] & first_v
    pre0 = np.where(first_ring_v, ord("["), ord(","))[:, None].astype(np.uint8)
    pre1 = np.full((nv, 1), ord("["), dtype=np.uint8)
    xs, ys = _fixed_point(coords[:, 0], 2), _fixed_point(coords[:, 1], 2)
    suf = np.full((nv, 2), ord("]"), dtype=np.uint8)
    suf_valid = np.column_stack([last_v, last_v & last_ring[coord_ring]])
    ctext, clen = _text([
        (pre0, np.ones((nv, 1), dtype=bool)), (pre1, first_v[:, None]),
        _literal("[", nv), xs, _literal(",", nv), ys, _literal("]", nv),
        (suf, suf_valid),
    ])
    geom_of_v = ring_geom[coord_ring]
    c_end = np.cumsum(np.bincount(geom_of_v, weights=clen, minlength=len(polys)).astype(np.int64))
    c_start = c_end - np.bincount(geom_of_v, weights=clen, minlength=len(polys)).astype(np.int64)
    # head (up to the coordinates) and tail (after them) of each kept feature
    values_k, finite_k = values[keep], finite[keep]
    head, hlen = _text([
        _literal('{"type":"Feature","id":"', n),
        (nucleus_uuids_ascii(slide_key, _uuid_ids(batch)[keep]), np.ones((n, 36), dtype=bool)),
        _literal('","geometry":{"type":"Polygon","coordinates":', n),
    ])
    classes, codes = _classifications(batch, classification)
    parts = [_literal('},"properties":{"objectType":"detection","classification":', n),
             _choice_literals([json.dumps(c, **_JSON) for c in classes], codes[keep]),
             _literal(',"measurements":{', n)]
    seen = np.zeros(n, dtype=bool)
    for k, c in enumerate(cols):
        ok = finite_k[:, k]
        comma = (np.full((n, 1), ord(","), dtype=np.uint8), (ok & seen)[:, None])
        name_chars, _ = _literal(json.dumps(_qupath_name(c), **_JSON) + ":", n)
        num_chars, num_valid = _fixed_point(np.where(ok, values_k[:, k], 0.0), GEOJSON_MEASUREMENT_DECIMALS)
        parts += [comma, (name_chars, np.broadcast_to(ok[:, None], name_chars.shape)), (num_chars, num_valid & ok[:, None])]
        seen |= ok
    parts.append(_literal("}}}", n))
    tail, tlen = _text(parts)
    h_end, t_end = np.cumsum(hlen), np.cumsum(tlen)
    h_start, t_start = h_end - hlen, t_end - tlen
    kept = np.flatnonzero(keep)
    cs, ce = c_start[kept].tolist(), c_end[kept].tolist()
    out = []
    for i, (a0, a1, b0, b1, d0, d1) in enumerate(zip(h_start.tolist(), h_end.tolist(), cs, ce,
                                                     t_start.tolist(), t_end.tolist())):
        out += (head[a0:a1], ctext[b0:b1], tail[d0:d1])
    return b",\n".join([b"".join(out[i : i + 3]) for i in range(0, len(out), 3)]), n


def _features_json(batch, polys, values, finite, ids, *, slide_key, cols, classification=None):
    """Reference / fallback of :func:`_features`: one ``json.dumps`` per Feature."""
    names = [_qupath_name(c) for c in cols]
    uids = _uuid_ids(batch)
    classes, codes = _classifications(batch, classification)
    values = np.round(values, GEOJSON_MEASUREMENT_DECIMALS)
    rings, ring_geom = shapely.get_rings(polys, return_index=True)
    coords, coord_ring = shapely.get_coordinates(rings, return_index=True)
    coords = np.round(coords, 2)
    ring_start = np.searchsorted(coord_ring, np.arange(len(rings) + 1))
    geom_start = np.searchsorted(ring_geom, np.arange(len(polys) + 1))
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
            "id": nucleus_uuid(slide_key, uids[k]),
            "geometry": {"type": "Polygon", "coordinates": coordinates},
            "properties": {"objectType": "detection", "classification": classes[codes[k]], "measurements": meas},
        }
        out.append(json.dumps(feature, **_JSON))
    return ",\n".join(out).encode("utf-8"), len(out)


def _rings_json(poly):
    """GeoJSON ``coordinates`` of a level-0 Polygon (rings as lists of [x, y], 2 decimals)."""
    rings = [poly.exterior, *poly.interiors]
    return [np.round(np.asarray(r.coords), 2).tolist() for r in rings]


def _cell_features(batch, *, scale_xy_l0, offset_xy_l0, slide_key, cols):
    """JSON text of QuPath *cell* Features (one per row with ``cell_geometry``), joined by ``",\n"``.

    ``geometry`` = the cell, ``nucleusGeometry`` = the nucleus (a Feature-level sibling of
    ``geometry``, as QuPath's reader expects), ``objectType`` ``"cell"``; measurements are the
    nucleus ones prefixed ``Nucleus: `` (:func:`pipeline.cells.nucleus_name`) then the cell ones
    (:data:`pipeline.cells.CELL_QUPATH_NAMES`), non-finite values omitted. Returns ``(text, n)``.
    """
    nuclei = to_level0(geometry.from_wkb(batch["geometry"]), scale_xy_l0, offset_xy_l0)
    cells = to_level0(geometry.from_wkb(batch["cell_geometry"]), scale_xy_l0, offset_xy_l0)
    ids = batch["nucleus_id"].to_numpy()
    uids = _uuid_ids(batch)
    names = [nucleus_name(c) if c in QUPATH_NAMES else _qupath_name(c) for c in cols] + \
        [CELL_QUPATH_NAMES[c] for c in CELL_COLUMNS]
    classes, codes = _classifications(batch)
    values = np.column_stack([batch[c].to_numpy().astype(np.float64) for c in (*cols, *CELL_COLUMNS)])
    finite = np.isfinite(values)
    values = np.round(np.where(finite, values, 0.0), GEOJSON_MEASUREMENT_DECIMALS)
    empty = shapely.is_empty(nuclei) | shapely.is_empty(cells)
    out = []
    for k in range(len(ids)):
        if empty[k]:
            log.warning("cell %d has an empty outline on the level-0 grid; not exported", ids[k])
            continue
        meas = {n: v for n, v, ok in zip(names, values[k].tolist(), finite[k].tolist()) if ok}
        feature = {
            "type": "Feature",
            "id": nucleus_uuid(slide_key, uids[k]),
            "geometry": {"type": "Polygon", "coordinates": _rings_json(cells[k])},
            "nucleusGeometry": {"type": "Polygon", "coordinates": _rings_json(nuclei[k])},
            "properties": {"objectType": "cell", "classification": classes[codes[k]], "measurements": meas},
        }
        out.append(json.dumps(feature, **_JSON))
    return ",\n".join(out).encode("utf-8"), len(out)


class _AtomicSink:
    """A file written in pieces to its :func:`~pipeline.paths.atomic_target` and renamed on
    :meth:`close`; any failure removes the temporary (nothing incomplete under any name) and an
    ``OSError`` becomes one :class:`OutputError` line naming the file. Use as a context manager."""

    what = ""

    def __init__(self, path):
        self.path = Path(path)
        self.tmp = atomic_target(self.path)
        self._done = False

    def _open(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OSError as exc:
            unlink_quietly(self.tmp)
            raise output_error(self.path, exc, self.what) from exc

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except OSError as exc:
            self.abort()
            raise output_error(self.path, exc, self.what) from exc
        except BaseException:
            self.abort()
            raise

    def write(self, table):
        """Append final nuclei (:func:`pipeline.stitch.assign_ids` rows, in id order)."""
        self._guard(self._write, table)

    def close(self):
        """Finish the file and move it onto its final name."""
        if self._done:
            return
        self._guard(self._finish)
        self._guard(os.replace, self.tmp, self.path)
        self._done = True

    def abort(self):
        """Drop the temporary (idempotent)."""
        if self._done:
            return
        self._done = True
        try:
            self._cleanup()
        finally:
            unlink_quietly(self.tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


class GeoJSONWriter(_AtomicSink):
    """Streaming QuPath GeoJSON writer (see :func:`write_geojson` for the format).

    Memory is bounded by one batch of :data:`_BATCH_ROWS` features, whatever the number of
    nuclei: tables given to :meth:`write` are formatted in slices, and compression of one slice
    overlaps the formatting of the next (one worker thread, writes in order).
    """

    what = "GeoJSON"

    def __init__(self, path, *, scale_xy_l0, slide_key, gz=True, offset_xy_l0=(0.0, 0.0), classification=None):
        super().__init__(path)
        self.scale_xy_l0, self.offset_xy_l0, self.slide_key = scale_xy_l0, offset_xy_l0, slide_key
        self.classification = classification  # one QuPath classification for every feature (None: the table's)
        self._cols = None
        self._first = True
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._pending = []
        self._raw = self._open(open, self.tmp, "wb")
        self._stream = gzip.GzipFile(filename="", mode="wb", fileobj=self._raw, mtime=0,
                                     compresslevel=GEOJSON_GZIP_LEVEL) if gz else self._raw
        self._put(b'{"type":"FeatureCollection","features":[')

    def _put(self, data):  # compress/write in order on the worker thread (zlib releases the GIL)
        if self._pending:
            self._pending.pop().result()  # at most one batch in flight: bounded memory
        self._pending.append(self._pool.submit(self._stream.write, data))

    def _write(self, table):
        if self._cols is None:
            self._cols = _measurement_columns(table)
        cells = "cell_geometry" in table.column_names
        features = _cell_features if cells else _features
        extra = {} if cells else {"classification": self.classification}
        for batch in _batches(table):
            text, n = features(batch, scale_xy_l0=self.scale_xy_l0, offset_xy_l0=self.offset_xy_l0,
                               slide_key=self.slide_key, cols=self._cols, **extra)
            if n:
                self._put((b"\n" if self._first else b",\n") + text)
                self._first = False

    def _finish(self):
        self._put(b"\n]}\n")
        self._pending.pop().result()
        self._pool.shutdown()
        if self._stream is not self._raw:
            self._stream.close()
        self._raw.close()

    def _cleanup(self):
        for f in self._pending:  # an error in the main thread: let the last write finish first
            f.exception()
        self._pending.clear()
        self._pool.shutdown()
        self._raw.close()


def write_geojson(table, path, *, scale_xy_l0, slide_key, gz=True, offset_xy_l0=(0.0, 0.0)):
    """Write nuclei as a QuPath-readable GeoJSON FeatureCollection of detections.

    One Feature per row: ``id`` = :func:`nucleus_uuid`, ``geometry`` = Polygon in QuPath level-0
    px (2 decimals, closed rings, valid on the 0.01 grid), ``properties`` =
    ``{"objectType": "detection", "classification": {"name": "Nucleus", "color": [r, g, b]},
    "measurements": {QuPath name: finite number}}`` (non-finite values omitted, QuPath 0.4
    cannot read them). UTF-8, compact separators, streamed in batches (memory independent of the
    number of nuclei); ``gz`` writes gzip (level :data:`GEOJSON_GZIP_LEVEL`) with ``mtime=0``
    and no file name (deterministic bytes). Features are formatted with vectorised numpy code
    (numbers as fixed-point text: at most 2 decimals for coordinates, 4 for measurements,
    trailing zeros trimmed). A whole slide is written strip by strip with :class:`GeoJSONWriter`.

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
    with GeoJSONWriter(path, scale_xy_l0=scale_xy_l0, slide_key=slide_key, gz=gz, offset_xy_l0=offset_xy_l0) as w:
        w.write(table)


#: Arrow schema of the GeoParquet nuclei table (:func:`geoparquet_table`).
GEOPARQUET_SCHEMA = pa.schema(
    [("nucleus_id", pa.int64()), ("uuid", pa.string()), ("slide_id", pa.string()), ("geometry", pa.binary()),
     ("score", pa.float32()), ("chunk_row", pa.int32()), ("chunk_col", pa.int32())]
    + [(c, pa.float64()) for c in MEASUREMENT_COLUMNS]
)
#: With cells (``--cell-expansion-um``): the cell outline (level-0 WKB) and the cell measurements.
GEOPARQUET_CELL_SCHEMA = pa.schema(
    list(GEOPARQUET_SCHEMA) + [("cell_geometry", pa.binary())] + [(c, pa.float64()) for c in CELL_COLUMNS])


def geoparquet_schema(cells=False, class_names=(), reject=False):
    """:data:`GEOPARQUET_SCHEMA` (or :data:`GEOPARQUET_CELL_SCHEMA`), plus ``not_nucleus_prob``
    (float32) for a model that rejects, plus ``class`` (string, the argmax class) and ``p_<class>``
    (float32, one per class in model order) for a typed model."""
    fields = list(GEOPARQUET_CELL_SCHEMA if cells else GEOPARQUET_SCHEMA)
    if reject:
        fields.append((NOT_NUCLEUS_COLUMN, pa.float32()))
    if class_names:
        fields += [(CLASS_COLUMN, pa.string())] + [(CLASS_PROB_PREFIX + str(n), pa.float32()) for n in class_names]
    return pa.schema(fields)


def _level0_wkb(column, scale_xy_l0, offset_xy_l0):
    """Level-0 WKB of a store-px WKB column in slices, and the bbox (lo (2,), hi (2,))."""
    n = len(column)
    wkb, lo, hi = [], np.full(2, np.inf), np.full(2, -np.inf)
    for start in range(0, n, _PARQUET_SLICE_ROWS):
        polys = to_level0(geometry.from_wkb(column.slice(start, _PARQUET_SLICE_ROWS)), scale_xy_l0, offset_xy_l0)
        wkb.append(pa.array(geometry.to_wkb(polys), type=pa.binary()))
        b = shapely.bounds(polys)
        if np.isfinite(b).any():
            lo = np.fmin(lo, np.nanmin(b[:, :2], axis=0))
            hi = np.fmax(hi, np.nanmax(b[:, 2:], axis=0))
        del polys
    return pa.chunked_array(wkb, type=pa.binary()), lo, hi


def _geoparquet_rows(table, *, scale_xy_l0, slide_key, offset_xy_l0, slide_id=None, schema=GEOPARQUET_SCHEMA):
    """Columns of ``schema`` for final nuclei, and the level-0 bbox (lo (2,), hi (2,))."""
    n = table.num_rows
    ids = table["nucleus_id"].to_numpy() if n else np.zeros(0, np.int64)
    # level-0 geometry in slices (bounded temporaries: shapely objects and coordinates of one slice)
    geom, lo, hi = _level0_wkb(table["geometry"], scale_xy_l0, offset_xy_l0)

    def column(name, type_):
        col = table[name]
        return col if col.type == type_ else col.cast(type_)

    cols = {
        "nucleus_id": pa.array(ids, type=pa.int64()),
        "uuid": pa.StringArray.from_buffers(
            n, pa.py_buffer(np.arange(0, 36 * (n + 1), 36, dtype=np.int32)),
            pa.py_buffer(nucleus_uuids_ascii(slide_key, _uuid_ids(table)).tobytes())),
        "slide_id": pa.array([str(slide_id if slide_id is not None else slide_key)] * n, type=pa.string()),
        "geometry": geom,
    }
    if "cell_geometry" in schema.names:
        cols["cell_geometry"], clo, chi = _level0_wkb(table["cell_geometry"], scale_xy_l0, offset_xy_l0)
        lo, hi = np.fmin(lo, clo), np.fmax(hi, chi)  # cells contain their nuclei: the bbox of all
    for f in schema:
        if f.name not in cols:
            cols[f.name] = column(f.name, f.type)
    return pa.table(cols, schema=schema), lo, hi


def _geoparquet_metadata(lo, hi, n, *, scale_xy_l0, offset_xy_l0, cells=False):
    bbox = [float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])] if n else None
    geo_col = {"encoding": "WKB", "geometry_types": ["Polygon"], "crs": None}
    columns = {"geometry": geo_col}
    if cells:
        columns["cell_geometry"] = dict(geo_col)
    if bbox and all(math.isfinite(v) for v in bbox):
        for col in columns.values():
            col["bbox"] = bbox
    geo = {"version": "1.1.0", "primary_column": "geometry", "columns": columns}
    meta = {
        "schema_version": SCHEMA_VERSION,
        "frame": "QuPath level-0 pixels (x = column, y = row, origin top-left)",
        "scale_xy_l0": [float(v) for v in scale_xy_l0],
        "offset_xy_l0": [float(v) for v in offset_xy_l0],
        "units": "µm, µm^2; OD unitless; centroid_*_um in the store frame",
    }
    return {
        b"geo": json.dumps(geo, sort_keys=True).encode(),
        b"cellsam": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8"),
    }


def geoparquet_table(table, *, scale_xy_l0, slide_key, offset_xy_l0=(0.0, 0.0), slide_id=None):
    """The GeoParquet table (level-0 geometry, uuid) of final nuclei, without writing it.

    Columns (:data:`GEOPARQUET_SCHEMA`): ``nucleus_id`` int64, ``uuid`` string, ``slide_id``
    string (default ``slide_key``; joins cohort tables), ``geometry`` WKB (QuPath level-0 px),
    ``score`` float32, ``chunk_row``/``chunk_col`` int32 (the store chunk whose window produced
    the nucleus: provenance, see docs/outputs.md), measurement columns float64 (µm, OD). With a
    ``cell_geometry`` column in ``table`` (:mod:`pipeline.cells`): :data:`GEOPARQUET_CELL_SCHEMA`
    (``cell_geometry`` WKB level-0 px, a second geometry column, plus the cell measurements).
    A typed table (``class``/``p_<class>`` columns, :func:`pipeline.stitch.chunk_schema`) keeps
    them last (:func:`geoparquet_schema`). Schema metadata: ``geo`` (GeoParquet 1.1.0, ``crs`` null = pixel coordinates) and ``cellsam``.
    """
    cells = "cell_geometry" in table.column_names
    out, lo, hi = _geoparquet_rows(table, scale_xy_l0=scale_xy_l0, slide_key=slide_key, offset_xy_l0=offset_xy_l0,
                                   slide_id=slide_id,
                                   schema=geoparquet_schema(cells, table_class_names(table.schema),
                                                            NOT_NUCLEUS_COLUMN in table.column_names))
    return out.replace_schema_metadata(_geoparquet_metadata(lo, hi, out.num_rows, scale_xy_l0=scale_xy_l0,
                                                            offset_xy_l0=offset_xy_l0, cells=cells))


class GeoParquetWriter(_AtomicSink):
    """Streaming GeoParquet writer (see :func:`write_geoparquet` for the format).

    Rows are buffered into row groups of exactly ``row_group_rows`` (the last one shorter), so the
    bytes do not depend on how the nuclei were batched. The ``geo`` metadata (with the bbox of all
    rows) and ``cellsam`` metadata are written into the footer at :meth:`close`; the Arrow schema
    is not stored (every column type round-trips without it), so readers see both keys.
    """

    what = "GeoParquet"

    def __init__(self, path, *, scale_xy_l0, slide_key, offset_xy_l0=(0.0, 0.0), row_group_rows=100_000,
                 slide_id=None, cells=False, class_names=(), reject=False):
        super().__init__(path)
        self.scale_xy_l0, self.offset_xy_l0, self.slide_key = scale_xy_l0, offset_xy_l0, slide_key
        self.slide_id, self.cells = slide_id, bool(cells)
        self.schema = geoparquet_schema(cells, class_names, reject)
        self.row_group_rows = int(row_group_rows)
        self._lo, self._hi, self._n = np.full(2, np.inf), np.full(2, -np.inf), 0
        self._buf, self._buf_rows = [], 0
        self._writer = self._open(pq.ParquetWriter, self.tmp, self.schema, compression="zstd",
                                  write_statistics=True, store_schema=False)

    def _flush(self, final):
        while self._buf_rows >= self.row_group_rows or (final and self._buf_rows):
            whole = pa.concat_tables(self._buf)
            take = min(self.row_group_rows, whole.num_rows)
            self._writer.write_table(whole.slice(0, take), row_group_size=take)
            rest = whole.slice(take)
            self._buf, self._buf_rows = ([rest] if rest.num_rows else []), rest.num_rows

    def _write(self, table):
        rows, lo, hi = _geoparquet_rows(table, scale_xy_l0=self.scale_xy_l0, slide_key=self.slide_key,
                                        offset_xy_l0=self.offset_xy_l0, slide_id=self.slide_id, schema=self.schema)
        self._lo, self._hi = np.fmin(self._lo, lo), np.fmax(self._hi, hi)
        self._n += rows.num_rows
        if rows.num_rows:
            self._buf.append(rows)
            self._buf_rows += rows.num_rows
            self._flush(final=False)

    def _finish(self):
        self._flush(final=True)
        self._writer.add_key_value_metadata(_geoparquet_metadata(
            self._lo, self._hi, self._n, scale_xy_l0=self.scale_xy_l0, offset_xy_l0=self.offset_xy_l0,
            cells=self.cells))
        self._writer.close()

    def _cleanup(self):
        with contextlib.suppress(Exception):
            self._writer.close()


def write_geoparquet(table, path, *, scale_xy_l0, slide_key, offset_xy_l0=(0.0, 0.0), row_group_rows=100_000,
                     slide_id=None):
    """Write final nuclei as GeoParquet 1.1 (readable by ``geopandas.read_parquet``).

    Columns: :data:`GEOPARQUET_SCHEMA` (see :func:`geoparquet_table`); zstd, statistics, row groups
    of ``row_group_rows``. A whole slide is written strip by strip with :class:`GeoParquetWriter`.

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
    with GeoParquetWriter(path, scale_xy_l0=scale_xy_l0, slide_key=slide_key, offset_xy_l0=offset_xy_l0,
                          row_group_rows=row_group_rows, slide_id=slide_id,
                          cells="cell_geometry" in table.column_names, class_names=table_class_names(table.schema),
                          reject=NOT_NUCLEUS_COLUMN in table.column_names) as w:
        w.write(table)


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

    atomic_write(path, write)
