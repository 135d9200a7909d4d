"""Training of the patch typer (:mod:`pipeline.model.patchtyper`) from typed points.

The segmentation network stays frozen. Each training tile is segmented once; every predicted
instance gets the target of :mod:`pipeline.training.typehead` (class of the typed point it holds,
"a nucleus of unknown class", "not a nucleus" or ignored), and a patch at the typer's µm/px is
sampled around its centroid (:func:`instance_patches`): the typer learns from the centroids it will
see at inference, not from the annotators' points.

Loss: class-weighted cross-entropy with label smoothing on rows with a class or "not a nucleus"
target, ``-log(1 - p_reject)`` on the nucleus-of-unknown-class rows. AdamW, one-cycle learning
rate, flips / rot90 / per-channel gain and offset jitter and, with probability ``blur``, an
out-of-focus blur of the patch (Gaussian, sigma in µm: :data:`BLUR_UM`), seeded.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from ..model.patchtyper import PatchTyper, crop_patches, sample_patches
from .typehead import NUCLEUS, REJECT


def instance_patches(image: np.ndarray, centroids_xy: np.ndarray, mpp: float, typer_mpp: float,
                     size: int, sampler: str = "bilinear") -> np.ndarray:
    """``uint8 (K, size, size, 3)`` patches at ``typer_mpp`` around the centroids of an image at ``mpp``
    (the same sampling as inference: :func:`pipeline.model.patchtyper.sample_patches`, or
    :func:`~pipeline.model.patchtyper.crop_patches` with ``sampler="crop"``)."""
    if len(centroids_xy) == 0:
        return np.zeros((0, size, size, 3), np.uint8)
    if sampler == "crop":
        return crop_patches(image, centroids_xy, typer_mpp / mpp, size).permute(0, 2, 3, 1).numpy()
    img = torch.from_numpy(np.array(image[..., :3], np.uint8)).permute(2, 0, 1)[None].float()
    out = []
    for s in range(0, len(centroids_xy), 512):
        p = sample_patches(img, centroids_xy[s:s + 512], typer_mpp / mpp, size)
        out.append(p.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def typer_targets(target: np.ndarray, n_classes: int) -> np.ndarray:
    """Row targets of :class:`~pipeline.training.typehead.TileExamples` ``target`` values: class index,
    ``n_classes`` for "not a nucleus", ``NUCLEUS`` kept, anything else ``-1`` (ignored)."""
    y = np.where(target >= 0, target, -1).astype(np.int64)
    y[target == REJECT] = n_classes
    y[target == NUCLEUS] = NUCLEUS
    return y


def typer_loss(logits: torch.Tensor, y: torch.Tensor, class_w: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Mean over rows: weighted, smoothed cross-entropy on class / reject rows, ``-log(1 - p_reject)``
    on ``NUCLEUS`` rows (any class, not rejected)."""
    c = logits.shape[1] - 1
    nuc = y == NUCLEUS
    loss = logits.new_zeros(())
    n = 0
    if (~nuc).any():
        loss = loss + F.cross_entropy(logits[~nuc], y[~nuc], weight=class_w, label_smoothing=smoothing,
                                      reduction="sum") / class_w[y[~nuc]].mean()
        n += int((~nuc).sum())
    if nuc.any():
        ln = logits[nuc]
        loss = loss + (torch.logsumexp(ln, 1) - torch.logsumexp(ln[:, :c], 1)).sum()
        n += int(nuc.sum())
    return loss / max(n, 1)


#: sigma range of the typer's out-of-focus augmentation, µm (that of the network's
#: :data:`pipeline.data.augment.DEGRADE_BLUR_UM`)
BLUR_UM = (0.4, 1.4)


def blur_patches(x: torch.Tensor, sigma_px: np.ndarray) -> torch.Tensor:
    """Gaussian blur of each patch of a ``(N, 3, P, P)`` float batch with its own sigma (patch
    pixels; ``sigma_px[i] <= 0`` leaves patch ``i`` unchanged). Separable, edges replicated."""
    n, _, p, _ = x.shape
    r = int(np.ceil(3 * max(float(np.max(sigma_px)), 1e-3)))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    s = torch.from_numpy(np.maximum(np.asarray(sigma_px, np.float32), 1e-3))[:, None]
    k = torch.exp(-0.5 * (t[None] / s) ** 2)
    k = k / k.sum(1, keepdim=True)  # (N, 2r+1); a sigma of ~0 is a delta
    pad = F.pad(x, (r, r, r, r), mode="replicate")
    # rows then columns, one kernel per patch (grouped convolution over the patch axis)
    y = pad.reshape(1, n * 3, p + 2 * r, p + 2 * r)
    kk = k.repeat_interleave(3, 0)
    y = F.conv2d(y, kk[:, None, None, :], groups=n * 3)
    y = F.conv2d(y, kk[:, None, :, None], groups=n * 3)
    return y.reshape(n, 3, p, p)


