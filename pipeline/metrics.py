"""Instance- and pixel-level segmentation metrics for nucleus label images (pure numpy), and
point-based detection/classification scores of nucleus centres (:func:`match_points`,
:func:`point_counts`, :func:`point_scores`; see the section comment above them).

Every metric is computed from one sparse overlap (contingency) table of ``(gt_label,
pred_label)`` pixel counts, built once per image pair with a single ``np.unique`` over the
pixels where both images are foreground; nothing loops over objects in full-image space.

Label images are ``(H, W)`` non-negative integer arrays, ``0`` = background; label values need
not be consecutive. Each label is one object (connectivity is not checked).

Metrics (``evaluate_pair`` keys)
--------------------------------
``aji``
    Aggregated Jaccard Index as in the original MoNuSeg code (Kumar et al., IEEE TMI 2017):
    every GT nucleus is paired with the prediction of highest IoU among those overlapping it
    (ties: lowest prediction label; a prediction may be picked by several GT nuclei); the
    pair's intersection goes to ``C`` and its union to ``U``; a GT nucleus overlapping no
    prediction adds its area to ``U``; every prediction never picked adds its area to ``U``.
    ``aji = C / U``. ``aji_intersection_px`` / ``aji_union_px`` are ``C`` and ``U``.
``pq``, ``dq``, ``sq``, ``tp``, ``fp``, ``fn``
    Panoptic quality (Kirillov et al. 2019): a GT/prediction pair matches when IoU > 0.5
    (strictly), which makes matching unique. ``dq`` = F1 of matches = tp / (tp + fp/2 + fn/2),
    ``sq`` = mean IoU of matched pairs, ``pq = dq * sq``.
``obj_precision``, ``obj_recall``, ``obj_f1``
    Object detection scores at the same IoU > 0.5 matching (``obj_f1 == dq``).
``n_true``, ``n_pred``
    Object counts.
``dice``
    Binary Dice of the foreground masks (``label > 0``).
``pixel_accuracy``, ``pixel_precision``, ``pixel_recall``, ``mean_class_accuracy``
    On the foreground masks; ``mean_class_accuracy`` is the mean of foreground recall and
    background recall (the "mean accuracy" of the seed paper).

Edge cases (no NaN, no exceptions)
----------------------------------
A ratio whose denominator is 0 is 1.0 when ground truth and prediction agree exactly in what
the ratio measures (both have no objects, for the object metrics and AJI; identical foreground
masks, for the pixel metrics) and 0.0 otherwise. So identical label images score 1.0
everywhere (including two empty images), and an empty prediction against a non-empty ground
truth scores 0.0 on every instance metric, on Dice and on pixel precision/recall.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InputError

#: keys of ``evaluate_pair`` that are object/pixel counts (summed, not averaged, by ``aggregate``)
COUNT_KEYS = ("tp", "fp", "fn", "n_true", "n_pred", "aji_intersection_px", "aji_union_px")

#: keys of ``evaluate_pair`` that are scores in [0, 1] (averaged over images by ``aggregate``)
SCORE_KEYS = (
    "aji",
    "pq",
    "dq",
    "sq",
    "obj_precision",
    "obj_recall",
    "obj_f1",
    "dice",
    "pixel_accuracy",
    "pixel_precision",
    "pixel_recall",
    "mean_class_accuracy",
)


@dataclass(frozen=True)
class Overlap:
    """Sparse overlap table of two label images.

    Attributes
    ----------
    gt_area_px : ndarray of shape (n_true,), int64
        Pixel area of each GT object (objects in increasing label order).
    pred_area_px : ndarray of shape (n_pred,), int64
        Pixel area of each predicted object (increasing label order).
    gt_idx, pred_idx : ndarray of shape (n_pairs,), int64
        0-based object indices of each overlapping (GT, prediction) pair.
    inter_px : ndarray of shape (n_pairs,), int64
        Intersection area of each pair, > 0.
    """

    gt_area_px: np.ndarray
    pred_area_px: np.ndarray
    gt_idx: np.ndarray
    pred_idx: np.ndarray
    inter_px: np.ndarray

    @property
    def n_true(self) -> int:
        return int(self.gt_area_px.size)

    @property
    def n_pred(self) -> int:
        return int(self.pred_area_px.size)

    @property
    def union_px(self) -> np.ndarray:
        return self.gt_area_px[self.gt_idx] + self.pred_area_px[self.pred_idx] - self.inter_px

    @property
    def iou(self) -> np.ndarray:
        """IoU of each overlapping pair, float64 of shape (n_pairs,)."""
        return self.inter_px / self.union_px


def _check_pair(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gt = np.asarray(gt)
    pred = np.asarray(pred)
    for name, arr in (("ground truth", gt), ("prediction", pred)):
        if arr.ndim != 2:
            raise InputError(f"{name} label image must be 2-D (H, W), got shape {arr.shape}")
        if arr.dtype.kind not in "uib":
            raise InputError(f"{name} label image must have an integer dtype, got {arr.dtype}")
        if arr.dtype.kind == "i" and arr.size and arr.min() < 0:
            raise InputError(f"{name} label image has negative labels (min {arr.min()})")
    if gt.shape != pred.shape:
        raise InputError(f"label images differ in shape: ground truth {gt.shape} vs prediction {pred.shape}")
    return gt, pred


def _compact(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Map labels to 0..n (0 stays background) preserving order; return (indices int64, n)."""
    flat = labels.ravel()
    if flat.dtype == bool:
        flat = flat.astype(np.uint8)
    top = int(flat.max()) if flat.size else 0
    if top <= 4 * flat.size + 1024:  # lookup table: O(N), no sort
        present = np.zeros(top + 1, dtype=bool)
        present[flat] = True
        present[0] = True
        lut = np.cumsum(present, dtype=np.int64) - 1
        return lut[flat], int(lut[-1])
    ids = np.unique(flat)
    if ids[0] != 0:
        ids = np.concatenate([[0], ids])
    return np.searchsorted(ids, flat).astype(np.int64), int(ids.size - 1)


