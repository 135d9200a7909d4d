"""Training of CellSAM's SAM prompt encoder + mask decoder (the refiner) on frozen embeddings.

Each step draws ``batch_size`` augmented crops (:func:`pipeline.data.augment.augment`: random crop
with scale jitter, dihedral, stain/colour jitter), computes their embeddings with the frozen student
(fused with the teacher when one is attached to a dual checkpoint), and samples up to
``prompts_per_crop`` ground-truth instances per crop. Prompts imitate the dense instances seen at
inference, with noise: the point is the instance pixel nearest to the centroid (half of the time) or
a uniformly drawn instance pixel; the box corners move by N(0, (0.1 x box side)^2), clipped to 8 px.
Decoding uses the same local windows as inference (:func:`pipeline.model.refine.decode_windows`).

Loss (SAM-style): for each prompt, ``BCE + Dice`` of each of the 3 multimask outputs (upsampled to
pixels) against the GT mask; only the best output is back-propagated; plus ``MSE`` between the
predicted IoUs and the actual IoUs of all 3 outputs. Resumable via :func:`pipeline.training.loop.fit`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..model.refine import RefineParams, attach_sam_decoder, decode_windows, prompt_windows
from ..model.student import EMBED_STRIDE

log = logging.getLogger(__name__)


from ..config import RefinerConfig  # noqa: E402,F401  (defaults live in pipeline/config.py)


def frozen_embeddings(model, x: torch.Tensor) -> torch.Tensor:
    """The (fused) embedding the decoders see, without gradients. ``(N, 256, H/16, W/16)``."""
    with torch.no_grad():
        xn = model.normalize(x)
        s = model.student(xn)["embed"]
        if model.teacher is not None and model.fusion is not None:
            s = model.fusion(s, model.teacher(xn))
    return s


def sample_prompts(rng: np.random.Generator, lab: np.ndarray, n: int, window_tokens: int, min_area_px: int):
    """Up to ``n`` GT instances of a crop as (point_xy (2,), box_xyxy (4,), window (4,), mask bool (h, w)).

    Instances whose box (+1 token margin) does not fit in the window are skipped.
    """
    gh, gw = lab.shape[0] // EMBED_STRIDE, lab.shape[1] // EMBED_STRIDE
    ids, counts = np.unique(lab[lab > 0], return_counts=True)
    ids = ids[counts >= min_area_px]
    if ids.size == 0:
        return []
    pick = np.sort(rng.choice(ids, size=min(n, ids.size), replace=False))
    out = []
    for i in pick:
        rr, cc = np.nonzero(lab == i)
        r0, r1, c0, c1 = rr.min(), rr.max() + 1, cc.min(), cc.max() + 1
        if -(-(r1 - r0) // EMBED_STRIDE) + 2 > window_tokens or -(-(c1 - c0) // EMBED_STRIDE) + 2 > window_tokens:
            continue
        if rng.random() < 0.5:
            j = int(np.argmin((rr - rr.mean()) ** 2 + (cc - cc.mean()) ** 2))
        else:
            j = int(rng.integers(0, rr.size))
        point = np.array([cc[j], rr[j]], np.float32)
        side = np.array([c1 - c0, r1 - r0, c1 - c0, r1 - r0], np.float64)
        box = np.array([c0, r0, c1 - 1, r1 - 1], np.float64) + np.clip(rng.normal(0, 0.1 * side), -8, 8)
        box = np.clip(box, 0, [lab.shape[1] - 1, lab.shape[0] - 1] * 2).astype(np.float32)
        win = prompt_windows(np.array([[r0, c0, r1, c1]]), (gh, gw), window_tokens)[0]
        tr, tc = int(win[0]) * EMBED_STRIDE, int(win[1]) * EMBED_STRIDE
        m = lab[tr:tr + window_tokens * EMBED_STRIDE, tc:tc + window_tokens * EMBED_STRIDE] == i
        out.append((point, box, win, m))
    return out


def refiner_losses(logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor) -> dict:
    """SAM-style losses. ``logits`` (B, M, h, w) at pixel resolution, ``iou_pred`` (B, M), ``target``
    (B, h, w) float 0/1."""
    t = target[:, None].expand_as(logits)
    bce = F.binary_cross_entropy_with_logits(logits, t, reduction="none").mean((2, 3))
    p = torch.sigmoid(logits)
    dice = 1 - (2 * (p * t).sum((2, 3)) + 1) / (p.sum((2, 3)) + t.sum((2, 3)) + 1)
    per = bce + dice
    best = per.argmin(1, keepdim=True)
    mask_loss = per.gather(1, best).mean()
    with torch.no_grad():
        pred = logits > 0
        inter = (pred & (t > 0.5)).sum((2, 3)).float()
        union = (pred | (t > 0.5)).sum((2, 3)).float()
        true_iou = inter / union.clamp(min=1)
    iou_mse = F.mse_loss(iou_pred.float(), true_iou)
    return {"loss": mask_loss + iou_mse, "mask": mask_loss, "bce": bce.gather(1, best).mean(),
            "dice": dice.gather(1, best).mean(), "iou_mse": iou_mse}


def train_refiner(model, data, out, *, cfg: RefinerConfig = RefinerConfig(), teacher=None,
                  metadata: dict | None = None, device: str = "auto", resume_state=None) -> dict:
    """Train ``model``'s prompt encoder + mask decoder (everything else frozen) and write ``out``.

    Parameters
    ----------
    model : CellSAM
        Lite or dual (then ``teacher`` is attached for the embeddings). A SAM decoder is added when
        missing: initialised from ``teacher.decoder_state`` if a teacher is given, else random.
    data : path-like
        Annotated-data folder (as for ``cellsam train``; its training split).
    out : path-like
        Final checkpoint (run state in ``OUT.run/``); metadata ``refine`` = :class:`RefineParams`.
    teacher : SamTeacher, optional
    metadata : dict, optional
        Metadata of ``model``'s checkpoint (µm/px etc.), carried over.

    Returns
    -------
    dict
        Final metadata.
    """
    from ..data.augment import augment
    from ..model.segmenter import resolve_device
    from .loop import fit, sampling_weights, train_only
    from .train import training_tiles

    dev = resolve_device(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    meta = dict(metadata or {})
    mpp = float(meta.get("mpp", 0.5))
    if cfg.crop_px % EMBED_STRIDE or cfg.crop_px < cfg.window_tokens * EMBED_STRIDE:
        raise InputError(f"crop_px must be a multiple of {EMBED_STRIDE} and >= window_tokens x {EMBED_STRIDE}")
    tiles = training_tiles(data, mpp, cfg.max_tiles)
    weights = sampling_weights(tiles)
    torch.manual_seed(cfg.seed)
    if teacher is not None and model.fusion is not None:
        model.teacher = teacher
    if model.mask_decoder is None:
        if teacher is not None:
            attach_sam_decoder(model, teacher.decoder_cfg, teacher.decoder_state)
        else:
            attach_sam_decoder(model, {"mlp_dim": cfg.mlp_dim})
    model = model.to(dev).eval()
    model.prompt_encoder.train()
    model.mask_decoder.train()
    params = train_only(model, ("prompt_encoder.", "mask_decoder."))
    pe, md = model.prompt_encoder, model.mask_decoder

    def step(rng):
        imgs, labs = [], []
        for _ in range(cfg.batch_size):
            d = tiles[int(rng.choice(len(tiles), p=weights))]
            img, lab, _ = augment(rng, d["image"], d["labels"], d["hv"], cfg.crop_px, cfg.aug_strength)
            imgs.append(img)
            labs.append(lab)
        x = torch.from_numpy(np.stack(imgs)).to(dev).permute(0, 3, 1, 2).float()
        emb = frozen_embeddings(model, x)
        pts, boxes, wins, tgts = [], [], [], []
        for b, lab in enumerate(labs):
            for point, box, win, m in sample_prompts(rng, lab, cfg.prompts_per_crop, cfg.window_tokens, cfg.min_area_px):
                pts.append(point)
                boxes.append(box)
                wins.append(np.append(win, b))
                tgts.append(m)
        if not pts:
            zero = sum(p.sum() * 0.0 for p in params)
            return {"loss": zero}
        gh, gw = emb.shape[-2:]
        dense_pe = pe.pe_layer((int(gh), int(gw)))
        logits, iou = decode_windows(pe, md, emb, dense_pe, np.stack(wins).astype(np.int64),
                                     torch.from_numpy(np.stack(pts)).to(dev), torch.from_numpy(np.stack(boxes)).to(dev),
                                     (cfg.crop_px, cfg.crop_px))
        logits = F.interpolate(logits, scale_factor=4, mode="bilinear", align_corners=False)
        target = torch.from_numpy(np.stack(tgts)).to(dev).float()
        return refiner_losses(logits, iou, target)

    meta["refine"] = RefineParams(window_tokens=cfg.window_tokens).to_dict()
    meta["refiner"] = {"config": asdict(cfg), "loss": "best-of-3 (BCE + Dice) + MSE(predicted IoU, IoU)",
                       "decoder_init": (teacher.info["type"] if teacher is not None else "random")}
    return fit(model, params, Path(out), meta, cfg, step, resume_state=resume_state)


__all__ = ["RefinerConfig", "train_refiner", "refiner_losses", "sample_prompts", "frozen_embeddings"]
