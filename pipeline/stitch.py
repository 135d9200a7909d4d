"""Seam-free stitching: "halo + unique ownership + boundary-band dedup" (pure, no torch, no I/O).

The slide (store level 0, ``mpp`` µm/px) is cut into *cores*: a gap-free grid of half-open boxes
``[r0, r1) x [c0, c1)`` (the store's chunks). Each core is segmented inside a *window* = core
expanded by the halo on every side, clipped to the slide. Per window
(:func:`extract_chunk_instances`):

1. masks touching a window edge that is not a slide edge are dropped (they are truncated);
2. anchor = mask centroid (store px, continuous coordinates: pixel (r, c) covers [r, r+1));
3. an instance is kept iff its anchor lies in the core expanded by ``eps_px``; it is *owned* iff
   the anchor lies in the core itself (half-open), so every nucleus has exactly one owner;
4. kept instances are polygonised (:mod:`pipeline.geometry`) and measured (:mod:`pipeline.measure`).

Precondition: ``halo_px >= largest nucleus diameter + eps_px`` (:func:`check_halo`), so every owned
nucleus is seen whole by its owner; nothing is ever cut or glued across a seam.

Across windows (:func:`resolve_duplicates`), only instances near a core boundary can overlap an
instance of another chunk; those go through an STRtree. Overlapping pairs from different chunks
are resolved greedily under a total order; finally :func:`assign_ids` numbers nuclei 1..N in a
position order. When two windows disagree on the partition (one merges two touching nuclei that
the other splits) the rule keeps the part of the loser the winner does not cover as its own
nucleus, so nothing is lost; such *conflicts* are counted (:func:`resolve_duplicates`). Same inputs -> same table, whatever the order chunks were processed in.

Chunk table schema (:data:`CHUNK_SCHEMA`, one row per kept instance, sorted by ``local_id``):

=================  =========  =====================================================================
column             dtype      meaning
=================  =========  =====================================================================
chunk_row          int32      core grid row of the window that produced the instance
chunk_col          int32      core grid column
local_id           int32      label value in that window's label image
score              float32    model score of the label (``scores[local_id - 1]``)
anchor_y_px        float64    mask centroid, store px, continuous (row + 0.5 = pixel centre)
anchor_x_px        float64    mask centroid, store px, continuous (col + 0.5)
owned              bool       anchor inside the core (half-open)
core_margin_px     float32    L-inf distance of the polygon's bbox to the core boundary (sides on
                              the slide edge ignored): > 0 inside by that much, <= 0 touching or
                              sticking out by ``-value``; selects the dedup band
geometry           binary     WKB Polygon, store px (x = col, y = row, continuous coordinates)
<measurements>     float64    :data:`pipeline.measure.MEASUREMENT_COLUMNS` (µm, OD)
not_nucleus_prob   float32    model that rejects (patch typer / type head reject output) only: its
                              "not a nucleus" probability of the instance
rejected           bool       model that rejects only: ``not_nucleus_prob`` above the model's reject
                              threshold; such rows go through dedup like the others and are then
                              exported apart (``rejected/<id>.*``), never as nuclei
class              string     model with a type head only: argmax class name (display name)
p_<class>          float32    model with a type head only: class probability, one column per class
                              in the model's ``class_names`` order (rows sum to 1)
=================  =========  =====================================================================

A typed table's schema is :func:`chunk_schema` ``(class_names, reject)``; :func:`table_class_names`
reads the class names back from a schema, :func:`table_rejects` whether it has the reject columns. The class columns travel through dedup and id
assignment unchanged (a clipped nucleus keeps the class of its model mask).

:func:`assign_ids` prepends ``nucleus_id`` (int64, 1..N).
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import shapely

from . import geometry, measure
from .config import SegmentConfig
from .errors import InputError, ModelError, StitchError

log = logging.getLogger(__name__)

CHUNK_SCHEMA = pa.schema(
    [
        ("chunk_row", pa.int32()),
        ("chunk_col", pa.int32()),
        ("local_id", pa.int32()),
        ("score", pa.float32()),
        ("anchor_y_px", pa.float64()),
        ("anchor_x_px", pa.float64()),
        ("owned", pa.bool_()),
        ("core_margin_px", pa.float32()),
        ("geometry", pa.binary()),
    ]
    + [(c, pa.float64()) for c in measure.MEASUREMENT_COLUMNS]
)

#: After clipping by a better-ranked overlapping nucleus, a nucleus keeping less than this
#: fraction of its area is dropped (the rule of QuPath's StarDist extension, ``filterNuclei``).
MIN_KEEP_FRACTION = 0.5


#: name of the argmax class column (typed models); probabilities are ``CLASS_PROB_PREFIX + name``
CLASS_COLUMN = "class"
CLASS_PROB_PREFIX = "p_"
#: "not a nucleus" probability and flag of a model that rejects (no ``p_`` prefix: not a class)
NOT_NUCLEUS_COLUMN = "not_nucleus_prob"
REJECTED_COLUMN = "rejected"
REJECT_FIELDS = [(NOT_NUCLEUS_COLUMN, pa.float32()), (REJECTED_COLUMN, pa.bool_())]
#: id of a stitched instance before a model's rejected instances are split off (``nucleus_id`` of
#: :func:`assign_ids` over all of them; :func:`pipeline.assemble.split_rejected`). Where present the
#: exported UUIDs derive from it, so a nucleus keeps its UUID whatever the reject threshold.
INSTANCE_ID_COLUMN = "instance_id"


def chunk_schema(class_names=(), reject=False):
    """:data:`CHUNK_SCHEMA`, plus ``not_nucleus_prob`` (float32) and ``rejected`` (bool) when
    ``reject``, plus ``class`` (string) and ``p_<name>`` (float32) per class when ``class_names``
    is not empty."""
    fields = list(CHUNK_SCHEMA) + (REJECT_FIELDS if reject else [])
    if class_names:
        fields += [(CLASS_COLUMN, pa.string())] + [(CLASS_PROB_PREFIX + str(n), pa.float32()) for n in class_names]
    return pa.schema(fields)


def table_rejects(schema):
    """Whether a chunk/nuclei table schema has the reject columns (a model that rejects)."""
    return REJECTED_COLUMN in schema.names


def table_class_names(schema):
    """Class names of a chunk/nuclei table schema (``p_<name>`` columns after ``class``, in order);
    ``()`` for an untyped table."""
    names = list(schema.names)
    if CLASS_COLUMN not in names:
        return ()
    after = names[names.index(CLASS_COLUMN) + 1:]
    return tuple(c[len(CLASS_PROB_PREFIX):] for c in after if c.startswith(CLASS_PROB_PREFIX))


def empty_chunk_table(class_names=(), reject=False):
    """A zero-row table with :func:`chunk_schema` ``(class_names, reject)``."""
    return chunk_schema(class_names, reject).empty_table()


def check_halo(halo_px, max_diameter_px, eps_px):
    """Check the stitching precondition ``halo_px >= max_diameter_px + eps_px``.

    Parameters
    ----------
    halo_px : int
        Context read on each side of a core, store px.
    max_diameter_px : float
        Largest nucleus extent expected (or observed), store px.
    eps_px : float
        Anchor tolerance, store px.

    Raises
    ------
    StitchError
        Naming ``halo_px`` and the smallest value that satisfies the precondition.
    """
    need = float(max_diameter_px) + float(eps_px)
    if halo_px < need:
        raise StitchError(
            f"halo_px={halo_px} is smaller than the largest nucleus ({max_diameter_px:.1f} px) + "
            f"anchor_eps_px ({eps_px:g}): nuclei at core edges would be cut; "
            f"set halo_px (--halo) to at least {int(np.ceil(need))}"
        )


def _check_window(labels, scores, rgb, window_origin_rc, core_box_rc, store_shape_rc):
    if not isinstance(labels, np.ndarray) or labels.ndim != 2 or labels.dtype != np.uint32:
        raise ModelError(f"model labels must be a uint32 (H, W) array, got {getattr(labels, 'dtype', type(labels))} "
                         f"{getattr(labels, 'shape', '')}")
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.shape != labels.shape + (3,):
        raise InputError(f"window pixels must be uint8 {labels.shape + (3,)}, got "
                         f"{getattr(rgb, 'dtype', type(rgb))} {getattr(rgb, 'shape', '')}")
    scores = np.asarray(scores)
    if scores.ndim != 1:
        raise ModelError(f"model scores must be 1-D, got shape {scores.shape}")
    top = int(labels.max()) if labels.size else 0
    if top > scores.shape[0]:
        raise ModelError(f"model returned {scores.shape[0]} scores but label {top} (scores[i] is for label i+1)")
    if top > np.iinfo(np.int32).max:
        raise ModelError(f"label {top} does not fit int32 local ids")
    r0, c0 = (int(v) for v in window_origin_rc)
    h, w = labels.shape
    H, W = (int(v) for v in store_shape_rc)
    cr0, cc0, cr1, cc1 = (int(v) for v in core_box_rc)
    if r0 < 0 or c0 < 0 or r0 + h > H or c0 + w > W:
        raise StitchError(f"window {r0, c0, r0 + h, c0 + w} (r0, c0, r1, c1) lies outside the slide {H, W}")
    if not (r0 <= cr0 < cr1 <= r0 + h and c0 <= cc0 < cc1 <= c0 + w):
        raise StitchError(f"core {cr0, cc0, cr1, cc1} is not inside its window {r0, c0, r0 + h, c0 + w}")
    return scores.astype(np.float32, copy=False), (r0, c0), (h, w), (H, W), (cr0, cc0, cr1, cc1)


def _check_class_probs(class_probs, class_names, labels):
    """Class probabilities (L, C) float32, rows renormalised to sum to 1; ModelError if malformed."""
    if class_probs is None:
        raise ModelError(f"model with classes {list(class_names)} returned no class probabilities")
    probs = np.asarray(class_probs, dtype=np.float64)
    top = int(labels.max()) if labels.size else 0
    if probs.ndim != 2 or probs.shape[1] != len(class_names) or probs.shape[0] < top:
        raise ModelError(f"model class_probs have shape {probs.shape}; need (>= {top}, {len(class_names)}) for "
                         f"classes {list(class_names)} (row i is for label i+1)")
    if probs.size and (not np.isfinite(probs).all() or probs.min() < 0):
        raise ModelError("model class_probs must be finite and non-negative")
    total = probs.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        probs = np.where(total > 0, probs / total, 1.0 / len(class_names))
    return probs.astype(np.float32)


def _check_reject(not_nucleus, rejected, labels):
    """``not_nucleus`` float32 (L,) in [0, 1] and ``rejected`` bool (L,); ModelError if malformed."""
    top = int(labels.max()) if labels.size else 0
    p = np.asarray(not_nucleus if not_nucleus is not None else [], dtype=np.float32)
    flag = np.asarray(rejected, dtype=bool)
    if p.ndim != 1 or flag.ndim != 1 or p.shape[0] < top or flag.shape[0] < top:
        raise ModelError(f"model reject outputs have shapes {p.shape} and {flag.shape}; need (>= {top},) "
                         "each (element i is for label i+1)")
    if p.size and (not np.isfinite(p).all() or p.min() < 0 or p.max() > 1):
        raise ModelError("model not-a-nucleus probabilities must lie in [0, 1]")
    return p, flag


def extract_chunk_instances(labels, scores, rgb, *, window_origin_rc, core_box_rc, store_shape_rc,
                            mpp, eps_px, min_area_um2, chunk_rc, max_area_um2=SegmentConfig.max_area_um2,
                            min_circularity=SegmentConfig.min_circularity, class_probs=None, class_names=(),
                            not_nucleus=None, rejected=None):
    """Instances one window contributes to the slide (steps 1-4 of the module docstring).

    Parameters
    ----------
    labels : numpy.ndarray, uint32, shape (h, w)
        Model label image of the window (0 = background).
    scores : numpy.ndarray, float32, shape (L,)
        ``scores[i]`` is the score of label ``i + 1``; ``L >= labels.max()``.
    rgb : numpy.ndarray, uint8, shape (h, w, 3)
        The window's pixels (for intensity measurements).
    window_origin_rc : tuple of int
        Store px (row, col) of ``labels[0, 0]``.
    core_box_rc : tuple of int
        Core ``(r0, c0, r1, c1)``, store px, half-open, inside the window.
    store_shape_rc : tuple of int
        Slide size (H, W) at store level 0; window sides on the slide edge keep their masks.
    mpp : float
        µm per store px.
    eps_px : float
        Anchor tolerance: anchors within the core expanded by this many px are kept.
    min_area_um2 : float
        Instances whose polygon area is below this are dropped.
    chunk_rc : tuple of int
        Core grid (row, col) written to ``chunk_row``/``chunk_col``.
    max_area_um2, min_circularity : float
        Plausibility rule: instances larger than ``max_area_um2`` or with a circularity below
        ``min_circularity`` are not nuclei (tissue folds, keratin flakes, merged clumps) and are
        dropped; an undefined circularity (a one-pixel mask) passes.
    class_probs : numpy.ndarray, float32, shape (L, C), optional
        Type head output: row ``i`` = class probabilities of label ``i + 1`` (a model with
        ``class_names``); rows are renormalised to sum to 1.
    class_names : sequence of str
        The ``C`` class names (display names); empty = untyped model, no class columns.
    not_nucleus : numpy.ndarray, float32, shape (L,), optional
        A model that rejects: ``"not a nucleus"`` probability of label ``i + 1``; with ``rejected``
        (bool (L,), that label is rejected) the table gets the reject columns.
    rejected : numpy.ndarray, bool, shape (L,), optional

    Returns
    -------
    pyarrow.Table
        :func:`chunk_schema` ``(class_names)``, sorted by ``local_id``. The schema metadata
        ``{b"n_truncated_owned": ...}`` counts masks dropped for touching an inner window edge
        whose anchor was inside the core (nonzero means the halo is too small, see
        :func:`check_halo`); a warning is logged in that case. ``{b"n_implausible_owned": ...}``
        counts owned instances dropped by the plausibility rule.

    Raises
    ------
    ModelError
        If the labels are not uint32 (h, w) or a label has no score.
    InputError
        If ``rgb`` does not match ``labels``.
    StitchError
        If the window is outside the slide or the core outside the window.
    """
    scores, (r0, c0), (h, w), (H, W), (cr0, cc0, cr1, cc1) = _check_window(
        labels, scores, rgb, window_origin_rc, core_box_rc, store_shape_rc)
    class_names = tuple(str(n) for n in (class_names or ()))
    reject = rejected is not None
    schema = chunk_schema(class_names, reject)
    if class_names:
        class_probs = _check_class_probs(class_probs, class_names, labels)
    if reject:
        not_nucleus, rejected = _check_reject(not_nucleus, rejected, labels)
    flat = labels.ravel()
    fg = np.flatnonzero(flat != 0)  # every per-label statistic below uses the nonzero pixels only
    if not len(fg):
        return schema.empty_table()
    lab = flat[fg].astype(np.intp)
    nbins = int(lab.max()) + 1
    count = np.bincount(lab, minlength=nbins).astype(np.float64)
    rows, cols = np.divmod(fg, w)
    # global integer sums first, so anchors do not depend on the window's origin (exact in float64)
    sum_r = np.bincount(lab, weights=rows, minlength=nbins) + count * r0
    sum_c = np.bincount(lab, weights=cols, minlength=nbins) + count * c0
    ids = np.flatnonzero(count)
    with np.errstate(invalid="ignore"):
        ay = sum_r[ids] / count[ids] + 0.5
        ax = sum_c[ids] / count[ids] + 0.5

    # 1. drop masks touching an inner window edge (not on the slide edge)
    inner_edges = []
    if r0 > 0:
        inner_edges.append(labels[0, :])
    if r0 + h < H:
        inner_edges.append(labels[-1, :])
    if c0 > 0:
        inner_edges.append(labels[:, 0])
    if c0 + w < W:
        inner_edges.append(labels[:, -1])
    truncated = np.zeros(nbins, dtype=bool)
    if inner_edges:
        truncated[np.concatenate(inner_edges)] = True
        truncated[0] = False
    cut = truncated[ids]

    # 3. keep iff anchor in core expanded by eps; owned iff anchor in core (half-open)
    in_core = (ay >= cr0) & (ay < cr1) & (ax >= cc0) & (ax < cc1)
    n_trunc_owned = int((cut & in_core).sum())
    if n_trunc_owned:
        log.warning("chunk %s: %d nuclei anchored in the core touch the window edge and were dropped; "
                    "increase halo_px (--halo)", tuple(chunk_rc), n_trunc_owned)
    near = (ay >= cr0 - eps_px) & (ay < cr1 + eps_px) & (ax >= cc0 - eps_px) & (ax < cc1 + eps_px)
    keep = near & ~cut
    ids, ay, ax, owned = ids[keep], ay[keep], ax[keep], in_core[keep]
    if not len(ids):
        return schema.empty_table().replace_schema_metadata({b"n_truncated_owned": str(n_trunc_owned).encode()})

    # 4. polygonise only the kept labels
    pid, polys = geometry.labels_to_polygons(labels, offset_rc=(r0, c0), ids=ids)
    if not np.array_equal(pid, ids):  # pragma: no cover - every non-empty mask has an outline
        raise StitchError(f"chunk {tuple(chunk_rc)}: {len(ids) - len(pid)} kept masks have no outline")
    shape = measure.shape_measurements(polys, mpp)
    big = (shape["area_um2"] >= min_area_um2) & ~shapely.is_empty(polys)
    implausible = big & ((shape["area_um2"] > max_area_um2) | (shape["circularity"] < min_circularity))
    n_implausible = int((implausible & owned).sum())
    big &= ~implausible
    ids, ay, ax, owned, polys = ids[big], ay[big], ax[big], owned[big], polys[big]
    shape = {k: v[big] for k, v in shape.items()}
    inten = measure.intensity_measurements(labels, rgb, ids, pixels=(fg, lab))

    bounds = shapely.bounds(polys)  # (K, 4): minx, miny, maxx, maxy
    inside = np.stack([
        bounds[:, 1] - cr0 if cr0 > 0 else np.full(len(ids), np.inf),
        bounds[:, 0] - cc0 if cc0 > 0 else np.full(len(ids), np.inf),
        cr1 - bounds[:, 3] if cr1 < H else np.full(len(ids), np.inf),
        cc1 - bounds[:, 2] if cc1 < W else np.full(len(ids), np.inf),
    ])
    margin = inside.min(axis=0)  # negative = sticks out by -margin (largest overshoot)
    margin = np.where(np.isfinite(margin), margin, np.finfo(np.float32).max)

    n = len(ids)
    cols = {
        "chunk_row": np.full(n, chunk_rc[0], np.int32),
        "chunk_col": np.full(n, chunk_rc[1], np.int32),
        "local_id": ids.astype(np.int32),
        "score": scores[ids - 1],
        "anchor_y_px": ay,
        "anchor_x_px": ax,
        "owned": owned,
        "core_margin_px": margin.astype(np.float32),
        "geometry": geometry.to_wkb(polys),
        **shape,
        **inten,
    }
    if reject:
        cols[NOT_NUCLEUS_COLUMN] = not_nucleus[ids - 1]
        cols[REJECTED_COLUMN] = rejected[ids - 1]
    if class_names:
        probs = class_probs[ids - 1]
        cols[CLASS_COLUMN] = np.asarray(class_names, dtype=object)[np.argmax(probs, axis=1)]
        for j, name in enumerate(class_names):
            cols[CLASS_PROB_PREFIX + name] = probs[:, j]
    table = pa.Table.from_pydict({f.name: pa.array(cols[f.name], type=f.type) for f in schema}, schema=schema)
    return table.replace_schema_metadata({b"n_truncated_owned": str(n_trunc_owned).encode(),
                                          b"n_implausible_owned": str(n_implausible).encode()})


def _rank(owned, score, chunk_row, chunk_col, local_id):
    """Position of each row in the total order (owned desc, score desc, chunk_row, chunk_col, local_id).

    Only the relative order matters: the rank of a subset equals the order of those rows in the
    rank of any superset.
    """
    score = np.asarray(score, dtype=np.float64)
    score = np.where(np.isnan(score), -np.inf, score)
    order = np.lexsort((local_id, chunk_col, chunk_row, -score, ~np.asarray(owned, dtype=bool)))
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return rank


def _table_rank(table):
    return _rank(table["owned"].to_numpy(zero_copy_only=False), table["score"].to_numpy(),
                 table["chunk_row"].to_numpy(), table["chunk_col"].to_numpy(), table["local_id"].to_numpy())


def band_reach(core_margin_px):
    """Largest overshoot ``D`` of instances out of their core (0 if none sticks out).

    Parameters
    ----------
    core_margin_px : numpy.ndarray, float32, shape (N,)
        ``core_margin_px`` column (:data:`CHUNK_SCHEMA`).

    Returns
    -------
    float
        ``D`` >= 0, store px. Rows with ``core_margin_px <= D + 1e-6`` form the dedup band: every
        instance that can overlap an instance of another chunk is in it.
    """
    margin = np.asarray(core_margin_px, dtype=np.float64)
    out = margin[margin <= 0]
    return float(-out.min()) if len(out) else 0.0


def in_band(core_margin_px, reach):
    """Rows of the dedup band (:func:`band_reach`), boolean (N,)."""
    return np.asarray(core_margin_px, dtype=np.float64) <= reach + 1e-6


def overlap_pairs(geoms, chunk_key, query=None):
    """Pairs of instances from different chunks whose intersection has positive area.

    Parameters
    ----------
    geoms : numpy.ndarray of shapely.Polygon, shape (K,)
        Band instances, store px, in table order.
    chunk_key : numpy.ndarray, int64, shape (K,)
        Chunk identity of each (``chunk_row << 32 | chunk_col``).
    query : numpy.ndarray of int, optional
        Only pairs with at least one member in these indices (default: all).

    Returns
    -------
    left, right : numpy.ndarray, int64, shape (P,)
        ``left < right`` (table order), sorted by (left, right).
    iou : numpy.ndarray, float64, shape (P,)
        IoU of ``geoms[left]`` and ``geoms[right]`` (computed in that order).
    """
    tree = shapely.STRtree(geoms)
    q = np.arange(len(geoms)) if query is None else np.asarray(query, dtype=np.int64)
    a, b = tree.query(geoms[q], predicate="intersects")
    a = q[a]
    left, right = np.minimum(a, b), np.maximum(a, b)
    sel = (a != b) & (chunk_key[left] != chunk_key[right])
    pairs = np.unique(np.stack([left[sel], right[sel]], axis=1), axis=0).reshape(-1, 2)
    left, right = pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64)
    iou, inter = geometry.pair_iou(geoms[left], geoms[right])
    pos = inter > 0
    return left[pos], right[pos], iou[pos]


def _holds_disk(geoms, width_px):
    """True where a geometry contains a disk of diameter ``width_px`` (erosion by half of it is not empty)."""
    if width_px <= 0:
        return ~shapely.is_empty(geoms)
    return ~shapely.is_empty(shapely.buffer(geoms, -0.5 * width_px, quad_segs=4))


def greedy_resolve(geoms, left, right, iou, rank, *, dedup_iou, min_area_px, conflict_min_width_px=None,
                   stats=None):
    """Resolve overlapping pairs greedily under a total order (the core of :func:`resolve_duplicates`).

    Pairs are processed in the order (rank of winner, rank of loser), the winner being the row of
    smaller ``rank``. The outcome of a pair depends only on the state of its two members, so
    connected components of the pair graph may be resolved separately (or together) with the same
    result.

    Parameters
    ----------
    geoms : numpy.ndarray of shapely.Polygon, shape (K,)
        Modified in place: clipped instances get their clipped polygon.
    left, right : numpy.ndarray of int, shape (P,)
        Overlapping pairs (indices into ``geoms``).
    iou : numpy.ndarray, float64, shape (P,)
    rank : numpy.ndarray, int64, shape (K,)
        Position of each instance in the total order (:func:`_rank`).
    dedup_iou, min_area_px : float
        See :func:`resolve_duplicates`.
    conflict_min_width_px : float, optional
        See :func:`resolve_duplicates`; ``None`` = ``2 * sqrt(min_area_px / pi)`` (the diameter of
        the smallest nucleus; callers pass ``SegmentConfig.conflict_min_width_um / mpp``).
    stats : dict, optional
        ``stats["conflicts"]`` is incremented by the number of conflict pairs.

    Returns
    -------
    alive, clipped : numpy.ndarray, bool, shape (K,)
    """
    if conflict_min_width_px is None:
        conflict_min_width_px = 2.0 * float(np.sqrt(max(min_area_px, 0.0) / np.pi))
    n_conflicts = 0
    left, right = np.asarray(left, dtype=np.int64), np.asarray(right, dtype=np.int64)
    win = np.where(rank[left] < rank[right], left, right)
    lose = np.where(rank[left] < rank[right], right, left)
    order = np.lexsort((rank[lose], rank[win]))
    alive = np.ones(len(geoms), dtype=bool)
    clipped = np.zeros(len(geoms), dtype=bool)
    for w, l, pair_iou in zip(win[order].tolist(), lose[order].tolist(), np.asarray(iou)[order].tolist()):
        if not (alive[w] and alive[l]):
            continue
        if clipped[w] or clipped[l]:
            pair_iou, inter_area = geometry.pair_iou(geoms[[w]], geoms[[l]])
            if inter_area[0] <= 0:
                continue
            pair_iou = pair_iou[0]
        pair = np.array([geoms[l], geoms[w]], dtype=object)
        # the parts of each instance the other does not cover (largest part, on the 0.01 px grid)
        rest, extra = geometry.clean_polygons(geometry.largest_polygon(shapely.difference(pair, pair[::-1])))
        area = shapely.area(rest)
        big = not shapely.is_empty(rest) and area >= min_area_px
        if big and pair_iou < dedup_iou and area >= MIN_KEEP_FRACTION * shapely.area(geoms[l]):
            geoms[l] = rest  # partial overlap: the loser keeps what the winner leaves
            clipped[l] = True
            continue
        # the loser would be dropped; if either side has a nucleus-sized part the other does not
        # cover, the windows disagree on the partition (one merged what the other split): a conflict
        solid = _holds_disk(np.array([rest, extra], dtype=object), conflict_min_width_px)
        if solid.any():
            n_conflicts += 1
        if big and solid[0]:  # the winner misses a whole nucleus of the loser: keep it
            geoms[l] = rest
            clipped[l] = True
        else:  # the loser is covered by the winner (up to slivers): nothing is lost
            alive[l] = False
    if stats is not None:
        stats["conflicts"] = stats.get("conflicts", 0) + n_conflicts
    return alive, clipped


def apply_clips(table, geoms, mpp):
    """Rows of ``table`` with their geometry replaced by ``geoms`` and shape measurements recomputed.

    Parameters
    ----------
    table : pyarrow.Table
        :data:`CHUNK_SCHEMA` rows (the clipped instances).
    geoms : numpy.ndarray of shapely.Polygon, shape (table.num_rows,)
        Their clipped polygons, store px.
    mpp : float
        µm per store px.

    Returns
    -------
    pyarrow.Table
        Same schema; intensity measurements stay those of the model's mask.
    """
    shape = measure.shape_measurements(geoms, mpp)
    out = table.set_column(table.schema.get_field_index("geometry"), "geometry",
                           pa.array(geometry.to_wkb(geoms), type=pa.binary()))
    for col, values in shape.items():
        out = out.set_column(out.schema.get_field_index(col), col, pa.array(values, type=pa.float64()))
    return out


def resolve_duplicates(table, *, mpp, dedup_iou=SegmentConfig.dedup_iou, min_area_px=None,
                       conflict_min_width_px=None, stats=None):
    """Resolve overlaps between instances of different chunks (boundary band only).

    Candidates: ``S`` = instances whose bbox touches or leaves their core
    (``core_margin_px <= 0``); ``D`` = the largest overshoot in ``S`` (:func:`band_reach`). An
    instance overlapping one of another chunk is always within ``D`` of its own core boundary, so
    only instances with ``core_margin_px <= D`` (a thin band) go into the STRtree. Pairs from
    different chunks whose intersection has positive area are processed in the order (rank of
    winner, rank of loser), where the winner is the better instance under the total order
    (``owned`` desc, ``score`` desc, ``chunk_row``, ``chunk_col``, ``local_id``)
    (:func:`greedy_resolve`):

    - a pair with a dropped member is skipped (suppressed instances suppress nothing);
    - ``rest = loser.difference(winner)`` (largest part, on the 0.01 px grid);
    - IoU < ``dedup_iou`` (recomputed if either polygon was clipped before) and ``rest`` at least
      ``min_area_px`` and :data:`MIN_KEEP_FRACTION` of the loser: the loser becomes ``rest``
      (partial overlap);
    - otherwise the loser is a duplicate and is dropped, **unless the two windows disagree on the
      partition**: if ``rest`` (or ``winner - loser``) still holds a disk of diameter
      ``conflict_min_width_px`` (a nucleus, not a sliver), one window merged what the other split
      (e.g. two touching nuclei across a seam, both anchors moved by more than ``anchor_eps_px``).
      Such a pair is a *conflict* (counted in ``stats["conflicts"]``, the summary's
      ``stitch_conflicts``); the loser becomes ``rest`` when ``rest`` holds the disk and covers
      ``min_area_px``, else it is dropped, being covered by the winner. Either way the union of
      the pair stays covered: no nucleus is lost, at worst two stay merged in the winner.

    Clipped nuclei get their shape measurements recomputed; their intensity measurements and
    anchors stay those of the model's mask.

    This is the in-memory reference; :mod:`pipeline.assemble` computes the same result chunk row
    by chunk row with bounded memory.

    Parameters
    ----------
    table : pyarrow.Table
        Concatenated chunk tables (:data:`CHUNK_SCHEMA`).
    mpp : float
        µm per store px (to recompute shape measurements of clipped nuclei).
    dedup_iou : float
        IoU at or above which the lower-ranked instance is dropped.
    min_area_px : float, optional
        Minimum area of a clipped nucleus, store px^2; default
        ``SegmentConfig.min_area_um2 / mpp**2``.
    conflict_min_width_px : float, optional
        Default ``SegmentConfig.conflict_min_width_um / mpp``.
    stats : dict, optional
        Receives ``"conflicts"`` (number of conflict pairs).

    Returns
    -------
    pyarrow.Table
        Same schema, surviving rows in their input order.
    """
    if min_area_px is None:
        min_area_px = SegmentConfig.min_area_um2 / (mpp * mpp)
    if conflict_min_width_px is None:
        conflict_min_width_px = SegmentConfig.conflict_min_width_um / mpp
    n = table.num_rows
    if n == 0:
        return table
    margin = table["core_margin_px"].to_numpy()
    if not (margin <= 0).any():
        return table
    band = np.flatnonzero(in_band(margin, band_reach(margin)))
    sub = table.take(band)
    geoms = geometry.from_wkb(sub["geometry"])
    chunk = sub["chunk_row"].to_numpy().astype(np.int64) * (1 << 32) + sub["chunk_col"].to_numpy()
    left, right, iou = overlap_pairs(geoms, chunk)
    alive, clipped = greedy_resolve(geoms, left, right, iou, _table_rank(sub), dedup_iou=dedup_iou,
                                    min_area_px=min_area_px, conflict_min_width_px=conflict_min_width_px,
                                    stats=stats)
    log.info("dedup: %d band instances, %d overlapping pairs, %d dropped, %d clipped",
             len(sub), len(left), int((~alive).sum()), int((clipped & alive).sum()))

    keep = np.ones(n, dtype=bool)
    keep[band[~alive]] = False
    fix = np.flatnonzero(clipped & alive)
    return apply_dedup(table, keep, band[fix], geoms[fix], mpp)


def apply_dedup(table, keep, clip_rows, clip_geoms, mpp):
    """``table`` with the dedup decisions applied: rows ``keep`` only, rows ``clip_rows`` clipped.

    Parameters
    ----------
    table : pyarrow.Table
        :data:`CHUNK_SCHEMA` rows.
    keep : numpy.ndarray, bool, shape (table.num_rows,)
        Surviving rows.
    clip_rows : numpy.ndarray of int, shape (K,)
        Surviving rows whose polygon was clipped.
    clip_geoms : numpy.ndarray of shapely.Polygon, shape (K,)
        Their clipped polygons (:func:`apply_clips`), store px.
    mpp : float
        µm per store px.

    Returns
    -------
    pyarrow.Table
        Surviving rows in input order.
    """
    if not len(clip_rows):
        return table if keep.all() else table.filter(pa.array(keep))
    n = table.num_rows
    fixed = apply_clips(table.take(clip_rows), clip_geoms, mpp)
    # one copy: rows of [table, fixed] (zero-copy concatenation) in input order, clipped rows from fixed
    source = np.arange(n, dtype=np.int64)
    source[clip_rows] = n + np.arange(len(clip_rows))
    both = pa.concat_tables([table, fixed.cast(table.schema)])
    return both.take(pa.array(source[keep]))


def id_order_keys(anchor_y_px, anchor_x_px):
    """Rounded anchors ``(y, x)`` of the id order (round half up: ``floor(v + 0.5)``), int64 (N,) each."""
    y = np.floor(np.asarray(anchor_y_px, dtype=np.float64) + 0.5).astype(np.int64)
    x = np.floor(np.asarray(anchor_x_px, dtype=np.float64) + 0.5).astype(np.int64)
    return y, x


def assign_ids(table, first_id=1):
    """Sort nuclei by position and number them.

    Order: ``(round(anchor_y_px), round(anchor_x_px), chunk_row, chunk_col, local_id)`` with
    round-half-up (``floor(v + 0.5)``).

    Parameters
    ----------
    table : pyarrow.Table
        Resolved nuclei (:data:`CHUNK_SCHEMA`).
    first_id : int
        Id of the first nucleus (a strip of a slide numbered after the strips above it).

    Returns
    -------
    pyarrow.Table
        Sorted, with ``nucleus_id`` (int64, ``first_id`` .. ``first_id + N - 1``) as the first column.
    """
    y, x = id_order_keys(table["anchor_y_px"].to_numpy(), table["anchor_x_px"].to_numpy())
    order = np.lexsort((
        table["local_id"].to_numpy(),
        table["chunk_col"].to_numpy(),
        table["chunk_row"].to_numpy(),
        x,
        y,
    ))
    out = table.take(pa.array(order, type=pa.int64()))
    return out.add_column(0, "nucleus_id", pa.array(np.arange(first_id, first_id + len(order), dtype=np.int64)))