def overlap_table(gt: np.ndarray, pred: np.ndarray) -> Overlap:
    """Build the sparse (GT object, predicted object) overlap table.

    Parameters
    ----------
    gt, pred : ndarray of shape (H, W), integer
        Instance label images, 0 = background.

    Returns
    -------
    Overlap

    Raises
    ------
    InputError
        For non-2-D, non-integer, negative or differently shaped inputs.
    """
    gt, pred = _check_pair(gt, pred)
    g, n_true = _compact(gt)
    p, n_pred = _compact(pred)
    gt_area = np.bincount(g, minlength=n_true + 1)[1:].astype(np.int64)
    pred_area = np.bincount(p, minlength=n_pred + 1)[1:].astype(np.int64)
    both = (g > 0) & (p > 0)
    codes = (g[both] - 1) * np.int64(n_pred) + (p[both] - 1)
    codes, inter = np.unique(codes, return_counts=True)
    if n_pred:
        gi, pi = np.divmod(codes, np.int64(n_pred))
    else:
        gi = pi = np.zeros(0, dtype=np.int64)
    return Overlap(gt_area, pred_area, gi.astype(np.int64), pi.astype(np.int64), inter.astype(np.int64))


def _ratio(num: float, den: float, agree: bool) -> float:
    if den == 0:
        return 1.0 if agree else 0.0
    return float(num) / float(den)


