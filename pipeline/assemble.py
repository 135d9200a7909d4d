"""Stitch stage, streamed: chunk files -> final nuclei strip by strip, in bounded memory.

The I/O shell around :mod:`pipeline.stitch`. Its result is exactly
``assign_ids(resolve_duplicates(concat(chunk tables)))`` (same rows, same values, same order, same
ids; ``tests/test_assemble.py``), but no step holds the whole slide's nucleus table: peak memory
grows with the slide's *width* (a few chunk rows), not with its area or nucleus count.

Three passes over the chunk files (``files``: (chunk_row, chunk_col) -> Parquet path, the output of
:func:`pipeline.infer.run_infer`), each reading one chunk row at a time:

0. **scan** (:func:`scan_chunks`): columns ``anchor_y_px`` and ``core_margin_px`` only ->
   the dedup reach ``D`` (:func:`pipeline.stitch.band_reach`), the strip range and how far a chunk
   row's anchors reach into neighbouring strips, the halo-drop count.
1. **dedup** (:func:`resolve_streaming`): band rows (``core_margin_px <= D``) of chunk row ``r``
   with their geometry; overlapping pairs are found against the band rows of the previous
   ``k = floor(2 D / chunk_px) + 1`` chunk rows (no instance of an older row can reach row ``r``).
   A connected component of the pair graph whose members all lie in rows ``<= r - k`` can gain
   no more pairs: it is resolved by :func:`pipeline.stitch.greedy_resolve` and forgotten. The
   outcome of a pair depends only on its component, so this equals the global greedy order.
   Result: the dropped ``(chunk, local_id)`` and the clipped polygons (a few % of the rows).
2. **strips** (:func:`iter_nuclei`): strip ``s`` = nuclei whose rounded anchor row lies in
   ``[s * chunk_px, (s + 1) * chunk_px)``. Ids are ordered by rounded anchor row first
   (:func:`pipeline.stitch.assign_ids`), so numbering strip after strip gives the global ids. A
   strip needs the chunk rows up to ``s + rows_ahead`` (usually ``s + 1``: anchors within
   ``anchor_eps_px`` above a core); each chunk row is read once, cut down to its rest once
   mostly consumed, and released after its last strip, so about two chunk rows of nuclei are in
   memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import geometry
from .config import SegmentConfig
from .errors import InputError
from .focus import FOCUS_KEY, decode_core_focus
from .stitch import (
    CHUNK_SCHEMA,
    chunk_schema,
    table_class_names,
    table_rejects,
    apply_dedup,
    assign_ids,
    band_reach,
    empty_chunk_table,
    greedy_resolve,
    id_order_keys,
    in_band,
    overlap_pairs,
    _rank,
)

log = logging.getLogger(__name__)

_KEY = ["chunk_row", "chunk_col", "local_id", "score", "owned", "core_margin_px"]


@dataclass
class ChunkScan:
    """What pass 0 learns about a set of chunk files (:func:`scan_chunks`)."""

    rows: dict  #: chunk_row -> list of ((chunk_row, chunk_col), path), in column order
    chunk_px: int  #: core edge, store px (strip height)
    reach_px: float = 0.0  #: dedup reach D, store px
    strip_lo: int = 0  #: first strip holding a nucleus
    strip_hi: int = -1  #: last strip holding a nucleus
    rows_ahead: int = 0  #: max(chunk_row - strip): strip s may need chunk rows up to s + rows_ahead
    instances: int = 0  #: rows over all chunk files (before dedup)
    n_truncated_owned: int = 0  #: masks dropped at an inner window edge (halo too small if > 0)
    n_implausible_owned: int = 0  #: owned objects dropped as implausible nuclei (size/shape rule)
    class_names: tuple = ()  #: type head classes of the chunk files (``class``/``p_<name>`` columns); () untyped
    reject: bool = False  #: the chunk files have the reject columns (``not_nucleus_prob``, ``rejected``)
    #: (chunk_row, chunk_col) -> (edges_r, edges_c, sharpness float32 (n_r, n_c), NaN = not scored): the
    #: block sharpness of each chunk's core (:func:`pipeline.focus.encode_core_focus`); chunk files written
    #: before it existed have none
    focus: dict = field(default_factory=dict)


@dataclass
class DedupResult:
    """What pass 1 decides (:func:`resolve_streaming`)."""

    dropped: dict = field(default_factory=dict)  #: (chunk_row, chunk_col) -> int32 local ids
    clipped: dict = field(default_factory=dict)  #: (chunk_row, chunk_col) -> {local_id: Polygon}
    band: int = 0  #: band instances
    pairs: int = 0  #: overlapping pairs
    conflicts: int = 0  #: pairs whose windows disagreed on the partition (pipeline.stitch.resolve_duplicates)


def _read(path, columns=None):
    try:
        pf = pq.ParquetFile(path)
        table = pf.read(columns=columns)
    except (OSError, pa.ArrowInvalid) as exc:
        raise InputError(f"{path}: unreadable chunk file ({exc}); rerun `cellsam infer`") from exc
    return pf, table


def _strip(anchor_y_px, chunk_px):
    y, _ = id_order_keys(anchor_y_px, anchor_y_px)
    return np.floor_divide(y, chunk_px)


def scan_chunks(files, chunk_px):
    """Pass 0: light scan of the chunk files.

    Parameters
    ----------
    files : dict of (int, int) -> path
        Chunk Parquet files (:data:`pipeline.stitch.CHUNK_SCHEMA`).
    chunk_px : int
        Core edge, store px (the store's chunk size).

    Returns
    -------
    ChunkScan
    """
    scan = ChunkScan(rows={}, chunk_px=int(chunk_px))
    lo, hi = np.inf, -np.inf
    reach = 0.0
    for rc in sorted(files):
        scan.rows.setdefault(int(rc[0]), []).append(((int(rc[0]), int(rc[1])), files[rc]))
        pf, t = _read(files[rc], ["anchor_y_px", "core_margin_px"])
        md = pf.schema_arrow.metadata or {}
        names = table_class_names(pf.schema_arrow)
        rejects = table_rejects(pf.schema_arrow)
        if rc == min(files):
            scan.class_names, scan.reject = names, rejects
        elif names != scan.class_names:
            raise InputError(f"{files[rc]}: chunk file classes {list(names)} differ from {list(scan.class_names)} "
                             "of the other chunks; rerun `cellsam infer`")
        elif rejects != scan.reject:
            raise InputError(f"{files[rc]}: chunk file {'has' if rejects else 'lacks'} the reject columns, unlike "
                             "the other chunks; rerun `cellsam infer`")
        scan.n_truncated_owned += int(md.get(b"n_truncated_owned", b"0") or 0)
        scan.n_implausible_owned += int(md.get(b"n_implausible_owned", b"0") or 0)
        if md.get(FOCUS_KEY):
            scan.focus[(int(rc[0]), int(rc[1]))] = decode_core_focus(md[FOCUS_KEY])
        if not t.num_rows:
            continue
        scan.instances += t.num_rows
        reach = max(reach, band_reach(t["core_margin_px"].to_numpy()))
        strip = _strip(t["anchor_y_px"].to_numpy(), scan.chunk_px)
        lo, hi = min(lo, int(strip.min())), max(hi, int(strip.max()))
        scan.rows_ahead = max(scan.rows_ahead, int(rc[0]) - int(strip.min()))
    scan.reach_px = reach
    if scan.instances:
        scan.strip_lo, scan.strip_hi = int(lo), int(hi)
    return scan


def _band_rows(scan, r):
    """Band rows of chunk row ``r``: key columns + shapely geometry, in file order."""
    parts, geoms = [], []
    for _, path in scan.rows.get(r, []):
        _, t = _read(path, _KEY + ["geometry"])
        keep = in_band(t["core_margin_px"].to_numpy(), scan.reach_px)
        if keep.any():
            t = t.filter(pa.array(keep))
            parts.append({c: t[c].to_numpy(zero_copy_only=False) for c in _KEY})
            geoms.append(geometry.from_wkb(t["geometry"]))
    if not parts:
        return None
    out = {c: np.concatenate([p[c] for p in parts]) for c in _KEY}
    out["geometry"] = np.concatenate(geoms)
    return out


def _concat(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return {c: np.concatenate([a[c], b[c]]) for c in a}


def _take(nodes, idx):
    return {c: v[idx] for c, v in nodes.items()}


def resolve_streaming(scan, *, mpp, dedup_iou, min_area_px, conflict_min_width_px=None):
    """Pass 1: resolve duplicates across chunks, chunk row by chunk row (see the module doc).

    Parameters
    ----------
    scan : ChunkScan
        Output of :func:`scan_chunks`.
    mpp, dedup_iou, min_area_px, conflict_min_width_px : float
        As :func:`pipeline.stitch.resolve_duplicates`.

    Returns
    -------
    DedupResult
    """
    if conflict_min_width_px is None:
        conflict_min_width_px = SegmentConfig.conflict_min_width_um / mpp
    res = DedupResult()
    stats = {"conflicts": 0}
    if not scan.instances:
        return res
    k = int(2 * scan.reach_px // scan.chunk_px) + 1  # older rows cannot reach the current one
    live = None  # band rows that may still pair or sit in an open component, in table order
    next_id = 0
    open_pairs = np.zeros((0, 2), np.int64)  # node ids (left < right in table order)
    open_iou = np.zeros(0)

    def resolve(final_pairs, final_iou):
        nodes_ids = np.unique(final_pairs)
        pos = np.searchsorted(live["id"], nodes_ids)
        sub = _take(live, pos)
        geoms = sub["geometry"].copy()
        local = np.searchsorted(nodes_ids, final_pairs)
        rank = _rank(sub["owned"], sub["score"], sub["chunk_row"], sub["chunk_col"], sub["local_id"])
        alive, clipped = greedy_resolve(geoms, local[:, 0], local[:, 1], final_iou, rank,
                                        dedup_iou=dedup_iou, min_area_px=min_area_px,
                                        conflict_min_width_px=conflict_min_width_px, stats=stats)
        for i in np.flatnonzero(~alive):
            key = (int(sub["chunk_row"][i]), int(sub["chunk_col"][i]))
            res.dropped.setdefault(key, []).append(int(sub["local_id"][i]))
        for i in np.flatnonzero(clipped & alive):
            key = (int(sub["chunk_row"][i]), int(sub["chunk_col"][i]))
            res.clipped.setdefault(key, {})[int(sub["local_id"][i])] = geoms[i]

    rows = sorted(scan.rows)
    for r in rows + [None]:  # None: the end, every open component is final
        if r is not None:
            new = _band_rows(scan, r)
            if new is not None:
                n_new = len(new["local_id"])
                res.band += n_new
                new["id"] = np.arange(next_id, next_id + n_new, dtype=np.int64)
                next_id += n_new
                live = _concat(live, new)
                window = np.flatnonzero(live["chunk_row"] > r - k - 1)  # rows r - k .. r
                query = np.flatnonzero(live["chunk_row"][window] == r)
                chunk = live["chunk_row"][window].astype(np.int64) * (1 << 32) + live["chunk_col"][window]
                left, right, iou = overlap_pairs(live["geometry"][window], chunk, query=query)
                ids = live["id"][window]
                open_pairs = np.concatenate([open_pairs, np.stack([ids[left], ids[right]], axis=1)])
                open_iou = np.concatenate([open_iou, iou])
                res.pairs += len(left)
        if live is None:
            continue
        # components that can gain no more pairs: every member in a row <= r - k (all at the end)
        if len(open_pairs):
            from scipy.sparse import coo_matrix
            from scipy.sparse.csgraph import connected_components

            nodes_ids, inv = np.unique(open_pairs, return_inverse=True)
            inv = inv.reshape(-1, 2)
            m = len(nodes_ids)
            graph = coo_matrix((np.ones(len(inv)), (inv[:, 0], inv[:, 1])), shape=(m, m))
            _, comp = connected_components(graph, directed=False)
            node_row = live["chunk_row"][np.searchsorted(live["id"], nodes_ids)]
            if r is None:
                final_comp = np.ones(comp.max() + 1, dtype=bool)
            else:
                newest = np.full(comp.max() + 1, np.iinfo(np.int64).min)
                np.maximum.at(newest, comp, node_row.astype(np.int64))
                final_comp = newest <= r - k
            final = final_comp[comp[inv[:, 0]]]
            if final.any():
                resolve(open_pairs[final], open_iou[final])
                open_pairs, open_iou = open_pairs[~final], open_iou[~final]
        # forget rows that can neither pair again nor belong to an open component
        if r is not None:
            keep = (live["chunk_row"] > r - k) | np.isin(live["id"], open_pairs)
            live = _take(live, np.flatnonzero(keep))
    res.dropped = {key: np.sort(np.asarray(v, dtype=np.int32)) for key, v in res.dropped.items()}
    res.conflicts = int(stats["conflicts"])
    log.info("dedup: %d band instances, %d overlapping pairs, %d dropped, %d clipped, %d conflicts", res.band,
             res.pairs, sum(len(v) for v in res.dropped.values()), sum(len(v) for v in res.clipped.values()),
             res.conflicts)
    return res


def _load_row(scan, dedup, r, mpp):
    """Chunk row ``r`` after dedup: surviving rows, clipped ones fixed (:data:`CHUNK_SCHEMA`)."""
    parts = []
    for rc, path in scan.rows.get(r, []):
        _, t = _read(path)
        t = t.replace_schema_metadata(None)
        if not t.num_rows:
            continue
        lid = t["local_id"].to_numpy()
        keep = ~np.isin(lid, dedup.dropped.get(rc, np.zeros(0, np.int32)))
        fix = dedup.clipped.get(rc, {})
        pos = np.flatnonzero(np.isin(lid, np.fromiter(fix, dtype=np.int64)) & keep)
        geoms = np.array([fix[int(v)] for v in lid[pos]], dtype=object)
        parts.append(apply_dedup(t, keep, pos, geoms, mpp).cast(chunk_schema(table_class_names(t.schema),
                                                                                  table_rejects(t.schema))))
    return pa.concat_tables(parts) if parts else None


class Stitched:
    """Final nuclei of a set of chunk files, as an iterable of strips (:func:`iter_nuclei`).

    Attributes ``scan`` (:class:`ChunkScan`) and ``dedup`` (:class:`DedupResult`) are filled on
    construction (passes 0 and 1); iterating runs pass 2 and may be repeated, recording in
    ``peak_cached_rows`` the most chunk-table rows it held at once.
    """

    def __init__(self, files, *, mpp, dedup_iou, min_area_um2, chunk_px,
                 conflict_min_width_um=SegmentConfig.conflict_min_width_um):
        self.mpp = float(mpp)
        self.scan = scan_chunks(files, chunk_px)
        self.dedup = resolve_streaming(self.scan, mpp=self.mpp, dedup_iou=dedup_iou,
                                       min_area_px=float(min_area_um2) / (self.mpp * self.mpp),
                                       conflict_min_width_px=float(conflict_min_width_um) / self.mpp)
        self.peak_cached_rows = 0  #: most chunk-table rows held at once while iterating (memory bound)

    @property
    def n_truncated_owned(self):
        return self.scan.n_truncated_owned

    def __iter__(self):
        """Yield one table per non-empty strip: :func:`pipeline.stitch.assign_ids` rows, ids continuing."""
        scan = self.scan
        rows = sorted(scan.rows)
        cache = {}  # chunk_row -> (table, strip of each row)
        next_row = 0
        first_id = 1
        for s in range(scan.strip_lo, scan.strip_hi + 1):
            while next_row < len(rows) and rows[next_row] <= s + scan.rows_ahead:
                r = rows[next_row]
                t = _load_row(scan, self.dedup, r, self.mpp)
                if t is not None and t.num_rows:
                    cache[r] = (t, _strip(t["anchor_y_px"].to_numpy(), scan.chunk_px))
                next_row += 1
            self.peak_cached_rows = max(self.peak_cached_rows, sum(t.num_rows for t, _ in cache.values()))
            parts = []
            for r in sorted(cache):
                t, strip = cache[r]
                here = strip == s
                if here.any():
                    parts.append(t.filter(pa.array(here)))
                later = strip > s
                if not later.any():
                    del cache[r]
                elif later.mean() < 0.5:  # mostly consumed: keep only the (small) rest; else no copy
                    cache[r] = (t.filter(pa.array(later)), strip[later])
            if not parts:
                continue
            out = assign_ids(pa.concat_tables(parts), first_id=first_id)
            del parts  # only the numbered strip stays alive while the writers consume it
            first_id += out.num_rows
            yield out

    def table(self):
        """All final nuclei in one table (small slides and tests; memory grows with the slide)."""
        parts = list(self)
        if not parts:
            return assign_ids(empty_chunk_table(self.scan.class_names, self.scan.reject))
        return pa.concat_tables(parts)


def iter_nuclei(files, *, mpp, dedup_iou, min_area_um2, chunk_px,
                conflict_min_width_um=SegmentConfig.conflict_min_width_um):
    """Final nuclei of chunk files, strip by strip (passes 0-2 of the module doc).

    Parameters
    ----------
    files : dict of (int, int) -> path
        Chunk Parquet files.
    mpp : float
        µm per store px.
    dedup_iou, min_area_um2 : float
        As :func:`pipeline.stitch.resolve_duplicates` (``min_area_px = min_area_um2 / mpp**2``).
    chunk_px : int
        Core edge, store px.

    Returns
    -------
    Stitched
        Iterable of strip tables (``nucleus_id`` first, then :data:`pipeline.stitch.CHUNK_SCHEMA`).
    """
    return Stitched(files, mpp=mpp, dedup_iou=dedup_iou, min_area_um2=min_area_um2, chunk_px=chunk_px,
                    conflict_min_width_um=conflict_min_width_um)


def split_rejected(strips, on_rejected, threshold=None):
    """Kept nuclei of each strip, the rejected ones handed aside.

    For chunk files of a model that rejects (:func:`pipeline.stitch.chunk_schema` ``reject``), the
    instances it would remove as "not a nucleus" go through dedup with the others (so a nucleus
    seen by two windows is one object, whichever window rejected it) and are split off here.

    Parameters
    ----------
    strips : iterable of pyarrow.Table
        Strip tables of :func:`iter_nuclei` with the ``rejected`` column.
    on_rejected : callable
        Called with each strip's rejected rows (``rejected`` dropped; ``nucleus_id`` renumbered
        1..M over the slide in the same order); strips without any are not passed.
    threshold : float, optional
        Reject where ``not_nucleus_prob > threshold`` instead of the ``rejected`` column (the
        checkpoint's rule at inference): any threshold is applied from the same chunk files,
        without a second inference (``--reject-threshold`` of ``segment`` / ``export``).

    Yields
    ------
    pyarrow.Table
        The strip's kept rows (strips left empty are skipped), ``rejected`` dropped and ``nucleus_id``
        renumbered 1..N over the slide in order: exactly the nuclei of a run that removed the
        rejected instances after dedup. Both sets get ``instance_id`` (the id before the split,
        :data:`pipeline.stitch.INSTANCE_ID_COLUMN`): the exported UUIDs derive from it, so a nucleus
        has the same UUID in ``rejected/`` as among the nuclei, whatever the threshold.
    """
    from .stitch import INSTANCE_ID_COLUMN, NOT_NUCLEUS_COLUMN, REJECTED_COLUMN

    next_id = {False: 1, True: 1}
    for strip in strips:
        if threshold is None:
            flag = strip[REJECTED_COLUMN].to_numpy(zero_copy_only=False).astype(bool)
        else:
            flag = strip[NOT_NUCLEUS_COLUMN].to_numpy(zero_copy_only=False) > float(threshold)
        parts = {}
        strip = strip.append_column(INSTANCE_ID_COLUMN, strip["nucleus_id"])  # the UUIDs derive from it
        for rejected in (False, True):
            sel = flag if rejected else ~flag
            t = strip.filter(pa.array(sel)).drop_columns([REJECTED_COLUMN])
            ids = np.arange(next_id[rejected], next_id[rejected] + t.num_rows, dtype=np.int64)
            next_id[rejected] += t.num_rows
            parts[rejected] = t.set_column(t.schema.get_field_index("nucleus_id"), "nucleus_id", pa.array(ids))
        if parts[True].num_rows:
            on_rejected(parts[True])
        if parts[False].num_rows:  # like iter_nuclei: no empty strips
            yield parts[False]
