"""Nucleus type head: per-instance class probabilities from mask-pooled features (inference side).

For every instance of a label image the head sees one feature vector (:func:`instance_features`):

* the network's 256-d stride-16 embedding, averaged over the stride-16 cells the instance mask
  covers (weighted by the number of mask pixels in each cell);
* the same embedding averaged over a context window (the 3x3 cells around the instance's centroid
  cell), which says what tissue the nucleus sits in;
* morphology from image moments and boundary pixels: log area (µm²), log major / minor axis
  (µm), eccentricity, circularity ``4 pi A / P^2`` (P = boundary pixels x pixel size);
* colour: mean and standard deviation of the optical density ``-log10((I + 1) / 256)`` per RGB
  channel, and the instance's detection score.

Everything is a pass over the labelled pixels only (``np.bincount``, per-instance histograms of the
256 colour values times an optical-density table, the boundary test at labelled pixels), sparse
products with the embedding and summed-area tables: about 20 ms for 1,500 nuclei in a 1216² window,
under 10 % of a lite window (docs/model.md, "Type head").

:class:`TypeHead` standardises the vector (stored mean/std), runs a 2-layer MLP and returns
``C`` class logits plus, when trained with one, a last "not a nucleus" (reject) logit. The head's
configuration lives in the checkpoint's ``arch["type_head"]``::

    {"classes": [...], "n_features": F, "hidden": 128, "reject": true, "reject_threshold": 0.9,
     "colors": [[r, g, b], ...]}
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import sparse
from torch import nn

EMBED_STRIDE = 16
_OD_LUT = -np.log10((np.arange(256, dtype=np.float64) + 1) / 256)  # optical density of a uint8 value
_OD_TABLES = np.stack([_OD_LUT, _OD_LUT ** 2], 1)  # (256, 2): OD and OD^2 of a uint8 value
N_MORPH = 6  # log area µm², log major µm, log minor µm, eccentricity, circularity, (reserved: 1.0)
N_COLOUR = 7  # OD mean x3, OD std x3, detection score


N_NEIGH = 6  # log count in 10 / 25 µm boxes, log mean area in them, log distance to the 1st / 4th nearest
N_SURROUND = 8  # OD of the non-nucleus pixels (x3) + nucleus fraction, in 8 µm and 24 µm boxes
SURROUND_STEP = 6  # the surround boxes are estimated on every 6th pixel (3 µm at 0.5 µm/px)
#: feature groups in their fixed order; a head's ``cfg["feature_groups"]`` picks some (default V1)
GROUPS = ("embed", "context", "morph", "colour", "neighbours", "surround")
V1_GROUPS = ("embed", "context", "morph", "colour")


def group_sizes(embed_dim: int = 256) -> dict[str, int]:
    return {"embed": embed_dim, "context": embed_dim, "morph": N_MORPH, "colour": N_COLOUR,
            "neighbours": N_NEIGH, "surround": N_SURROUND}


def n_features(embed_dim: int = 256, groups=V1_GROUPS) -> int:
    """Length of the per-instance feature vector of ``groups`` for an embedding of ``embed_dim``."""
    sizes = group_sizes(embed_dim)
    return sum(sizes[g] for g in groups)


def feature_columns(groups, embed_dim: int = 256, among=GROUPS) -> np.ndarray:
    """Column indices of ``groups`` inside a feature matrix computed for the groups ``among``."""
    sizes, cols, start = group_sizes(embed_dim), [], 0
    for g in among:
        if g in groups:
            cols.extend(range(start, start + sizes[g]))
        start += sizes[g]
    return np.asarray(cols, np.int64)


def needs_embed(groups) -> bool:
    return "embed" in groups or "context" in groups


def _sat_boxes(sat: np.ndarray, cr: np.ndarray, cc: np.ndarray, half: int) -> tuple[np.ndarray, np.ndarray]:
    """Totals of a channel-first summed-area table ``sat`` (C, h + 1, w + 1) over the boxes of cells
    ``[cr - half, cr + half] x [cc - half, cc + half]`` clipped to the grid: ``(K, C)`` float64, and
    the number of grid cells in each clipped box ``(K,)``."""
    h, w = sat.shape[1] - 1, sat.shape[2] - 1
    r0, r1 = np.clip(cr - half, 0, h), np.clip(cr + half + 1, 0, h)
    c0, c1 = np.clip(cc - half, 0, w), np.clip(cc + half + 1, 0, w)
    return (sat[:, r1, c1] - sat[:, r0, c1] - sat[:, r1, c0] + sat[:, r0, c0]).T, (r1 - r0) * (c1 - c0)


def _box_sums(centroids_xy: np.ndarray, vals: np.ndarray, mpp: float, radii_um, cell_um: float) -> list:
    """Sums of ``vals`` (K, M) over the *other* nuclei whose centroids fall in the box of each
    nucleus: its cell of a ``cell_um`` grid +- ``round(r / cell_um)`` cells, for each radius ``r``.
    One splat + one summed-area table for all radii. Returns, per radius, ``(K, M + 1)`` float64:
    the sums and, last, the number of those nuclei."""
    k, m = vals.shape
    cell = cell_um / mpp
    cr = np.floor(centroids_xy[:, 1] / cell).astype(np.int64)
    cc = np.floor(centroids_xy[:, 0] / cell).astype(np.int64)
    cr -= cr.min()
    cc -= cc.min()
    h, w = int(cr.max()) + 1, int(cc.max()) + 1
    v = np.concatenate([np.asarray(vals, np.float64), np.ones((k, 1))], 1)  # last column: count
    sat = np.zeros((m + 1, h + 1, w + 1))
    flat = cr * w + cc
    for j in range(m + 1):
        sat[j, 1:, 1:] = np.bincount(flat, v[:, j], minlength=h * w).reshape(h, w)
    np.cumsum(sat, 1, out=sat)
    np.cumsum(sat, 2, out=sat)
    out = []
    for r_um in radii_um:
        tot, _ = _sat_boxes(sat, cr, cc, max(0, int(round(r_um / cell_um))))
        out.append(tot - v)  # self out
    return out


def _neighbours(cen: np.ndarray, area: np.ndarray, mpp: float) -> np.ndarray:
    """Neighbourhood of each centroid: log(1 + count) of the other nuclei in boxes of half-side 10
    and 25 µm (2 µm grid, :func:`_box_sums`), log mean area (µm²) of those nuclei (own area if
    none), log distance (µm) to the nearest and to the 4th-nearest nucleus (capped at 50 µm)."""
    from scipy.spatial import cKDTree

    k = len(cen)
    out = []
    for tot in _box_sums(cen, area[:, None], mpp, (10.0, 25.0), 2.0):
        cnt = np.rint(tot[:, 1])
        mean_a = np.where(cnt > 0, tot[:, 0] / np.maximum(cnt, 1), area)
        out += [np.log1p(cnt), np.log(np.maximum(mean_a, 1e-6))]
    kk = min(5, k)
    d, _ = cKDTree(cen).query(cen, k=kk)
    d = np.pad(d.reshape(k, kk), ((0, 0), (0, 5 - kk)), constant_values=np.inf)
    cap = 50.0 / mpp
    out += [np.log(np.minimum(d[:, 1], cap) * mpp + 0.1), np.log(np.minimum(d[:, 4], cap) * mpp + 0.1)]
    return np.stack(out, 1)


def _surround(img8: np.ndarray, fg: np.ndarray, sr: np.ndarray, sc: np.ndarray, mpp: float,
              step: int = 4) -> np.ndarray:
    """Colour of what surrounds each nucleus: mean OD (RGB) of the non-nucleus pixels and the
    nucleus fraction in boxes of 8 and 24 µm centred on the centroid. Estimated on every
    ``step``-th pixel in each direction with summed-area tables (a few ms per 1216² window)."""
    sub = img8[::step, ::step]
    bg = ~fg[::step, ::step]
    h, w = bg.shape
    sat = np.zeros((4, h + 1, w + 1))  # channel-first: each cumulative sum runs over contiguous planes
    for j in range(3):
        sat[j, 1:, 1:] = _OD_LUT.take(sub[..., j]) * bg
    sat[3, 1:, 1:] = bg
    np.cumsum(sat, 1, out=sat)
    np.cumsum(sat, 2, out=sat)
    cr, cc = np.round(sr / step).astype(np.int64), np.round(sc / step).astype(np.int64)
    out = []
    for size_um in (8.0, 24.0):
        tot, cells = _sat_boxes(sat, cr, cc, max(1, int(round(size_um / mpp / 2 / step))))  # (K, 4)
        n_box = np.maximum(cells, 1).astype(np.float64)
        n_bg = np.maximum(tot[:, 3], 1.0)
        out += [tot[:, :3] / n_bg[:, None], (1.0 - tot[:, 3] / n_box)[:, None]]
    return np.concatenate(out, 1)


def instance_features(labels: np.ndarray, scores: np.ndarray, image: np.ndarray, embed, mpp: float,
                      embed_scale: float = 1.0, groups=V1_GROUPS, with_centroids: bool = False):
    """Per-instance feature vectors.

    Parameters
    ----------
    labels : ndarray of shape (H, W), integer
        Instance labels 1..K (0 = background), at the resolution of ``image``.
    scores : ndarray of shape (K,), float
        Detection score of label i+1 at row i.
    image : ndarray of shape (H, W, 3), uint8
        The RGB image ``labels`` belongs to.
    embed : ndarray or torch.Tensor of shape (D, h, w) or (1, D, h, w), float
        The network's stride-16 embedding of the image *as the network saw it* (at the model's
        µm/px, possibly padded).
    mpp : float
        µm/px of ``labels`` / ``image``.
    embed_scale : float
        Network pixels per image pixel (``image mpp / model mpp``); 1 when the image is already at
        the model's µm/px.
    groups : sequence of str
        Feature groups to compute (:data:`GROUPS`; concatenated in that fixed order). ``embed`` may
        be None when neither ``embed`` nor ``context`` is asked for.
    with_centroids : bool
        Also return the instances' (x, y) pixel centroids (what a two-stage head needs).

    Returns
    -------
    ndarray of shape (K, n_features(D, groups)), float32
        With ``with_centroids``: ``(features, centroids_xy float64 (K, 2))``.
    """
    groups = tuple(g for g in GROUPS if g in groups)
    use_embed = needs_embed(groups)
    if use_embed:
        if embed is None:
            raise ValueError(f"feature groups {groups} need the network's embedding, none was given")
        if isinstance(embed, torch.Tensor):
            embed = embed.detach().float().cpu().numpy()
        embed = np.asarray(embed, dtype=np.float32)
        if embed.ndim == 4:
            embed = embed[0]
        d, eh, ew = embed.shape
    else:
        d = 256
    k = int(labels.max()) if labels.size else 0
    if k == 0:
        empty = np.zeros((0, n_features(d, groups)), np.float32)
        return (empty, np.zeros((0, 2))) if with_centroids else empty
    # uint32 labels (the segmenter's) are read as int32 without a copy: ids stay far below 2**31
    lab = labels.view(np.int32) if labels.dtype == np.uint32 else labels.astype(np.int32, copy=False)
    h, w = lab.shape
    fg = lab > 0
    flat_lab = lab.ravel()
    idx = np.flatnonzero(fg)  # labelled pixels in raster order
    own = flat_lab.take(idx)  # label of each labelled pixel
    ll = own.astype(np.int64) - 1
    rr = idx // w
    cc = idx - rr * w
    n = np.maximum(np.bincount(ll, minlength=k).astype(np.float64), 1)
    sr = np.bincount(ll, rr, minlength=k) / n
    sc = np.bincount(ll, cc, minlength=k) / n
    area = n * mpp * mpp
    parts = {}
    if use_embed:
        # --- embedding pooled over the mask (stride-16 cells weighted by pixel counts) ---
        step = EMBED_STRIDE / float(embed_scale)
        flat = embed.reshape(d, -1).T  # (h*w, D) view
        if "embed" in groups:
            er = np.minimum((rr / step).astype(np.int64), eh - 1)
            ec = np.minimum((cc / step).astype(np.int64), ew - 1)
            # one sparse (K, h*w) matrix of pixel counts per (instance, cell): duplicates summed in C
            counts = sparse.csr_matrix((np.ones(len(ll), np.float32), (ll, er * ew + ec)), shape=(k, eh * ew))
            parts["embed"] = np.asarray(counts @ flat, np.float64) / n[:, None]
        if "context" in groups:
            # --- context: embedding averaged over the (in-grid) 3x3 cells around the centroid cell:
            # one sparse (K, h*w) product ---
            cr = np.clip((sr / step).astype(np.int64), 0, eh - 1)
            ccn = np.clip((sc / step).astype(np.int64), 0, ew - 1)
            rows, cols = [], []
            for oy in (-1, 0, 1):
                for ox in (-1, 0, 1):
                    yy, xx = cr + oy, ccn + ox
                    ok = (yy >= 0) & (yy < eh) & (xx >= 0) & (xx < ew)
                    rows.append(np.flatnonzero(ok))
                    cols.append(yy[ok] * ew + xx[ok])
            rows = np.concatenate(rows)
            cells = sparse.csr_matrix((np.ones(len(rows), np.float32), (rows, np.concatenate(cols))),
                                      shape=(k, eh * ew))
            cnum = np.bincount(rows, minlength=k).astype(np.float64)
            parts["context"] = np.asarray(cells @ flat, np.float64) / cnum[:, None]
    if "morph" in groups:
        # --- second moments (raw sums: exact integers in float64) ---
        mrr = np.bincount(ll, rr * rr, minlength=k) / n - sr * sr + 1 / 12
        mcc = np.bincount(ll, cc * cc, minlength=k) / n - sc * sc + 1 / 12
        mrc = np.bincount(ll, rr * cc, minlength=k) / n - sr * sc
        tr, det = mrr + mcc, mrr * mcc - mrc * mrc
        disc = np.sqrt(np.maximum(tr * tr / 4 - det, 0))
        l1, l2 = tr / 2 + disc, np.maximum(tr / 2 - disc, 1e-6)
        major, minor = 4 * np.sqrt(l1) * mpp, 4 * np.sqrt(l2) * mpp
        ecc = np.sqrt(np.clip(1 - l2 / l1, 0, 1))
        # --- boundary pixels (4-neighbourhood, outside = 0) for the circularity, at labelled pixels only ---
        # a labelled pixel is on the boundary when a 4-neighbour has another label or lies outside
        edge = (cc == 0) | (flat_lab.take(idx - 1, mode="clip") != own)
        edge |= (cc == w - 1) | (flat_lab.take(idx + 1, mode="clip") != own)
        edge |= (rr == 0) | (flat_lab.take(idx - w, mode="clip") != own)
        edge |= (rr == h - 1) | (flat_lab.take(idx + w, mode="clip") != own)
        per = np.bincount(ll[edge], minlength=k).astype(np.float64) * mpp
        circ = np.clip(4 * np.pi * area / np.maximum(per, mpp) ** 2, 0, 2)
        parts["morph"] = np.stack([np.log(area), np.log(major), np.log(minor), ecc, circ, np.ones(k)], 1)
    img8 = image if image.dtype == np.uint8 else np.clip(np.round(image), 0, 255).astype(np.uint8)
    if "colour" in groups:
        # --- colour (optical density): per-instance histograms of the 256 values of each channel, times the OD and OD^2 tables
        px = np.take(img8.reshape(-1, 3), idx, axis=0)
        key = ll * 256
        od_mean, od_sq = np.empty((k, 3)), np.empty((k, 3))
        for j in range(3):
            hist = np.bincount(key + px[:, j], minlength=k * 256).reshape(k, 256)
            s_od = hist @ _OD_TABLES
            od_mean[:, j], od_sq[:, j] = s_od[:, 0] / n, s_od[:, 1] / n
        od_std = np.sqrt(np.maximum(od_sq - od_mean ** 2, 0))
        sco = np.asarray(scores, np.float64).reshape(-1)[:k, None]
        parts["colour"] = np.concatenate([od_mean, od_std, sco], 1)
    if "neighbours" in groups:
        parts["neighbours"] = _neighbours(np.stack([sc, sr], 1), area, mpp)
    if "surround" in groups:
        parts["surround"] = _surround(img8, fg, sr, sc, mpp, step=SURROUND_STEP)
    out = np.concatenate([parts[g] for g in groups], 1).astype(np.float32)
    return (out, np.stack([sc, sr], 1)) if with_centroids else out


def neighbour_outputs(centroids_xy: np.ndarray, outputs: np.ndarray, mpp: float, radii_um,
                      cell_um: float = 4.0) -> np.ndarray:
    """Mean output of the *other* nuclei around each nucleus, in square boxes.

    For each radius ``r`` the box is the centroid's grid cell +- ``round(r / cell_um)`` cells of a
    ``cell_um`` grid (a square of side ~2r): the outputs of the nuclei whose centroids fall in it
    are summed with one summed-area table (the nucleus itself subtracted) and divided by their
    number (0 when there is none). Cost: one splat and one table per call, independent of ``r``.

    Parameters
    ----------
    centroids_xy : ndarray of shape (K, 2), float
        (x, y) centroids in px.
    outputs : ndarray of shape (K, M), float
        Per-nucleus values to average (e.g. first-stage class probabilities).
    mpp : float
        µm/px of the centroids.
    radii_um : sequence of float
        Half-sides of the boxes, µm.

    Returns
    -------
    ndarray of shape (K, M * len(radii_um)), float32
        The means for each radius, concatenated in the order of ``radii_um``.
    """
    k, m = outputs.shape
    if k == 0:
        return np.zeros((0, m * len(radii_um)), np.float32)
    out = []
    for tot in _box_sums(np.asarray(centroids_xy, np.float64), outputs, mpp, radii_um, cell_um):
        cnt = np.rint(tot[:, m])
        out.append(np.where(cnt[:, None] > 0, tot[:, :m] / np.maximum(cnt, 1)[:, None], 0.0))
    return np.concatenate(out, 1).astype(np.float32)


def _mlp(nf: int, hid: int, n_out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(nf, hid), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hid, n_out))


class TypeHead(nn.Module):
    """Standardise -> Linear -> ReLU -> Linear: ``C`` class logits (+ 1 reject logit).

    With ``cfg["stage2"] = {"radii_um": [r1, r2, ...]}`` a second MLP refines the first one's
    answer from the neighbourhood's: it reads the same features plus, for each radius, the mean
    first-stage output (``p_class * (1 - p_reject)`` and ``p_reject``; ``p_class`` alone without a
    reject output) of the other nuclei around (:func:`neighbour_outputs`). Cell types cluster in
    tissue (glands, lymphoid aggregates, stroma), which one nucleus' features cannot see.
    """

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.cfg = dict(cfg)
        self.classes = [str(c) for c in cfg["classes"]]
        #: feature groups the head reads (:data:`GROUPS`); heads saved before groups existed: V1
        self.groups = tuple(cfg.get("feature_groups") or V1_GROUPS)
        nf, hid = int(cfg["n_features"]), int(cfg.get("hidden", 128))
        self.reject = bool(cfg.get("reject", False))
        n_out = len(self.classes) + (1 if self.reject else 0)
        drop = float(cfg.get("dropout", 0.0))
        self.register_buffer("feat_mean", torch.zeros(nf))
        self.register_buffer("feat_std", torch.ones(nf))
        self.mlp = _mlp(nf, hid, n_out, drop)
        st2 = cfg.get("stage2")
        #: half-sides (µm) of the neighbourhood boxes of the second stage; () without one
        self.radii_um = tuple(float(r) for r in st2["radii_um"]) if st2 else ()
        self.stage2 = None
        if st2:
            nf2 = nf + n_out * len(self.radii_um)
            self.stage2 = nn.ModuleDict({"mlp": _mlp(nf2, hid, n_out, drop)})
            self.register_buffer("feat2_mean", torch.zeros(nf2))
            self.register_buffer("feat2_std", torch.ones(nf2))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """First stage: ``float32 (K, F)`` -> logits ``(K, C [+ 1])``."""
        return self.mlp((feats - self.feat_mean) / self.feat_std)

    def forward2(self, feats2: torch.Tensor) -> torch.Tensor:
        """Second stage: features + neighbour outputs ``(K, F + n_out * R)`` -> logits."""
        return self.stage2["mlp"]((feats2 - self.feat2_mean) / self.feat2_std)

    def outputs(self, logits: torch.Tensor) -> np.ndarray:
        """The first-stage output the second stage averages over neighbours: ``(K, n_out)``."""
        c = len(self.classes)
        p = torch.softmax(logits, 1).numpy().astype(np.float64)
        if not self.reject:
            return p
        rej = p[:, c:]
        pc = torch.softmax(logits[:, :c], 1).numpy().astype(np.float64)
        return np.concatenate([pc * (1 - rej), rej], 1)

    def stage2_features(self, feats: np.ndarray, stage1_out: np.ndarray, centroids_xy, mpp) -> np.ndarray:
        """Second-stage input: ``feats`` with the neighbours' mean ``stage1_out`` appended."""
        if centroids_xy is None or mpp is None:
            raise ValueError("a two-stage type head needs the nuclei's centroids and µm/px")
        nb = neighbour_outputs(np.asarray(centroids_xy, np.float64), stage1_out, float(mpp), self.radii_um)
        return np.concatenate([np.asarray(feats, np.float32), nb], 1)

    @torch.inference_mode()
    def predict(self, feats: np.ndarray, centroids_xy: np.ndarray | None = None,
                mpp: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Class probabilities and reject probabilities of feature rows.

        Parameters
        ----------
        feats : ndarray of shape (K, F), float32
        centroids_xy : ndarray of shape (K, 2), optional
            (x, y) centroids in px; needed by a two-stage head (``cfg["stage2"]``).
        mpp : float, optional
            µm/px of the centroids; needed by a two-stage head.

        Returns
        -------
        class_probs : ndarray of shape (K, C), float32
            Softmax over the ``C`` classes only (rows sum to 1).
        p_reject : ndarray of shape (K,), float32
            Softmax probability of the reject output (zeros without one).
        """
        c = len(self.classes)
        if len(feats) == 0:
            return np.zeros((0, c), np.float32), np.zeros(0, np.float32)
        logits = self(torch.from_numpy(np.ascontiguousarray(feats, np.float32)))
        if self.stage2 is not None:
            f2 = self.stage2_features(feats, self.outputs(logits), centroids_xy, mpp)
            logits = self.forward2(torch.from_numpy(f2))
        probs = torch.softmax(logits[:, :c], 1).numpy().astype(np.float32)
        if self.reject:
            rej = torch.softmax(logits, 1)[:, c].numpy().astype(np.float32)
        else:
            rej = np.zeros(len(feats), np.float32)
        return probs, rej


def centroids_xy(labels: np.ndarray) -> np.ndarray:
    """(x, y) pixel centroids of labels 1..K, float64 (K, 2)."""
    k = int(labels.max()) if labels.size else 0
    rr, cc = np.nonzero(labels)
    ll = labels[rr, cc].astype(np.int64) - 1
    n = np.maximum(np.bincount(ll, minlength=k), 1)
    return np.stack([np.bincount(ll, cc, minlength=k) / n, np.bincount(ll, rr, minlength=k) / n], 1)


def drop_instances(labels: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Labels with the instances where ``keep`` is False removed and the rest renumbered 1..K'
    in their original order. ``keep``: bool (K,), row i = label i+1."""
    lut = np.zeros(len(keep) + 1, np.uint32)
    lut[1:][keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.uint32)
    return lut[labels]