def aji_parts(ov: Overlap) -> tuple[int, int]:
    """Intersection ``C`` and union ``U`` of the original (Kumar 2017) AJI, in pixels.

    Parameters
    ----------
    ov : Overlap
        From :func:`overlap_table`.

    Returns
    -------
    (int, int)
        ``C``, ``U``; ``aji = C / U``.
    """
    if ov.inter_px.size == 0:
        return 0, int(ov.gt_area_px.sum() + ov.pred_area_px.sum())
    iou = ov.iou
    # best prediction per GT object: sort by gt, then IoU descending, then pred label ascending
    order = np.lexsort((ov.pred_idx, -iou, ov.gt_idx))
    first = np.ones(order.size, dtype=bool)
    first[1:] = ov.gt_idx[order][1:] != ov.gt_idx[order][:-1]
    best = order[first]
    inter = int(ov.inter_px[best].sum())
    union = int(ov.union_px[best].sum())
    matched_gt = np.zeros(ov.n_true, dtype=bool)
    matched_gt[ov.gt_idx[best]] = True
    used_pred = np.zeros(ov.n_pred, dtype=bool)
    used_pred[ov.pred_idx[best]] = True
    union += int(ov.gt_area_px[~matched_gt].sum()) + int(ov.pred_area_px[~used_pred].sum())
    return inter, union


def aji(gt: np.ndarray, pred: np.ndarray) -> float:
    """Aggregated Jaccard Index (original MoNuSeg definition, Kumar et al. 2017).

    Parameters
    ----------
    gt, pred : ndarray of shape (H, W), integer
        Instance label images, 0 = background.

    Returns
    -------
    float
        In [0, 1]; 1.0 when both images have no objects.

    Raises
    ------
    InputError
        For invalid or differently shaped label images.
    """
    ov = overlap_table(gt, pred)
    c, u = aji_parts(ov)
    return _ratio(c, u, ov.n_true == 0 and ov.n_pred == 0)


def _matches(ov: Overlap, iou_threshold: float) -> np.ndarray:
    if not 0.5 <= iou_threshold < 1.0:
        raise InputError(f"iou_threshold must be in [0.5, 1) for unique matching, got {iou_threshold}")
    return ov.iou > iou_threshold


def _pq_from(ov: Overlap, iou_threshold: float) -> dict:
    hit = _matches(ov, iou_threshold)
    tp = int(hit.sum())
    fp = ov.n_pred - tp
    fn = ov.n_true - tp
    agree = ov.n_true == 0 and ov.n_pred == 0
    dq = _ratio(tp, tp + 0.5 * fp + 0.5 * fn, agree)
    sq = _ratio(float(ov.iou[hit].sum()), tp, agree)
    return {
        "pq": dq * sq,
        "dq": dq,
        "sq": sq,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "n_true": ov.n_true,
        "n_pred": ov.n_pred,
        "obj_precision": _ratio(tp, ov.n_pred, agree),
        "obj_recall": _ratio(tp, ov.n_true, agree),
        "obj_f1": dq,
    }


def panoptic_quality(gt: np.ndarray, pred: np.ndarray, iou_threshold: float = 0.5) -> dict:
    """Panoptic quality with unique matching at IoU > ``iou_threshold``.

    Parameters
    ----------
    gt, pred : ndarray of shape (H, W), integer
        Instance label images, 0 = background.
    iou_threshold : float
        Strict IoU threshold, in [0.5, 1) (>= 0.5 keeps the matching unique).

    Returns
    -------
    dict
        ``pq``, ``dq`` (F1 of matches), ``sq`` (mean IoU of matches), ``tp``, ``fp``, ``fn``,
        ``n_true``, ``n_pred``, ``obj_precision``, ``obj_recall``, ``obj_f1``.

    Raises
    ------
    InputError
        For invalid label images or a threshold below 0.5.
    """
    return _pq_from(overlap_table(gt, pred), iou_threshold)


def object_scores(gt: np.ndarray, pred: np.ndarray, iou_threshold: float = 0.5) -> dict:
    """Object precision, recall and F1 at IoU > ``iou_threshold`` (see :func:`panoptic_quality`)."""
    pq = panoptic_quality(gt, pred, iou_threshold)
    return {k: pq[k] for k in ("obj_precision", "obj_recall", "obj_f1")}


