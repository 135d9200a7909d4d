"""Training of the nucleus type head (:mod:`pipeline.model.typehead`) from typed points.

The segmentation network stays frozen: it segments each training tile once, every typed point is
matched to the predicted instance that contains it (or, failing that, whose centroid lies within
``radius_px``), and the head learns the matched instance's class from its pooled features.
Unlabelled points only mark their instance as a nucleus (ignored by the loss). With
``reject=True`` the predicted instances no point touches become a last "not a nucleus" class:
on point sets that mark every nucleus (CRCHisto) they are mostly false positives.

Features are extracted once per tile (:func:`tile_examples`) and the MLP is fitted full-batch on
the CPU in seconds (:func:`fit_head`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..model.postprocess import instances_from_maps
from ..model.typehead import TypeHead, centroids_xy, drop_instances, instance_features, n_features

CRCHISTO_MPP = 0.55
POINT_RADIUS_UM = 3.3
#: held-out validation tiles of crchisto (by tile: every 5th of the 80 shared tiles in numeric order)
CRCHISTO_VAL_TILES = tuple(f"img{i}" for i in (1, 7, 13, 19, 25, 31, 39, 46, 52, 57, 64, 70, 75, 82, 87, 94))
IGNORE, REJECT, NUCLEUS = -1, -2, -3  # NUCLEUS: a nucleus of unknown class (trains "not rejected" only)
#: feature groups of newly fitted heads (measured on held-out CRCHisto: docs/model_card.md, "Nucleus
#: types"): the pooled embedding overfits on 64 tiles; its 3x3 context adds nothing measurable (0.502
#: with it, 0.502 without) and costs an embedding output of the engine, the neighbourhood helps
DEFAULT_GROUPS = ("morph", "colour", "neighbours", "surround")
#: second stage of newly fitted heads: the neighbours' first-stage outputs in boxes of these
#: half-sides (µm; docs/model_card.md, "Nucleus types"); () = one stage
DEFAULT_STAGE2_RADII_UM = (25.0, 100.0)
#: ... fitted only from this many typed training instances (and 4 tiles) on: measured on held-out
#: CRCHisto, the second stage adds +0.016 weighted F1 with 13,306 typed instances (64 tiles), +0.008
#: with 6,574 (40 tiles) and costs -0.019 with 3,758 (20 tiles), where its cross-fitted inputs are poor
STAGE2_MIN_TYPED = 6000
STAGE2_MIN_TILES = 4


def stage2_radii_for(examples) -> tuple[float, ...]:
    """The second-stage radii a head fitted on ``examples`` gets: :data:`DEFAULT_STAGE2_RADII_UM` with
    at least :data:`STAGE2_MIN_TYPED` typed instances on :data:`STAGE2_MIN_TILES` tiles, else ()."""
    typed = sum(int((e.target >= 0).sum()) for e in examples)
    return DEFAULT_STAGE2_RADII_UM if typed >= STAGE2_MIN_TYPED and len(examples) >= STAGE2_MIN_TILES else ()


@dataclass
class TileExamples:
    """One tile's predicted instances with their features and targets.

    ``features`` float32 (K, F); ``target`` int64 (K,): class index, ``NUCLEUS`` (a nucleus of
    unknown class: touched by an unlabelled point only, or matched to an untyped ground-truth
    instance), ``REJECT`` (not a nucleus: no point touches it, or no ground-truth nucleus under it)
    or ``IGNORE``; ``labels`` uint32 (H, W);
    ``scores`` float32 (K,); ``centroids`` float64 (K, 2) (x, y) px; ``mpp`` their µm/px."""

    name: str
    features: np.ndarray
    target: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    centroids: np.ndarray
    points_xy: np.ndarray
    points_class: np.ndarray
    mpp: float = CRCHISTO_MPP  #: µm/px of ``labels`` / ``centroids``


def match_targets(labels: np.ndarray, points_xy: np.ndarray, points_class: np.ndarray, radius_px: float) -> np.ndarray:
    """Instance targets from points: the class of the typed point inside (else nearest within
    ``radius_px`` of the centroid); when several typed points hit one instance, the one nearest
    its centroid wins. Returns int64 (K,) with ``NUCLEUS`` / ``REJECT`` as in :class:`TileExamples`."""
    k = int(labels.max())
    target = np.full(k, REJECT, np.int64)
    if k == 0 or len(points_xy) == 0:
        return target
    cen = centroids_xy(labels)
    h, w = labels.shape
    best = np.full(k, np.inf)
    for (x, y), c in zip(points_xy, points_class):
        r, col = int(round(y)), int(round(x))
        i = int(labels[min(max(r, 0), h - 1), min(max(col, 0), w - 1)]) - 1
        if i < 0:
            d = np.hypot(cen[:, 0] - x, cen[:, 1] - y)
            j = int(np.argmin(d))
            if d[j] > radius_px:
                continue
            i = j
        d = float(np.hypot(cen[i, 0] - x, cen[i, 1] - y))
        if c >= 0:
            if target[i] < 0 or d < best[i]:
                target[i], best[i] = int(c), d
        elif target[i] == REJECT:
            target[i] = NUCLEUS
    return target


def segment_raw(seg, image: np.ndarray, mpp: float):
    """The frozen network's instances without the type head: ``labels, scores, embed, scale``
    (``embed`` (1, D, h, w) as :func:`~pipeline.model.typehead.instance_features` takes it, or None)."""
    prob, hv, embed, scale = seg.predict_maps(image, mpp, return_embed=True)
    lab, sc = instances_from_maps(prob, hv, mpp, seg.params)
    return lab, sc, embed, scale


def tile_examples(seg, name: str, image: np.ndarray, points_xy: np.ndarray, points_class: np.ndarray,
                  mpp: float, radius_um: float = POINT_RADIUS_UM, groups=DEFAULT_GROUPS) -> TileExamples:
    """Segment one tile with the frozen network and build its training examples (features of
    ``groups``, :data:`pipeline.model.typehead.GROUPS`)."""
    lab, sc, embed, scale = segment_raw(seg, image, mpp)
    feats = instance_features(lab, sc, image, embed, mpp, scale, groups)
    target = match_targets(lab, points_xy, points_class, radius_um / mpp)
    return TileExamples(name, feats, target, lab, np.asarray(sc, np.float32), centroids_xy(lab),
                        np.asarray(points_xy, np.float64), np.asarray(points_class, np.int64), float(mpp))


def instance_targets(labels: np.ndarray, truth: np.ndarray, match_iou: float = 0.5,
                     fp_overlap: float = 0.2) -> np.ndarray:
    """Targets of predicted instances on a *fully annotated* tile (every nucleus outlined).

    An instance whose best ground-truth IoU is at least ``match_iou`` is a ``NUCLEUS`` (of unknown
    class); one with at most ``fp_overlap`` of its pixels on any ground-truth nucleus is a false
    detection, ``REJECT``; the rest (partial overlaps, merges, splits) ``IGNORE``.

    Parameters
    ----------
    labels, truth : ndarray of shape (H, W), integer
        Predicted instances 1..K and ground-truth instances (0 = background).

    Returns
    -------
    ndarray of shape (K,), int64
    """
    k = int(labels.max())
    lab = labels.astype(np.int64).ravel()
    gt = truth.astype(np.int64).ravel()
    g1 = int(gt.max()) + 1
    px = np.bincount(lab, minlength=k + 1).astype(np.float64)
    on_gt = np.bincount(lab, weights=(gt > 0).astype(np.float64), minlength=k + 1)
    both = (lab > 0) & (gt > 0)
    pairs, inter = np.unique(lab[both] * g1 + gt[both], return_counts=True)
    pl, gl = pairs // g1, pairs % g1
    gsz = np.bincount(gt, minlength=g1).astype(np.float64)
    best = np.zeros(k + 1)
    np.maximum.at(best, pl, inter / (px[pl] + gsz[gl] - inter))
    target = np.full(k, IGNORE, np.int64)
    target[best[1:] >= match_iou] = NUCLEUS
    target[on_gt[1:] <= fp_overlap * px[1:]] = REJECT
    return target


def instance_tile_examples(seg, samples, groups=DEFAULT_GROUPS) -> list[TileExamples]:
    """Examples of fully annotated instance tiles (:class:`pipeline.data.datasets.Sample`, segmented
    at their own µm/px) for the "not a nucleus" output: :func:`instance_targets`; no classes."""
    out = []
    for smp in samples:
        img, truth = smp.load()
        lab, sc, embed, scale = segment_raw(seg, img, smp.mpp)
        feats = instance_features(lab, sc, img, embed, smp.mpp, scale, groups)
        out.append(TileExamples(smp.name, feats, instance_targets(lab, truth), lab, np.asarray(sc, np.float32),
                                centroids_xy(lab), np.zeros((0, 2)), np.zeros(0, np.int64), float(smp.mpp)))
    return out


def negative_region_examples(seg, path, data_root, groups=DEFAULT_GROUPS, margin_um: float = 64.0,
                             inside: float = 0.5) -> list[TileExamples]:
    """Examples from hand-drawn negative regions (:func:`pipeline.data.regions.read_negative_regions`):
    the slide around the polygons is segmented at level 0; instances with more than ``inside`` of
    their pixels inside a polygon are ``REJECT``, the others ``IGNORE`` (unannotated tissue)."""
    from ..data.regions import read_negative_regions

    out = []
    for r in read_negative_regions(path, data_root, margin_um):
        lab, sc, embed, scale = segment_raw(seg, r["image"], r["mpp"])
        feats = instance_features(lab, sc, r["image"], embed, r["mpp"], scale, groups)
        k = int(lab.max())
        px = np.bincount(lab.ravel(), minlength=k + 1)[1:]
        ins = np.bincount(lab.ravel(), weights=r["mask"].ravel(), minlength=k + 1)[1:]
        target = np.where(ins > inside * px, REJECT, IGNORE).astype(np.int64)
        out.append(TileExamples(r["name"], feats, target, lab, np.asarray(sc, np.float32), centroids_xy(lab),
                                np.zeros((0, 2)), np.zeros(0, np.int64), float(r["mpp"])))
    return out


def crchisto_examples(seg, root, vocab, tiles=None, groups=DEFAULT_GROUPS) -> list[TileExamples]:
    """Examples of crchisto tiles (``root/images/<tile>.png``, ``root/points/<tile>.csv``)."""
    from ..data.classes import read_point_csv
    from ..data.readers import read_image

    root = Path(root)
    names = sorted(p.stem for p in (root / "images").glob("*.png")) if tiles is None else list(tiles)
    out = []
    for name in names:
        img = read_image(root / "images" / f"{name}.png")
        pts = read_point_csv(root / "points" / f"{name}.csv")
        out.append(tile_examples(seg, name, img, pts.xy_px, pts.encode(vocab), CRCHISTO_MPP, groups=groups))
    return out


def head_loss(logits: torch.Tensor, y: torch.Tensor, c: int) -> torch.Tensor:
    """Mean loss over rows: cross-entropy for a class (or the reject output, index ``c``), and for
    ``NUCLEUS`` rows ``-log(1 - p_reject)`` (any class, not rejected)."""
    lse = torch.logsumexp(logits, 1)
    nuc = y == NUCLEUS
    safe = torch.where(nuc, torch.zeros_like(y), y)
    ce = lse - logits.gather(1, safe[:, None])[:, 0]
    not_rej = lse - torch.logsumexp(logits[:, :c], 1)
    return torch.where(nuc, not_rej, ce).mean()


def _fit_mlp(forward, params, mean, std, x: np.ndarray, y: np.ndarray, c: int, epochs: int, lr: float,
             weight_decay: float, train_mode) -> None:
    """Standardise with the stored ``mean``/``std`` buffers and fit ``forward`` full batch (AdamW)."""
    xt, yt = torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y)
    with torch.no_grad():
        mean.copy_(xt.mean(0))
        std.copy_(xt.std(0).clamp_min(1e-3) if len(xt) > 1 else torch.ones(xt.shape[1]))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    train_mode()
    for _ in range(epochs):
        opt.zero_grad()
        loss = head_loss(forward(xt), yt, c)
        loss.backward()
        opt.step()


def _targets(examples, c: int, reject: bool) -> np.ndarray:
    """Training targets of the rows: class index, ``c`` (reject), ``NUCLEUS`` or ``IGNORE``; without a
    reject output both REJECT and NUCLEUS rows are ignored."""
    target = np.concatenate([e.target for e in examples]) if examples else np.zeros(0, np.int64)
    y = target.copy()
    y[y == REJECT] = c if reject else IGNORE
    if not reject:
        y[y == NUCLEUS] = IGNORE
    return y


@torch.inference_mode()
def _stage1_outputs(head: TypeHead, ex: TileExamples) -> np.ndarray:
    if len(ex.features) == 0:
        return np.zeros((0, len(head.classes) + int(head.reject)))
    return head.outputs(head(torch.from_numpy(np.ascontiguousarray(ex.features, np.float32))))


def fit_head(examples, classes, reject: bool = True, hidden: int = 128, epochs: int = 300, lr: float = 3e-3,
             weight_decay: float = 1e-3, dropout: float = 0.2, seed: int = 0, colors=None,
             groups=DEFAULT_GROUPS, stage2_radii_um=None, folds: int = 4) -> TypeHead:
    """Fit a :class:`TypeHead` (full batch, AdamW) on the examples' typed (and reject) instances;
    ``groups``: the feature groups the examples were computed with (stored in the head).

    ``stage2_radii_um``: also fit a second stage reading the neighbours' first-stage outputs in
    boxes of these half-sides (:class:`~pipeline.model.typehead.TypeHead`). The first-stage outputs
    it learns from are **cross-fitted** over ``folds`` folds of the tiles (example ``i`` in fold
    ``i % folds``: each tile's outputs come from a first stage that never saw it), so the second
    stage learns from outputs like those of a new tile. Needs at least 2 examples."""
    feats = np.concatenate([e.features for e in examples]) if examples else np.zeros((0, n_features(groups=groups)))
    c = len(classes)
    y = _targets(examples, c, reject)
    use = (y >= 0) | (y == NUCLEUS)
    cfg = {"classes": list(classes), "n_features": int(feats.shape[1]), "hidden": int(hidden),
           "reject": bool(reject), "reject_threshold": 0.5 if reject else None, "dropout": float(dropout),
           "feature_groups": list(groups)}
    if colors is not None:
        cfg["colors"] = [list(map(int, rgb)) for rgb in colors]
    if not (y >= 0).any():
        raise ValueError("no typed instance to train the type head on")
    kw = dict(hidden=hidden, epochs=epochs, lr=lr, weight_decay=weight_decay, dropout=dropout, seed=seed,
              colors=colors, groups=groups)
    if stage2_radii_um:
        if len(examples) < 2:
            raise ValueError("a two-stage type head needs at least 2 annotated tiles (cross-fitting)")
        nf = min(folds, len(examples))
        oof = [None] * len(examples)
        for f in range(nf):
            h = fit_head([e for i, e in enumerate(examples) if i % nf != f], classes, reject, **kw)
            for i in range(f, len(examples), nf):
                oof[i] = _stage1_outputs(h, examples[i])
    torch.manual_seed(seed)
    head = TypeHead(cfg)
    _fit_mlp(head, head.mlp.parameters(), head.feat_mean, head.feat_std, feats[use], y[use], c, epochs, lr,
             weight_decay, head.train)
    if stage2_radii_um:  # the same first stage, then the second one (seeded on its own)
        torch.manual_seed(seed + 1)
        first, head = head, TypeHead({**cfg, "stage2": {"radii_um": [float(r) for r in stage2_radii_um],
                                                        "folds": int(nf)}})
        head.load_state_dict(first.state_dict(), strict=False)
        f2 = np.concatenate([head.stage2_features(e.features, o, e.centroids, e.mpp) for e, o in zip(examples, oof)])
        _fit_mlp(head.forward2, head.stage2.parameters(), head.feat2_mean, head.feat2_std, f2[use], y[use], c,
                 epochs, lr, weight_decay, head.train)
    return head.eval()


def apply_head(head: TypeHead, ex: TileExamples, reject_threshold: float | None):
    """Predicted classes and centroids on one tile after rejection: (centroids (K', 2), class (K',))."""
    probs, rej = head.predict(ex.features, ex.centroids, ex.mpp)
    keep = np.ones(len(probs), bool) if reject_threshold is None else rej <= reject_threshold
    return ex.centroids[keep], probs[keep].argmax(1) if len(probs) else np.zeros(0, np.int64)


def score_tiles(head: TypeHead | None, examples, n_classes: int, reject_threshold: float | None,
                radius_um: float = POINT_RADIUS_UM, mpp: float = CRCHISTO_MPP) -> dict:
    """Point scores (:func:`pipeline.metrics.point_scores`) over tiles (``head=None``: detection only)."""
    from ..metrics import aggregate_point_counts, point_counts, point_scores

    rows = []
    for ex in examples:
        if head is None:
            cen, cls = ex.centroids, np.full(len(ex.centroids), -1)
        else:
            cen, cls = apply_head(head, ex, reject_threshold)
        if head is None:
            rows.append(point_counts(ex.points_xy, cen, radius_um / mpp))
        else:
            rows.append(point_counts(ex.points_xy, cen, radius_um / mpp, ex.points_class, cls, n_classes))
    return point_scores(aggregate_point_counts(rows))


def tune_threshold(head, examples, n_classes, grid=(0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.01)) -> float:
    """Reject threshold with the best detection F1 on ``examples`` (1.01 = never reject)."""
    best = max(grid, key=lambda t: (round(score_tiles(head, examples, n_classes, t)["f1"], 4), t))
    return float(best)


def with_type_head(model, head: TypeHead):
    """A copy of a CellSAM ``model`` with ``head`` attached (``arch["type_head"]`` set)."""
    new = copy.deepcopy(model)
    new.arch = copy.deepcopy(model.arch)
    new.arch["type_head"] = copy.deepcopy(head.cfg)
    new.type_head = head
    typer = getattr(new, "patch_typer", None)
    if typer is not None and list(typer.classes) != list(head.classes):
        # a shipped patch typer knows the CRCHisto classes only: the new classes are the head's
        import logging

        logging.getLogger(__name__).warning("the patch typer (classes %s) is dropped: the new type head has "
                                            "classes %s", ", ".join(typer.classes), ", ".join(head.classes))
        new.arch.pop("patch_typer", None)
        new.patch_typer = None
    return new


def drop_rejected(labels, scores, probs, rej, threshold):
    """Helper for callers applying rejection by hand (same rule as the segmenter)."""
    keep = rej <= threshold
    return drop_instances(labels, keep), scores[keep], probs[keep]
