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

All of it is a handful of ``np.bincount`` passes over the label image and one sparse product with
the embedding: a few per cent of a lite forward (docs/model.md, "Type head").

:class:`TypeHead` standardises the vector (stored mean/std), runs a 2-layer MLP and returns
``C`` class logits plus, when trained with one, a last "not a nucleus" (reject) logit. The head's
configuration lives in the checkpoint's ``arch["type_head"]``::

    {"classes": [...], "n_features": F, "hidden": 128, "reject": true, "reject_threshold": 0.9,
     "colors": [[r, g, b], ...]}
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

EMBED_STRIDE = 16
N_MORPH = 6  # log area µm², log major µm, log minor µm, eccentricity, circularity, (reserved: 1.0)
N_COLOUR = 7  # OD mean x3, OD std x3, detection score


def n_features(embed_dim: int = 256) -> int:
    """Length of the per-instance feature vector for an embedding of ``embed_dim`` channels."""
    return 2 * embed_dim + N_MORPH + N_COLOUR


def instance_features(labels: np.ndarray, scores: np.ndarray, image: np.ndarray, embed, mpp: float,
                      embed_scale: float = 1.0) -> np.ndarray:
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

    Returns
    -------
    ndarray of shape (K, n_features(D)), float32
    """
    if isinstance(embed, torch.Tensor):
        embed = embed.detach().float().cpu().numpy()
    embed = np.asarray(embed, dtype=np.float32)
    if embed.ndim == 4:
        embed = embed[0]
    d, eh, ew = embed.shape
    k = int(labels.max()) if labels.size else 0
    if k == 0:
        return np.zeros((0, n_features(d)), np.float32)
    lab = labels.astype(np.int64, copy=False)
    h, w = lab.shape
    fg = lab > 0
    rr, cc = np.nonzero(fg)
    ll = lab[rr, cc] - 1
    n = np.bincount(ll, minlength=k).astype(np.float64)
    n = np.maximum(n, 1)
    # --- embedding pooled over the mask (stride-16 cells weighted by pixel counts) ---
    step = EMBED_STRIDE / float(embed_scale)
    er = np.minimum((rr / step).astype(np.int64), eh - 1)
    ec = np.minimum((cc / step).astype(np.int64), ew - 1)
    key = ll * (eh * ew) + er * ew + ec
    ukey, cnt = np.unique(key, return_counts=True)
    inst, cell = ukey // (eh * ew), ukey % (eh * ew)
    flat = embed.reshape(d, -1).T  # (h*w, D)
    pooled = np.zeros((k, d), np.float64)
    np.add.at(pooled, inst, flat[cell] * cnt[:, None])
    pooled /= n[:, None]
    # --- moments ---
    sr = np.bincount(ll, rr, minlength=k) / n
    sc = np.bincount(ll, cc, minlength=k) / n
    dr, dc = rr - sr[ll], cc - sc[ll]
    mrr = np.bincount(ll, dr * dr, minlength=k) / n + 1 / 12
    mcc = np.bincount(ll, dc * dc, minlength=k) / n + 1 / 12
    mrc = np.bincount(ll, dr * dc, minlength=k) / n
    tr, det = mrr + mcc, mrr * mcc - mrc * mrc
    disc = np.sqrt(np.maximum(tr * tr / 4 - det, 0))
    l1, l2 = tr / 2 + disc, np.maximum(tr / 2 - disc, 1e-6)
    major, minor = 4 * np.sqrt(l1) * mpp, 4 * np.sqrt(l2) * mpp
    ecc = np.sqrt(np.clip(1 - l2 / l1, 0, 1))
    # --- context: embedding over the 3x3 cells around the centroid cell ---
    cr = np.clip((sr / step).astype(np.int64), 0, eh - 1)
    ccn = np.clip((sc / step).astype(np.int64), 0, ew - 1)
    ctx = np.zeros((k, d), np.float64)
    cnum = np.zeros(k, np.float64)
    for oy in (-1, 0, 1):
        for ox in (-1, 0, 1):
            yy, xx = cr + oy, ccn + ox
            ok = (yy >= 0) & (yy < eh) & (xx >= 0) & (xx < ew)
            ctx[ok] += flat[yy[ok] * ew + xx[ok]]
            cnum += ok
    ctx /= np.maximum(cnum, 1)[:, None]
    # --- boundary pixels (4-neighbourhood) for the circularity ---
    pad = np.pad(lab, 1)
    centre = pad[1:-1, 1:-1]
    edge = ((pad[:-2, 1:-1] != centre) | (pad[2:, 1:-1] != centre) | (pad[1:-1, :-2] != centre)
            | (pad[1:-1, 2:] != centre)) & fg
    per = np.bincount(lab[edge] - 1, minlength=k).astype(np.float64) * mpp
    area = n * mpp * mpp
    circ = np.clip(4 * np.pi * area / np.maximum(per, mpp) ** 2, 0, 2)
    # --- colour (optical density) ---
    od = -np.log10((image[rr, cc].astype(np.float64) + 1) / 256)
    od_mean = np.stack([np.bincount(ll, od[:, j], minlength=k) / n for j in range(3)], 1)
    od_sq = np.stack([np.bincount(ll, od[:, j] ** 2, minlength=k) / n for j in range(3)], 1)
    od_std = np.sqrt(np.maximum(od_sq - od_mean ** 2, 0))
    morph = np.stack([np.log(area), np.log(major), np.log(minor), ecc, circ, np.ones(k)], 1)
    sco = np.asarray(scores, np.float64).reshape(-1)[:k, None]
    out = np.concatenate([pooled, ctx, morph, od_mean, od_std, sco], 1)
    return out.astype(np.float32)


class TypeHead(nn.Module):
    """Standardise -> Linear -> ReLU -> Linear: ``C`` class logits (+ 1 reject logit)."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.cfg = dict(cfg)
        self.classes = [str(c) for c in cfg["classes"]]
        nf, hid = int(cfg["n_features"]), int(cfg.get("hidden", 128))
        self.reject = bool(cfg.get("reject", False))
        n_out = len(self.classes) + (1 if self.reject else 0)
        self.register_buffer("feat_mean", torch.zeros(nf))
        self.register_buffer("feat_std", torch.ones(nf))
        self.mlp = nn.Sequential(nn.Linear(nf, hid), nn.ReLU(), nn.Dropout(float(cfg.get("dropout", 0.0))),
                                 nn.Linear(hid, n_out))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """``float32 (K, F)`` -> logits ``(K, C [+ 1])``."""
        return self.mlp((feats - self.feat_mean) / self.feat_std)

    @torch.inference_mode()
    def predict(self, feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Class probabilities and reject probabilities of feature rows.

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
        probs = torch.softmax(logits[:, :c], 1).numpy().astype(np.float32)
        if self.reject:
            rej = torch.softmax(logits, 1)[:, c].numpy().astype(np.float32)
        else:
            rej = np.zeros(len(feats), np.float32)
        return probs, rej


def drop_instances(labels: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Labels with the instances where ``keep`` is False removed and the rest renumbered 1..K'
    in their original order. ``keep``: bool (K,), row i = label i+1."""
    lut = np.zeros(len(keep) + 1, np.uint32)
    lut[1:][keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.uint32)
    return lut[labels]