def pixel_scores(gt: np.ndarray, pred: np.ndarray) -> dict:
    """Foreground-mask scores.

    Parameters
    ----------
    gt, pred : ndarray of shape (H, W), integer or bool
        Label images or masks; foreground is ``> 0``.

    Returns
    -------
    dict
        ``dice``, ``pixel_accuracy``, ``pixel_precision``, ``pixel_recall`` (foreground recall)
        and ``mean_class_accuracy`` (mean of foreground and background recall), floats in [0, 1].

    Raises
    ------
    InputError
        For invalid or differently shaped inputs.
    """
    gt, pred = _check_pair(gt, pred)
    g = gt > 0
    p = pred > 0
    n = g.size
    tp = int(np.count_nonzero(g & p))
    n_g = int(np.count_nonzero(g))
    n_p = int(np.count_nonzero(p))
    fp = n_p - tp
    fn = n_g - tp
    tn = n - tp - fp - fn
    agree = fp == 0 and fn == 0
    fg_recall = _ratio(tp, n_g, agree)
    bg_recall = _ratio(tn, n - n_g, agree)
    return {
        "dice": _ratio(2 * tp, n_g + n_p, agree),
        "pixel_accuracy": _ratio(tp + tn, n, agree),
        "pixel_precision": _ratio(tp, n_p, agree),
        "pixel_recall": fg_recall,
        "mean_class_accuracy": 0.5 * (fg_recall + bg_recall),
    }


def dice(gt: np.ndarray, pred: np.ndarray) -> float:
    """Binary foreground Dice, ``2 |G & P| / (|G| + |P|)``; 1.0 for two empty masks."""
    return pixel_scores(gt, pred)["dice"]


def evaluate_pair(gt: np.ndarray, pred: np.ndarray) -> dict:
    """All metrics of one image pair (see the module docstring for the keys).

    Parameters
    ----------
    gt, pred : ndarray of shape (H, W), integer
        Instance label images, 0 = background.

    Returns
    -------
    dict
        Scores (floats, ``SCORE_KEYS``) and counts (ints, ``COUNT_KEYS``); never NaN.

    Raises
    ------
    InputError
        For invalid or differently shaped label images.
    """
    ov = overlap_table(gt, pred)
    c, u = aji_parts(ov)
    out = {"aji": _ratio(c, u, ov.n_true == 0 and ov.n_pred == 0), "aji_intersection_px": c, "aji_union_px": u}
    out.update(_pq_from(ov, 0.5))
    out.update(pixel_scores(gt, pred))
    return out


def aggregate(per_image: Mapping[str, Mapping] | Sequence[Mapping]) -> dict:
    """Combine per-image results of :func:`evaluate_pair`.

    Scores (``SCORE_KEYS``) are the unweighted mean over images; counts (``COUNT_KEYS``) are
    summed. ``aji_pooled`` is the AJI over all images pooled as one (sum of ``C`` over sum of
    ``U``), which weights images by their nucleus area, unlike the mean ``aji``. ``pq_pooled``
    and ``dq_pooled``/``sq_pooled`` are the same pooling for PQ (summed tp/fp/fn; SQ weighted by
    matches). ``n_images`` is the number of images.

    Parameters
    ----------
    per_image : mapping of name -> dict, or sequence of dict
        Results of :func:`evaluate_pair`.

    Returns
    -------
    dict
        Means, sums, pooled values and ``n_images``; scores are 0.0 for no images.
    """
    rows = list(per_image.values()) if isinstance(per_image, Mapping) else list(per_image)
    out: dict = {"n_images": len(rows)}
    for key in SCORE_KEYS:
        out[key] = float(np.mean([r[key] for r in rows])) if rows else 0.0
    for key in COUNT_KEYS:
        out[key] = int(sum(int(r[key]) for r in rows))
    agree = bool(rows) and out["n_true"] == 0 and out["n_pred"] == 0
    out["aji_pooled"] = _ratio(out["aji_intersection_px"], out["aji_union_px"], agree)
    tp, fp, fn = out["tp"], out["fp"], out["fn"]
    iou_sum = float(sum(r["sq"] * r["tp"] for r in rows))
    out["dq_pooled"] = _ratio(tp, tp + 0.5 * fp + 0.5 * fn, agree)
    out["sq_pooled"] = _ratio(iou_sum, tp, agree)
    out["pq_pooled"] = out["dq_pooled"] * out["sq_pooled"]
    return out


