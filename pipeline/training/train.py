"""Training of the CellSAM dense heads (lite student) on annotated nucleus tiles.

Resumable: the run directory ``<out>.run/`` holds ``last.pt`` (model + optimiser + scheduler +
epoch + RNG-free state, written atomically every epoch), ``best.pt`` (best validation AJI+PQ) and
``log.csv`` (one row per epoch: losses, validation metrics, seconds). Deterministic given ``seed``:
each epoch draws its crops from ``numpy.random.default_rng([seed, epoch])``, so an interrupted run
resumed from ``last.pt`` continues like an uninterrupted one (up to floating-point
non-associativity of multithreaded CPU kernels). ``resume_state=FILE`` (``--resume-state``) also
keeps a compact, committable copy of that state (fp16 weights; see :mod:`pipeline.training.loop`)
that a run on another machine resumes from; it is deleted when the run ends.

With ``cfg.ema`` an exponential moving average of the weights (parameters and BatchNorm statistics)
is kept next to the trained ones; validation, ``best.pt`` and the output use the average, and
``last.pt`` carries it for resuming.

Losses (HoVer-Net style): nucleus BCE + soft Dice; HV maps MSE (x2) + MSGE (mean squared error of
the maps' spatial gradients inside nuclei).
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import TrainConfig
from ..data.augment import augment
from ..data.datasets import builtin_samples, prepare, split_samples, user_samples
from ..errors import InputError
from ..model.cellsam import DEFAULT_ARCH, CellSAM, grown, with_distance_head
from ..model.checkpoint import load_checkpoint, save_checkpoint
from ..model.postprocess import PostprocessParams, instances_from_maps
from ..model.segmenter import Segmenter
from .loop import (WeightEMA, end_epoch, finish_run, optimizer_and_schedule, optimizer_step, restore_run,
                   sampling_weights)

log = logging.getLogger(__name__)


def load_data(spec: str, mpp: float, *, validation: bool = True):
    """``spec`` = a folder with ``monuseg2018_train/`` + ``cpm15/`` (built-in split) or a user folder
    (``images/``, ``labels/``, ``mpp.txt``; all used for training). Returns (train, val) lists of
    prepared dicts (see :func:`pipeline.data.datasets.prepare`) and the val samples."""
    root = Path(spec)
    if not root.exists():
        raise InputError(f"{root}: training data folder not found")
    if (root / "monuseg2018_train").exists() or (root / "cpm15").exists():
        tr, va = split_samples(builtin_samples(root))
    else:
        tr, va = user_samples(root), []
    if not validation:
        va = []
    return [prepare(s, mpp) for s in tr], va


def training_tiles(spec: str, mpp: float, max_tiles: int = 0) -> list[dict]:
    """The prepared training tiles of ``spec`` (:func:`load_data`, no validation split), the first
    ``max_tiles`` if > 0; InputError if there are none."""
    tiles, _ = load_data(spec, mpp, validation=False)
    if max_tiles:
        tiles = tiles[:max_tiles]
    if not tiles:
        raise InputError(f"{spec}: no training tiles")
    return tiles


def _soft_dice(logit, target):
    p = torch.sigmoid(logit)
    inter = (p * target).sum((1, 2))
    return 1 - ((2 * inter + 1) / (p.sum((1, 2)) + target.sum((1, 2)) + 1)).mean()


def _grad(x):
    gx = x[..., :, 1:] - x[..., :, :-1]
    gy = x[..., 1:, :] - x[..., :-1, :]
    return gx, gy


def losses(maps, fg, hv) -> dict:
    """HoVer-style losses; ``hv`` targets (N, 3, H, W) = h, v, normalised distance. With a 4-channel
    model the distance channel adds a soft-target BCE (``dist``)."""
    logit = maps[:, 0]
    dist_t = hv[:, 2] if hv.shape[1] > 2 else None
    hv = hv[:, :2]
    bce = F.binary_cross_entropy_with_logits(logit, fg)
    dice = _soft_dice(logit, fg)
    mse = F.mse_loss(maps[:, 1:3], hv)
    ph, pv = maps[:, 1], maps[:, 2]
    gh_p, _ = _grad(ph)
    _, gv_p = _grad(pv)
    gh_t, _ = _grad(hv[:, 0])
    _, gv_t = _grad(hv[:, 1])
    m_h = fg[..., :, 1:] * fg[..., :, :-1]
    m_v = fg[..., 1:, :] * fg[..., :-1, :]
    msge = (((gh_p - gh_t) ** 2) * m_h).sum() / (m_h.sum() + 1) + (((gv_p - gv_t) ** 2) * m_v).sum() / (m_v.sum() + 1)
    total = bce + dice + 2 * mse + msge
    out = {"bce": bce, "dice": dice, "mse": mse, "msge": msge}
    if maps.shape[1] > 3 and dist_t is not None:
        dist = F.binary_cross_entropy_with_logits(maps[:, 3], dist_t)
        total = total + 2 * dist
        out["dist"] = dist
    return {"loss": total, **out}


def make_batch(rng, data, weights, cfg: TrainConfig):
    imgs, fgs, hvs = [], [], []
    for _ in range(cfg.batch_size):
        d = data[int(rng.choice(len(data), p=weights))]
        img, lab, hv = augment(rng, d["image"], d["labels"], d["hv"], cfg.crop_px, cfg.aug_strength,
                               degrade=cfg.degrade, mpp=cfg.mpp)
        imgs.append(img)
        fgs.append(lab > 0)
        hvs.append(hv)
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float().contiguous(memory_format=torch.channels_last)
    return x, torch.from_numpy(np.stack(fgs)).float(), torch.from_numpy(np.stack(hvs)).float()


def evaluate_model(model, metadata, val_samples, params: PostprocessParams | None = None) -> dict:
    """Validation metrics (native resolution of each tile): mean AJI, PQ, Dice, pixel P/R."""
    from ..metrics import aggregate, evaluate_pair

    seg = Segmenter(model, {**metadata, "postprocess": (params or PostprocessParams()).to_dict()}, device="cpu")
    per = {}
    for s in val_samples:
        img, lab = s.load()
        pred = seg.segment(img, s.mpp)[0]
        per[s.name] = evaluate_pair(lab, pred)
    model.train()
    return aggregate(per)


MIN_SCORE_GRID = (0.0, 0.75, 0.78, 0.8, 0.82, 0.84)


def tune_postprocess(model, metadata, val_samples) -> tuple[PostprocessParams, dict]:
    """Grid-search the decoding thresholds on the validation split (maps computed once)."""
    from ..metrics import aggregate, evaluate_pair

    seg = Segmenter(model, metadata, device="cpu")
    cache = []
    for s in val_samples:
        img, lab = s.load()
        prob, hv = seg.predict_maps(img, s.mpp)
        cache.append((s, lab, prob, hv))
    best, best_score, best_res = PostprocessParams(), -1.0, {}
    if cache and cache[0][3].shape[0] > 2:  # distance head: markers from the distance map
        grid = [{"fg_threshold": f, "dist_threshold": d, "min_area_um2": a}
                for f, d, a in itertools.product((0.45, 0.5, 0.55, 0.6, 0.65, 0.7), (0.35, 0.4, 0.45, 0.5, 0.55),
                                                 (3.0, 6.0, 10.0))]
    else:
        grid = [{"fg_threshold": f, "marker_threshold": m, "sigma_um": g}
                for f, m, g in itertools.product((0.4, 0.5, 0.6), (0.3, 0.45, 0.6, 0.8, 1.0, 1.3), (0.35, 0.6, 1.0, 2.0))]
    def score(p):
        per = {s.name: evaluate_pair(lab, instances_from_maps(prob, hv, s.mpp, p)[0]) for s, lab, prob, hv in cache}
        res = aggregate(per)
        return res["aji"] + res["pq"], res

    for kw in grid:
        p = PostprocessParams(**kw)
        sc, res = score(p)
        if sc > best_score:
            best, best_score, best_res = p, sc, res
    # then the minimum instance score at the best thresholds (0 = keep every instance)
    for ms in MIN_SCORE_GRID[1:]:
        p = replace(best, min_score=ms)
        sc, res = score(p)
        if sc > best_score:
            best, best_score, best_res = p, sc, res
    model.train()
    return best, best_res


def base_metadata(cfg: TrainConfig, arch_mode="lite") -> dict:
    from .. import __version__
    from ..model.cellsam import PIXEL_MEAN, PIXEL_STD

    return {"mpp": cfg.mpp, "input": "RGB uint8 0..255 normalised with SAM pixel mean/std",
            "pixel_mean": list(PIXEL_MEAN), "pixel_std": list(PIXEL_STD), "version": __version__,
            "mode": arch_mode, "postprocess": PostprocessParams().to_dict(), "teacher": None,
            "train_config": asdict(cfg)}


def start_run(data: str, out, cfg: TrainConfig):
    """Common start of ``train`` and ``train_joint``: the run directory ``OUT.run/``, threads and
    seed, the prepared tiles. Returns ``(out Path, run dir, train tiles, val samples, sampling
    weights)``; InputError without training tiles."""
    out = Path(out)
    run = out.with_name(out.name + ".run")
    run.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    train_data, val_samples = load_data(data, cfg.mpp)
    if not train_data:
        raise InputError(f"{data}: no training tiles")
    return out, run, train_data, val_samples, sampling_weights(train_data)


def train(data: str, out, *, init=None, cfg: TrainConfig = TrainConfig(), tune: bool = True,
          resume_state=None) -> dict:
    """Train (or resume, or fine-tune from ``init``) and write the final checkpoint to ``out``.

    ``resume_state``: path of the compact resume file (written every epoch, resumed from, deleted at
    the end; see :mod:`pipeline.training.loop`)."""
    out, run, train_data, val_samples, weights = start_run(data, out, cfg)

    if init is not None:
        model, meta0 = load_checkpoint(init)
        # fine-tuning moves the embedding the type head reads: an inherited head would be stale, so
        # it is dropped (no classes, "Nucleus") until a head is fitted for the data's own classes
        model.arch.pop("type_head", None)
        model.type_head = None
        model = grown(with_distance_head(model), cfg.grow_depth).train()
        metadata = {**base_metadata(cfg), **{k: v for k, v in meta0.items() if k in ("postprocess", "mpp")}}
        from ..model.checkpoint import init_identity

        metadata.update(init_identity(init))  # file name + sha256, never a machine path
    else:
        model = grown(CellSAM(DEFAULT_ARCH), cfg.grow_depth).train()
        metadata = base_metadata(cfg)
    model = model.to(memory_format=torch.channels_last)
    params = [p for n, p in model.named_parameters() if not n.startswith("teacher.") and p.requires_grad]
    opt, sched = optimizer_and_schedule(params, cfg)
    ema = WeightEMA(model, cfg.ema) if cfg.ema else None
    got = restore_run(run, model, opt, sched, ema=ema, resume_state=resume_state, seed=cfg.seed)
    scored = model if ema is None else ema.model
    start_epoch = 0 if got is None else got["epoch"] + 1
    best_score = -1.0 if got is None else got["best_score"]
    for epoch in range(start_epoch, cfg.epochs):
        rng = np.random.default_rng([cfg.seed, epoch])
        torch.manual_seed(cfg.seed * 100003 + epoch)
        t0 = time.time()
        sums: dict = {}
        for it in range(cfg.iters_per_epoch):
            x, fg, hv = make_batch(rng, train_data, weights, cfg)
            out_maps = model(x)["maps"]
            optimizer_step(losses(out_maps, fg, hv), opt, sched, params, sums)
            if ema is not None:
                ema.update(model)
            if cfg.log_every and (it + 1) % cfg.log_every == 0:
                log.info("epoch %d iter %d/%d loss %.4f (%.1f s)", epoch, it + 1, cfg.iters_per_epoch,
                         sums["loss"] / (it + 1), time.time() - t0)
        row = {"epoch": epoch, "lr": opt.param_groups[0]["lr"], "train_s": round(time.time() - t0, 1)}
        row.update({k: round(v / cfg.iters_per_epoch, 5) for k, v in sums.items()})
        if val_samples:
            scored.eval()
            res = evaluate_model(scored, metadata, val_samples, PostprocessParams.from_dict(metadata["postprocess"]))
            row.update({f"val_{k}": round(res[k], 4) for k in ("aji", "pq", "dice", "pixel_precision", "pixel_recall")})
            score = res["aji"] + res["pq"]
            if score > best_score:
                best_score = score
                save_checkpoint(run / "best.pt", scored, {**metadata, "epoch": epoch})
        end_epoch(run, model, metadata, opt, sched, epoch, row, seed=cfg.seed, ema=ema, best_score=best_score,
                  resume_state=resume_state)
        log.info("epoch %d %s", epoch, row)
        if epoch + 1 < cfg.epochs:
            from ..testhooks import pause_point

            pause_point("train")  # crash tests only (pipeline.testhooks)
    # final: best (or last) weights, decoding thresholds tuned on validation
    if (run / "best.pt").exists():
        model, meta = load_checkpoint(run / "best.pt")
    else:
        model, meta = scored.eval(), {}
    final_meta = {**metadata, **{k: v for k, v in meta.items() if k == "epoch"}}
    if val_samples and tune:
        best_p, res = tune_postprocess(model, final_meta, val_samples)
        final_meta["postprocess"] = best_p.to_dict()
        final_meta["validation"] = {k: round(float(v), 4) for k, v in res.items() if isinstance(v, float)}
    save_checkpoint(out, model, final_meta)
    finish_run(run, out, resume_state)
    return final_meta