def augment(x: torch.Tensor, rng: np.random.Generator, blur: float = 0.0, mpp: float = 1.0) -> torch.Tensor:
    """Flip, rot90 and per-channel gain / offset jitter of a ``(N, 3, P, P)`` batch in [0, 1]; with
    ``blur`` > 0 each patch is also blurred with that probability (sigma drawn from :data:`BLUR_UM`,
    ``mpp`` = the patches' µm/px). ``blur=0`` draws nothing more (the random stream of earlier runs)."""
    if rng.random() < 0.5:
        x = x.flip(3)
    x = torch.rot90(x, int(rng.integers(4)), (2, 3))
    g = torch.from_numpy(rng.normal(1.0, 0.1, (x.shape[0], 3, 1, 1)).astype(np.float32))
    o = torch.from_numpy(rng.normal(0.0, 0.05, (x.shape[0], 3, 1, 1)).astype(np.float32))
    x = (x * g + o).clamp(0, 1)
    if blur > 0:
        on = rng.random(x.shape[0]) < blur
        sigma = np.where(on, rng.uniform(*BLUR_UM, x.shape[0]) / mpp, 0.0)
        if on.any():
            x = blur_patches(x, sigma)
    return x


def fit_typer(patches: np.ndarray, y: np.ndarray, cfg: dict, epochs: int = 24, batch: int = 128,
              lr: float = 2e-3, weight_decay: float = 1e-3, smoothing: float = 0.05, seed: int = 0,
              on_epoch=None, log=print, soft: np.ndarray | None = None, soft_weight: float = 0.0,
              blur: float = 0.0) -> PatchTyper:
    """Train a :class:`PatchTyper` (``cfg`` as in ``arch["patch_typer"]``) on ``uint8 (N, P, P, 3)``
    patches with :func:`typer_targets` rows ``y``; ``on_epoch(epoch, typer)`` may evaluate
    (the typer is in eval mode during the call).

    ``soft``: optional ``float (N, C + 1)`` probabilities of a teacher (e.g. the quality model's
    typer at the same centroids, "not a nucleus" last); the loss then adds ``soft_weight`` x the
    cross-entropy to them (knowledge distillation, temperature 1) on the rows that train.

    ``blur``: probability of the out-of-focus augmentation per patch (:func:`augment`); the teacher's
    ``soft`` targets stay those of the sharp patch, so the typer learns to answer as on a sharp one."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    c = len(cfg["classes"])
    use = (y >= 0) | (y == NUCLEUS)
    x_all = torch.from_numpy(np.ascontiguousarray(patches[use])).permute(0, 3, 1, 2)
    y_all = torch.from_numpy(y[use])
    s_all = None if soft is None or soft_weight <= 0 else torch.from_numpy(np.asarray(soft, np.float32)[use])
    counts = np.bincount(y[(y >= 0) & (y < c)], minlength=c).astype(np.float64)
    w = np.ones(c + 1)
    w[:c] = counts.sum() / (c * np.maximum(counts, 1))
    class_w = torch.tensor(w, dtype=torch.float32)
    typer = PatchTyper(cfg)
    steps = len(y_all) // batch
    opt = torch.optim.AdamW(typer.parameters(), lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=max(1, epochs * steps))
    t0 = time.time()
    for ep in range(epochs):
        typer.train()
        perm = torch.from_numpy(rng.permutation(len(y_all)))
        total = 0.0
        for i in range(steps):
            idx = perm[i * batch:(i + 1) * batch]
            xb = augment(x_all[idx].float().div_(255), rng, blur, float(cfg.get("mpp", 0.55)))
            logits = typer(xb)
            loss = typer_loss(logits, y_all[idx], class_w, smoothing)
            if s_all is not None:  # augmentations are label-preserving: the teacher's view holds
                loss = loss - soft_weight * (s_all[idx] * torch.log_softmax(logits, 1)).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        typer.eval()
        log(f"epoch {ep}: loss {total / max(steps, 1):.4f} ({time.time() - t0:.0f} s)")
        if on_epoch is not None:
            on_epoch(ep, typer)
    return typer.eval()