# --- point-based detection and classification -------------------------------------------------
#
# Nucleus centres against ground-truth points (CRCHisto protocol, Sirinukunwattana et al., IEEE
# TMI 2016: a detection is correct within a fixed radius of a ground-truth centre, each point
# matched at most once). Matching here is the optimal one-to-one assignment, not the paper's
# greedy nearest-pair pass: among all matchings that use only pairs at distance <= radius, the
# one with the most pairs, and among those the smallest total distance (Hungarian algorithm,
# ``scipy.optimize.linear_sum_assignment``, on each connected component of the radius graph).
# It never finds fewer matches than a greedy pass. Equal-cost alternatives (ties) are resolved by
# the solver deterministically: the same arrays in the same order give the same pairs.
#
# Classes are integer indices ``0..K-1``; ``-1`` marks an unlabelled ground-truth point (it counts
# for detection only) or a prediction without a class. Per class ``c``, a prediction of class
# ``c`` is a true positive only when it is matched to a ground-truth point of class ``c``:
#
# - ``tp_c`` = matched pairs (gt ``c``, pred ``c``);
# - ``fp_c`` = predictions of class ``c`` matched to a labelled point of another class, or
#   unmatched (a prediction matched to an unlabelled point is neither right nor wrong);
# - ``fn_c`` = points of class ``c`` matched to a prediction of another (or no) class, or
#   unmatched;
# - ``f1_c = 2 tp_c / (2 tp_c + fp_c + fn_c)``; ``weighted_f1`` = mean of ``f1_c`` weighted by
#   the support ``tp_c + fn_c`` (the number of ground-truth points of class ``c``).
#
# Ratios with a zero denominator follow the module rule (1.0 when nothing was expected and
# nothing was found, else 0.0).

#: additive keys of :func:`point_counts` (summed by :func:`aggregate_point_counts`)
POINT_COUNT_KEYS = ("tp", "fp", "fn", "n_true", "n_pred", "n_true_unlabelled", "sum_dist_px")


def _check_points(xy, what: str) -> np.ndarray:
    arr = np.asarray(xy, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 2), dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise InputError(f"{what} points must have shape (N, 2) of (x, y), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise InputError(f"{what} points have non-finite coordinates")
    return arr


def _check_classes(cls, n: int, n_classes: int, what: str) -> np.ndarray:
    if cls is None:
        return np.full(n, -1, dtype=np.int64)
    arr = np.asarray(cls)
    if arr.size == 0 and n == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.shape != (n,) or arr.dtype.kind not in "iu":
        raise InputError(f"{what} classes must be an integer array of shape ({n},), got {arr.dtype} {arr.shape}")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < -1 or arr.max() >= n_classes):
        raise InputError(f"{what} classes must be in -1..{n_classes - 1}, got {arr.min()}..{arr.max()}")
    return arr


def match_points(gt_xy, pred_xy, radius_px: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one matching of predicted to ground-truth points within a radius.

    Maximum-cardinality matching over pairs at Euclidean distance ``<= radius_px`` (inclusive),
    minimum total distance among those; see the section comment above for ties.

    Parameters
    ----------
    gt_xy : array_like of shape (N, 2), float
        Ground-truth points (x = column, y = row), pixels.
    pred_xy : array_like of shape (M, 2), float
        Predicted points, same frame and units.
    radius_px : float
        Largest matching distance, pixels, > 0.

    Returns
    -------
    gt_idx, pred_idx : ndarray of shape (P,), int64
        Indices of the matched pairs, sorted by ``gt_idx``; each index occurs at most once.
    dist_px : ndarray of shape (P,), float64
        Distance of each pair, pixels, ``<= radius_px``.

    Raises
    ------
    InputError
        For points not of shape (N, 2), non-finite coordinates or a radius that is not > 0.
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    gt = _check_points(gt_xy, "ground-truth")
    pred = _check_points(pred_xy, "predicted")
    radius = float(radius_px)
    if not (np.isfinite(radius) and radius > 0):
        raise InputError(f"matching radius must be > 0 px, got {radius_px}")
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64))
    n, m = len(gt), len(pred)
    if n == 0 or m == 0:
        return empty
    pairs = cKDTree(gt).sparse_distance_matrix(cKDTree(pred), radius, output_type="ndarray")
    if pairs.size == 0:
        return empty
    pi = pairs["i"].astype(np.int64)
    pj = pairs["j"].astype(np.int64)
    pd = pairs["v"].astype(np.float64)
    # bipartite graph: nodes 0..n-1 are ground truth, n..n+m-1 predictions
    graph = coo_matrix((np.ones(pi.size), (pi, pj + n)), shape=(n + m, n + m))
    _, comp = connected_components(graph, directed=False)
    edge_comp = comp[pi]
    order = np.lexsort((pj, pi, edge_comp))
    pi, pj, pd, edge_comp = pi[order], pj[order], pd[order], edge_comp[order]
    starts = np.flatnonzero(np.r_[True, edge_comp[1:] != edge_comp[:-1]])
    ends = np.r_[starts[1:], pi.size]
    out_g, out_p, out_d = [], [], []
    for s, e in zip(starts, ends):
        ci, cj, cd = pi[s:e], pj[s:e], pd[s:e]
        if e - s == 1:
            out_g.append(ci)
            out_p.append(cj)
            out_d.append(cd)
            continue
        rows, ri = np.unique(ci, return_inverse=True)
        cols, cj_i = np.unique(cj, return_inverse=True)
        # a forbidden pair costs more than any matching's total distance, so the solver first
        # maximises the number of allowed pairs, then minimises their total distance
        forbid = (min(rows.size, cols.size) + 1) * radius + 1.0
        cost = np.full((rows.size, cols.size), forbid)
        cost[ri, cj_i] = cd
        r, c = linear_sum_assignment(cost)
        ok = cost[r, c] < forbid
        out_g.append(rows[r[ok]])
        out_p.append(cols[c[ok]])
        out_d.append(cost[r[ok], c[ok]])
    g = np.concatenate(out_g)
    p = np.concatenate(out_p)
    d = np.concatenate(out_d)
    order = np.argsort(g, kind="stable")
    return g[order], p[order], d[order]


def point_counts(gt_xy, pred_xy, radius_px: float, gt_class=None, pred_class=None, n_classes: int = 0) -> dict:
    """Additive detection (and classification) counts of one image's points.

    Parameters
    ----------
    gt_xy : array_like of shape (N, 2), float
        Ground-truth points (x = column, y = row), pixels.
    pred_xy : array_like of shape (M, 2), float
        Predicted nucleus centres, pixels.
    radius_px : float
        Matching radius, pixels (``radius_um / mpp``).
    gt_class : array_like of shape (N,), int, optional
        Class index of each ground-truth point, ``-1`` = unlabelled (detection only).
    pred_class : array_like of shape (M,), int, optional
        Class index of each prediction, ``-1`` = no class.
    n_classes : int
        Number of classes ``K``; 0 = detection only (the class arrays are then ignored).

    Returns
    -------
    dict
        ``tp``, ``fp``, ``fn``, ``n_true``, ``n_pred``, ``n_true_unlabelled`` (ints) and
        ``sum_dist_px`` (float, over matched pairs). With ``n_classes > 0`` also
        ``confusion``: int64 ``(K+1, K+1)``, matched pairs by (ground-truth class, predicted
        class), index ``K`` = unlabelled point / unclassified prediction; ``unmatched_true`` and
        ``unmatched_pred``: int64 ``(K+1,)``, unmatched points / predictions by class (same
        indexing).

    Raises
    ------
    InputError
        For malformed points or classes outside ``-1..K-1``.
    """
    gt = _check_points(gt_xy, "ground-truth")
    pred = _check_points(pred_xy, "predicted")
    k = int(n_classes)
    if k < 0:
        raise InputError(f"n_classes must be >= 0, got {n_classes}")
    gi, pi, dist = match_points(gt, pred, radius_px)
    tp = int(gi.size)
    # without classes (k = 0) the ground-truth classes only count the unlabelled points
    gcls = _check_classes(gt_class, len(gt), k if k else np.iinfo(np.int64).max, "ground-truth")
    out = {
        "tp": tp,
        "fp": len(pred) - tp,
        "fn": len(gt) - tp,
        "n_true": len(gt),
        "n_pred": len(pred),
        "n_true_unlabelled": int(np.count_nonzero(gcls < 0)) if gt_class is not None else 0,
        "sum_dist_px": float(dist.sum()),
    }
    if k == 0:
        return out
    pcls = _check_classes(pred_class, len(pred), k, "predicted")
    g_all = np.where(gcls < 0, k, gcls)
    p_all = np.where(pcls < 0, k, pcls)
    conf = np.zeros((k + 1, k + 1), dtype=np.int64)
    np.add.at(conf, (g_all[gi], p_all[pi]), 1)
    g_left = np.ones(len(gt), dtype=bool)
    g_left[gi] = False
    p_left = np.ones(len(pred), dtype=bool)
    p_left[pi] = False
    out["confusion"] = conf
    out["unmatched_true"] = np.bincount(g_all[g_left], minlength=k + 1).astype(np.int64)
    out["unmatched_pred"] = np.bincount(p_all[p_left], minlength=k + 1).astype(np.int64)
    return out


def point_scores(counts: Mapping) -> dict:
    """Precision, recall and F1 (detection; per class and support-weighted) from point counts.

    Parameters
    ----------
    counts : mapping
        From :func:`point_counts` or :func:`aggregate_point_counts`.

    Returns
    -------
    dict
        ``precision``, ``recall``, ``f1``, ``mean_dist_px`` (floats). With classes also
        ``class_tp``, ``class_fp``, ``class_fn``, ``class_support`` (int64 ``(K,)``),
        ``class_precision``, ``class_recall``, ``class_f1`` (float64 ``(K,)``), ``weighted_f1``
        (support-weighted mean of ``class_f1``), ``macro_f1`` (unweighted mean over classes with
        support or predictions; 0.0 if none) and ``type_accuracy`` (fraction of matched pairs
        with a labelled point whose predicted class is right).
    """
    tp, fp, fn = int(counts["tp"]), int(counts["fp"]), int(counts["fn"])
    agree = fp == 0 and fn == 0
    out = {
        "precision": _ratio(tp, tp + fp, agree),
        "recall": _ratio(tp, tp + fn, agree),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn, agree),
        "mean_dist_px": float(counts["sum_dist_px"]) / tp if tp else 0.0,
    }
    if "confusion" not in counts:
        return out
    conf = np.asarray(counts["confusion"], dtype=np.int64)
    k = conf.shape[0] - 1
    um_t = np.asarray(counts["unmatched_true"], dtype=np.int64)[:k]
    um_p = np.asarray(counts["unmatched_pred"], dtype=np.int64)[:k]
    ctp = np.diag(conf)[:k].copy()
    cfp = conf[:k, :k].sum(axis=0) - ctp + um_p  # row k (unlabelled points) is excluded
    cfn = conf[:k, :].sum(axis=1) - ctp + um_t  # column k (unclassified predictions) counts
    support = ctp + cfn
    prec = np.array([_ratio(a, a + b, a + b + c == 0) for a, b, c in zip(ctp, cfp, cfn)], dtype=np.float64)
    rec = np.array([_ratio(a, a + c, a + b + c == 0) for a, b, c in zip(ctp, cfp, cfn)], dtype=np.float64)
    f1 = np.array([_ratio(2 * a, 2 * a + b + c, a + b + c == 0) for a, b, c in zip(ctp, cfp, cfn)], dtype=np.float64)
    present = (support + cfp) > 0
    n_support = int(support.sum())
    labelled_pairs = int(conf[:k, :].sum())
    out.update(
        class_tp=ctp,
        class_fp=cfp,
        class_fn=cfn,
        class_support=support,
        class_precision=prec,
        class_recall=rec,
        class_f1=f1,
        weighted_f1=float((f1 * support).sum() / n_support) if n_support else (1.0 if not cfp.any() else 0.0),
        macro_f1=float(f1[present].mean()) if present.any() else 0.0,
        type_accuracy=_ratio(int(ctp.sum()), labelled_pairs, labelled_pairs == 0),
    )
    return out


def aggregate_point_counts(rows: Sequence[Mapping]) -> dict:
    """Sum per-image :func:`point_counts` (pooled over images, as the CRCHisto protocol reports).

    Parameters
    ----------
    rows : sequence of mapping
        Results of :func:`point_counts`, all with or all without classes (same ``K``).

    Returns
    -------
    dict
        The same keys, summed; ``n_images`` added.

    Raises
    ------
    InputError
        If the rows mix class counts of different ``K`` (or with and without classes).
    """
    rows = list(rows)
    out: dict = {"n_images": len(rows)}
    for key in POINT_COUNT_KEYS:
        out[key] = sum(r[key] for r in rows) if rows else 0
    out["sum_dist_px"] = float(out["sum_dist_px"])
    shapes = {np.shape(r["confusion"]) if "confusion" in r else None for r in rows}
    if len(shapes) > 1:
        raise InputError(f"cannot pool point counts with different class sets ({sorted(map(str, shapes))})")
    if rows and shapes != {None}:
        for key in ("confusion", "unmatched_true", "unmatched_pred"):
            out[key] = np.sum([np.asarray(r[key], dtype=np.int64) for r in rows], axis=0)
    return out


def matched_classification(confusion) -> dict:
    """Classification alone, on the detected nuclei, from a point confusion matrix.

    Per-class and support-weighted F1 over the matched pairs whose point is typed: rows/columns
    ``0..C-1`` of the ``(C + 1, C + 1)`` matrix of :func:`point_counts` (the last row/column,
    unlabelled point / unclassified prediction, is left out). This is the setting of Sirinukunwattana
    et al. 2016's classification F1 (patches classified at the true nuclei), unlike
    :func:`point_scores`' end-to-end weighted F1, where a prediction counts only when it is matched
    to a point of its class.

    Returns
    -------
    dict with ``weighted_f1`` (float), ``class_f1`` (list of C floats), ``pairs`` (int)
    """
    m = np.asarray(confusion, np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] < 2:
        raise ValueError(f"confusion must be a square (C + 1, C + 1) matrix, got shape {m.shape}")
    c = m.shape[0] - 1
    m = m[:c, :c]
    tp = np.diag(m)
    prec = tp / np.maximum(m.sum(0), 1)
    rec = tp / np.maximum(m.sum(1), 1)
    f1 = 2 * prec * rec / np.maximum(prec + rec, 1e-12)
    support = m.sum(1)
    return {"weighted_f1": round(float((f1 * support).sum() / max(support.sum(), 1)), 4),
            "class_f1": [round(float(v), 4) for v in f1], "pairs": int(support.sum())}
