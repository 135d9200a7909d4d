"""Joint fine-tuning: instance masks + nucleus-centre points + hand-drawn negatives (+ a type signal).

``cellsam train --points DIR [--negatives GEOJSON] --init CKPT`` (:func:`train_joint`) continues
a lite checkpoint on three kinds of crop in every batch:

* **instance tiles** (MoNuSeg/CPM, :func:`pipeline.training.train.load_data`): the losses of
  :func:`pipeline.training.train.losses`, unchanged;
* **point tiles** (CRCHisto: nucleus centre points, most of them typed): no masks, so the targets
  are the *teacher's* soft maps (output distillation, :func:`teacher_maps`), corrected by the points:

  - only with ``point_negatives`` (off by default: CRCHisto does not mark every nucleus, see
    :func:`point_targets`): a teacher instance that no point touches and whose centroid lies
    farther than ``neg_radius_um`` from every point is a hard negative (targets 0 over its mask
    dilated by 1 px, weight ``neg_weight``);
  - a point that no teacher instance reaches is a **missed nucleus**: a disc of ``pos_radius_um``
    around it gets foreground 1 and a distance cone peaking at the point, weight ``pos_weight``;
  - everything else: the teacher's soft foreground and distance maps, weight 1;
  - typed points also supervise an auxiliary linear classifier on the stride-16 embedding (the
    feature the type head pools; the classifier itself is not kept), so the embedding learns to
    tell the classes apart;

* **slide tissue with negative regions** (optional; GeoJSON polygons in level-0 pixels of a slide,
  drawn by hand over keratin, hair shafts, debris...): foreground and distance 0 inside; outside,
  the teacher's soft maps (distillation on unlabelled slide tissue, which keeps the real nuclei
  next to the negatives).

The **teacher** is the starting checkpoint itself under the 8 dihedral transforms (test-time
augmentation ensemble, evaluated once per tile before training): slower by 8x and smoother, never
run at inference. Validation each epoch: MoNuSeg/CPM AJI + PQ and the held-out CRCHisto
detection F1 (3.3 µm matching); ``best.pt`` maximises their sum. The run is resumable and logged
per epoch like ``cellsam train`` (``OUT.run/``), and the final checkpoint gets a freshly fitted type
head (:mod:`pipeline.training.typehead`) and the decoding thresholds re-tuned on the validation
split.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from ..config import TrainConfig
from ..data.augment import colour, dihedral, random_crop
from ..errors import InputError
from ..model.checkpoint import init_identity, load_checkpoint, save_checkpoint
from ..model.postprocess import PostprocessParams, instances_from_maps
from ..model.segmenter import Segmenter
from .loop import (WeightEMA, end_epoch, finish_run, optimizer_and_schedule, optimizer_step, restore_run,
                   sampling_weights)
from .train import base_metadata, evaluate_model, losses, start_run, tune_postprocess
from .typehead import CRCHISTO_MPP, CRCHISTO_VAL_TILES, REJECT, centroids_xy, match_targets

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JointConfig:
    """Weights and radii of :func:`train_joint` (the rest comes from :class:`TrainConfig`)."""

    point_crops: int = 3  # point-tile crops per batch (the rest of the batch: instance tiles)
    region_crops: int = 1  # negative-region crops per batch (0 without regions)
    point_negatives: bool = False  # teacher instances no point touches -> 0 (off: see point_targets)
    neg_radius_um: float = 4.0
    neg_weight: float = 3.0
    pos_radius_um: float = 2.0
    pos_weight: float = 2.0
    type_weight: float = 0.3
    n_types: int = 4
    feature_weight: float = 0.0  # feature distillation: the starting model's stride-16 embedding, every crop


# --------------------------------------------------------------------------------------------------
# teacher: the starting model under the 8 dihedral transforms


def _d4(x: np.ndarray, k: int) -> np.ndarray:
    """Dihedral transform ``k`` (0..7) of the last two axes: ``k & 4`` transposes, then ``k & 3``
    quarter turns."""
    if k & 4:
        x = np.swapaxes(x, -1, -2)
    return np.rot90(x, k & 3, axes=(-2, -1))


def _d4_inv(x: np.ndarray, k: int) -> np.ndarray:
    x = np.rot90(x, -(k & 3), axes=(-2, -1))
    if k & 4:
        x = np.swapaxes(x, -1, -2)
    return x


def teacher_maps(seg: Segmenter, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean foreground probability and distance map of ``seg`` over the 8 dihedral transforms.

    ``image``: uint8 (H, W, 3) at the model's µm/px. Returns two float32 (H, W) arrays."""
    chw = np.ascontiguousarray(image.transpose(2, 0, 1))
    prob = np.zeros(image.shape[:2], np.float64)
    dist = np.zeros(image.shape[:2], np.float64)
    for k in range(8):
        im = np.ascontiguousarray(_d4(chw, k).transpose(1, 2, 0))
        out = seg.forward(im[None])
        prob += _d4_inv(out["prob"][0], k)
        dist += _d4_inv(out["hv"][0][2], k)
    return (prob / 8).astype(np.float32), (dist / 8).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# point tiles


def point_targets(prob, dist, points_xy, points_class, mpp: float, params: PostprocessParams,
                  cfg: JointConfig = JointConfig()) -> dict:
    """Corrected soft targets of one point tile (see the module docstring).

    Parameters
    ----------
    prob, dist : ndarray of shape (H, W), float32
        Teacher foreground probability and distance map at ``mpp``.
    points_xy : ndarray of shape (N, 2), float
        Nucleus centres (x = column, y = row) in pixels at ``mpp``.
    points_class : ndarray of shape (N,), int
        Class index per point, < 0 for unlabelled.

    Hard negatives are **off** by default (``cfg.point_negatives``): CRCHisto does not mark every
    nucleus (dense lymphoid and stromal areas are sampled), so most "untouched" teacher instances
    there are real, unmarked nuclei, and a student trained to erase them learnt to erase dark
    nuclei everywhere (measured: docs/model.md, "Joint training").

    Returns
    -------
    dict with ``fg``, ``dist``, ``weight`` float32 (H, W), ``types`` int64 (H, W) (class index at
    the pixel of each typed point, -1 elsewhere) and ``n_neg`` / ``n_missed`` counts.
    """
    lab, _ = instances_from_maps(prob, dist[None].repeat(3, 0), mpp, params)
    fg_t, dist_t = prob.copy(), dist.copy()
    weight = np.ones(prob.shape, np.float32)
    h, w = prob.shape
    pts = np.asarray(points_xy, np.float64).reshape(-1, 2)
    target = match_targets(lab, pts, np.where(np.asarray(points_class) >= 0, points_class, -1),
                           3.3 / mpp)
    n_neg = 0
    if lab.max():
        cen = centroids_xy(lab)
        far = np.ones(len(cen), bool)
        if len(pts):
            d = np.hypot(cen[:, None, 0] - pts[None, :, 0], cen[:, None, 1] - pts[None, :, 1]).min(1)
            far = d > cfg.neg_radius_um / mpp
        neg = (target == REJECT) & far & bool(cfg.point_negatives)
        n_neg = int(neg.sum())
        if n_neg:
            lut = np.zeros(len(neg) + 1, bool)
            lut[1:] = neg
            m = ndi.binary_dilation(lut[lab], iterations=1)
            fg_t[m], dist_t[m], weight[m] = 0.0, 0.0, cfg.neg_weight
    # points no instance reaches
    n_missed = 0
    r = cfg.pos_radius_um / mpp
    rr, cc = np.mgrid[-int(np.ceil(r)):int(np.ceil(r)) + 1, -int(np.ceil(r)):int(np.ceil(r)) + 1]
    disc = np.hypot(rr, cc) <= r
    cone = np.clip(1 - np.hypot(rr, cc) / max(r, 1e-6), 0, 1)
    for x, y in pts:
        yi, xi = int(round(y)), int(round(x))
        if not (0 <= yi < h and 0 <= xi < w) or lab[yi, xi]:
            continue
        n_missed += 1
        ys, xs = rr[disc] + yi, cc[disc] + xi
        ok = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
        ys, xs = ys[ok], xs[ok]
        fg_t[ys, xs] = 1.0
        dist_t[ys, xs] = np.maximum(dist_t[ys, xs], cone[disc][ok])
        weight[ys, xs] = cfg.pos_weight
    types = np.full(prob.shape, -1, np.int64)
    for (x, y), c in zip(pts, points_class):
        yi, xi = int(round(y)), int(round(x))
        if c >= 0 and 0 <= yi < h and 0 <= xi < w:
            types[yi, xi] = int(c)
    return {"fg": fg_t, "dist": dist_t, "weight": weight, "types": types, "n_neg": n_neg, "n_missed": n_missed}


def load_point_tiles(root, seg: Segmenter, vocab, tiles, mpp: float, cfg: JointConfig) -> list[dict]:
    """CRCHisto-style tiles (``root/images/<t>.png`` + ``root/points/<t>.csv``) resampled to
    ``mpp`` with their corrected teacher targets (:func:`point_targets`)."""
    from ..data.classes import read_point_csv
    from ..data.datasets import resample_pair
    from ..data.readers import read_image

    root = Path(root)
    out = []
    for name in tiles:
        img = read_image(root / "images" / f"{name}.png")
        pts = read_point_csv(root / "points" / f"{name}.csv")
        f = CRCHISTO_MPP / mpp
        img, _ = resample_pair(img, np.zeros(img.shape[:2], np.uint32), f)
        xy = (np.asarray(pts.xy_px, np.float64) + 0.5) * f - 0.5
        prob, dist = teacher_maps(seg, img)
        t = point_targets(prob, dist, xy, pts.encode(vocab), mpp, seg.params, cfg)
        out.append({"name": name, "image": img, **t})
    return out


# --------------------------------------------------------------------------------------------------
# negative regions on slides


def load_negative_regions(path, data_root, mpp: float, teacher: Segmenter | None = None,
                          neg_weight: float = 3.0, margin_um: float = 256.0) -> list[dict]:
    """Slide tissue around hand-drawn negative regions, with targets.

    ``path``: a GeoJSON FeatureCollection of polygons in level-0 pixels, each with
    ``properties.slide`` = the slide's path relative to ``data_root``. Per slide, the bounding box
    of its polygons grown by ``margin_um`` is read at ``mpp``; inside the polygons the foreground
    and distance targets are 0 (weight ``neg_weight``); outside they are the ``teacher``'s soft
    maps (weight 1: output distillation on unlabelled tissue, which keeps the real nuclei next to
    the negatives), or ignored (weight 0) without a teacher.

    Returns
    -------
    list of dict, one per slide: ``image`` uint8 (h, w, 3), ``fg``, ``dist``, ``weight`` float32
    (h, w), ``mask`` bool (h, w) (inside a polygon).
    """
    from ..data.datasets import resample_pair
    from ..data.regions import read_negative_regions

    out = []
    for r in read_negative_regions(path, data_root, margin_um):
        img, m2 = resample_pair(r["image"], r["mask"].astype(np.uint32), r["mpp"] / mpp)
        mask = m2 > 0
        if teacher is not None:
            fg, dist = teacher_maps(teacher, img)
            weight = np.ones(mask.shape, np.float32)
        else:
            fg, dist = np.zeros(mask.shape, np.float32), np.zeros(mask.shape, np.float32)
            weight = np.zeros(mask.shape, np.float32)
        fg[mask], dist[mask], weight[mask] = 0.0, 0.0, neg_weight
        out.append({"name": r["name"], "image": img, "fg": fg, "dist": dist, "weight": weight, "mask": mask})
    return out


# --------------------------------------------------------------------------------------------------
# batches and losses


def _crop_weak(rng, image, fields: np.ndarray, crop: int, strength: float):
    """Random crop + dihedral + colour of an image and its (C, H, W) scalar target fields."""
    lab = np.zeros(image.shape[:2], np.uint32)
    img, _, fl = random_crop(rng, image, lab, fields, crop)
    # dihedral() treats channels 0/1 as H/V vectors: pad two dummy channels so every field is scalar
    pad = np.concatenate([np.zeros((2,) + fl.shape[1:], fl.dtype), fl], 0)
    img, _, pad = dihedral(rng, img, np.zeros(img.shape[:2], np.uint32), pad)
    return colour(rng, img, strength), pad[2:]


def weak_batch(rng, point_tiles, regions, jcfg: JointConfig, cfg: TrainConfig):
    """Images (N, 3, H, W) float and targets: fg, dist, weight (N, H, W) float, types (N, H, W) long."""
    imgs, fgs, dists, ws, tys = [], [], [], [], []
    pw = sampling_weights([{"labels": t["fg"]} for t in point_tiles]) if point_tiles else None
    for _ in range(jcfg.point_crops if point_tiles else 0):
        t = point_tiles[int(rng.choice(len(point_tiles), p=pw))]
        fields = np.stack([t["fg"], t["dist"], t["weight"], t["types"].astype(np.float32)])
        img, fl = _crop_weak(rng, t["image"], fields, cfg.crop_px, cfg.aug_strength)
        imgs.append(img)
        fgs.append(fl[0])
        dists.append(fl[1])
        ws.append(fl[2])
        tys.append(np.rint(fl[3]))
    for _ in range(jcfg.region_crops if regions else 0):
        r = regions[int(rng.integers(len(regions)))]
        h, w = r["mask"].shape
        c = cfg.crop_px
        if rng.random() < 0.5:  # centred on a negative pixel, else anywhere in the tissue around
            ys, xs = np.nonzero(r["mask"])
            j = int(rng.integers(len(ys)))
            y0 = int(np.clip(ys[j] - c // 2 + rng.integers(-c // 4, c // 4 + 1), 0, max(0, h - c)))
            x0 = int(np.clip(xs[j] - c // 2 + rng.integers(-c // 4, c // 4 + 1), 0, max(0, w - c)))
        else:
            y0, x0 = int(rng.integers(0, max(1, h - c + 1))), int(rng.integers(0, max(1, w - c + 1)))
        sl = (slice(y0, y0 + c), slice(x0, x0 + c))
        fields = np.stack([r["fg"][sl], r["dist"][sl], r["weight"][sl]])
        img = r["image"][sl]
        pad = np.concatenate([np.zeros((2,) + fields.shape[1:], np.float32), fields], 0)
        img, _, pad = dihedral(rng, img, np.zeros(img.shape[:2], np.uint32), pad)
        imgs.append(colour(rng, img, cfg.aug_strength))
        fgs.append(pad[2])
        dists.append(pad[3])
        ws.append(pad[4])
        tys.append(np.full_like(pad[2], -1))
    if not imgs:
        return None
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float().contiguous(memory_format=torch.channels_last)
    st = lambda a: torch.from_numpy(np.ascontiguousarray(np.stack(a), np.float32))  # noqa: E731
    return x, st(fgs), st(dists), st(ws), torch.from_numpy(np.stack(tys).astype(np.int64))


def weak_losses(out: dict, fg, dist, weight, types, type_clf, jcfg: JointConfig) -> dict:
    """Weighted soft-target BCE on the foreground and distance logits, plus the auxiliary type CE
    at typed points (embedding sampled at the point's pixel)."""
    maps = out["maps"]
    norm = weight.sum().clamp_min(1.0)
    bce = (F.binary_cross_entropy_with_logits(maps[:, 0], fg, reduction="none") * weight).sum() / norm
    dl = (F.binary_cross_entropy_with_logits(maps[:, 3], dist, reduction="none") * weight).sum() / norm
    res = {"w_bce": bce, "w_dist": dl}
    total = bce + 2 * dl
    idx = torch.nonzero(types >= 0)
    if len(idx) and type_clf is not None:
        emb = out["embed"]
        n, _, eh, ew = emb.shape
        h, w = types.shape[1:]
        gx = (idx[:, 2].float() + 0.5) / w * 2 - 1
        gy = (idx[:, 1].float() + 0.5) / h * 2 - 1
        grid = torch.stack([gx, gy], 1)
        feats = []
        for b in range(n):
            sel = idx[:, 0] == b
            if sel.any():
                g = grid[sel][None, None]  # (1, 1, P, 2)
                feats.append(F.grid_sample(emb[b:b + 1], g, align_corners=False)[0, :, 0].T)
        f = torch.cat(feats)
        y = types[idx[:, 0], idx[:, 1], idx[:, 2]]
        ce = F.cross_entropy(type_clf(f), y)
        res["type_ce"] = ce
        total = total + jcfg.type_weight * ce
    res["weak"] = total
    return res


def feature_teacher(model) -> torch.nn.Module:
    """A frozen copy of the starting model (eval mode, no gradients): the teacher of feature
    distillation."""
    import copy

    t = copy.deepcopy(model).eval()
    for p in t.parameters():
        p.requires_grad_(False)
    return t


def feature_loss(embed: torch.Tensor, teacher: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Feature distillation: squared error between the student's stride-16 embedding ``embed``
    (N, D, h, w) and the teacher's on the same crops ``x``, relative to the teacher's mean square
    (a scale-free number: 1.0 = as far as a zero embedding)."""
    with torch.no_grad():
        t = teacher(x)["embed"]
    return (embed - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-8)


# --------------------------------------------------------------------------------------------------
# validation


def point_detection(seg: Segmenter, val_tiles: list[dict], mpp: float) -> dict:
    """Detection precision / recall / F1 of ``seg`` on held-out point tiles (3.3 µm matching)."""
    from ..metrics import aggregate_point_counts, point_counts, point_scores

    rows = []
    for t in val_tiles:
        lab = seg.segment(t["image"], mpp)[0]  # (labels, scores[, class probabilities])
        cen = centroids_xy(lab) if lab.max() else np.zeros((0, 2))
        rows.append(point_counts(t["points_xy"], cen, 3.3 / mpp))
    return point_scores(aggregate_point_counts(rows))


def load_point_val(root, tiles, mpp: float) -> list[dict]:
    from ..data.classes import read_point_csv
    from ..data.readers import read_image

    root = Path(root)
    out = []
    for name in tiles:
        pts = read_point_csv(root / "points" / f"{name}.csv")
        out.append({"name": name, "image": read_image(root / "images" / f"{name}.png"),
                    "points_xy": np.asarray(pts.xy_px, np.float64)})
    return out


# --------------------------------------------------------------------------------------------------
# the run


def _train_mode(model) -> None:
    """Training mode with the BatchNorm statistics frozen (a fine-tune on mixed crops: small
    batches of very different tissue would otherwise drag the running statistics around)."""
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def train_joint(data: str, points: str, out, *, init, regions=None, regions_root=None, cfg: TrainConfig = TrainConfig(),
                jcfg: JointConfig = JointConfig(), resume_state=None, fit_types: bool = True,
                tune: bool = True, max_point_tiles: int = 0) -> dict:
    """Fine-tune ``init`` jointly (see the module docstring) and write the checkpoint to ``out``.

    ``points``: a folder ``images/<tile>.png`` + ``points/<tile>.csv`` (``x_px,y_px,class``, at
    0.55 µm/px like CRCHisto); its tiles named in ``CRCHISTO_VAL_TILES`` are held out for
    validation. ``regions``: negative-region GeoJSON (:func:`load_negative_regions`), slides
    relative to ``regions_root`` (default: the parent of ``data``). With ``fit_types`` the output
    carries a type head fitted on the point tiles' classes (rejection off)."""
    from ..data.classes import ClassVocabulary, read_point_csv, vocabulary_from_data

    out, run, train_data, val_samples, weights = start_run(data, out, cfg)
    model, meta0 = load_checkpoint(init)
    if model.arch["decoder"].get("out", 3) < 4:
        raise InputError(f"{init}: joint training needs a checkpoint with a distance head")
    teacher = Segmenter(model, meta0, device="cpu", engine="torch")
    proot = Path(points)
    names = sorted((p.stem for p in (proot / "images").glob("*.png")), key=lambda s: (len(s), s))
    if not names:
        raise InputError(f"{proot}: no point tiles (images/*.png + points/*.csv)")
    found = {c for n in names for c in read_point_csv(proot / "points" / f"{n}.csv").class_name if c}
    vocab = ClassVocabulary.crchisto()
    try:
        vocab.encode(sorted(found))
    except InputError:  # not CRCHisto's classes: the data's own
        vocab = vocabulary_from_data(sorted(found))
    jcfg = JointConfig(**{**asdict(jcfg), "n_types": len(vocab)})
    tr_names = [n for n in names if n not in CRCHISTO_VAL_TILES]
    va_names = [n for n in names if n in CRCHISTO_VAL_TILES]
    if max_point_tiles:
        tr_names, va_names = tr_names[:max_point_tiles], va_names[:max_point_tiles]
    t0 = time.time()
    point_tiles = load_point_tiles(proot, teacher, vocab, tr_names, cfg.mpp, jcfg)
    log.info("teacher targets for %d point tiles in %.0f s: %d hard negatives, %d missed points",
             len(point_tiles), time.time() - t0, sum(t["n_neg"] for t in point_tiles),
             sum(t["n_missed"] for t in point_tiles))
    point_val = load_point_val(proot, va_names, cfg.mpp)
    reg = (load_negative_regions(regions, regions_root or Path(data).parent, cfg.mpp, teacher, jcfg.neg_weight)
           if regions else [])
    model.arch.pop("type_head", None)
    model.type_head = None
    model = model.to(memory_format=torch.channels_last)
    anchor = feature_teacher(model) if jcfg.feature_weight > 0 else None
    _train_mode(model)
    type_clf = torch.nn.Linear(model.arch.get("embed_dim", 256), jcfg.n_types)
    torch.manual_seed(cfg.seed)
    type_clf.reset_parameters()
    params = [p for n, p in model.named_parameters() if not n.startswith("teacher.") and p.requires_grad]
    opt, sched = optimizer_and_schedule(params + list(type_clf.parameters()), cfg)
    metadata = {**base_metadata(cfg), **{k: v for k, v in meta0.items() if k in ("postprocess", "mpp")},
                **init_identity(init), "joint_config": asdict(jcfg)}
    ema = WeightEMA(model, cfg.ema) if cfg.ema else None
    got = restore_run(run, model, opt, sched, ema=ema, resume_state=resume_state, seed=cfg.seed)
    clf_path = run / "type_clf.pt"
    if got is not None and clf_path.exists():
        type_clf.load_state_dict(torch.load(clf_path, weights_only=True))
    scored = model if ema is None else ema.model
    start = 0 if got is None else got["epoch"] + 1
    best_score = -1.0 if got is None else got["best_score"]
    n_full = max(1, cfg.batch_size - (jcfg.point_crops if point_tiles else 0) - (jcfg.region_crops if reg else 0))
    full_cfg = TrainConfig(**{**asdict(cfg), "batch_size": n_full})
    from .train import make_batch

    for epoch in range(start, cfg.epochs):
        rng = np.random.default_rng([cfg.seed, epoch])
        torch.manual_seed(cfg.seed * 100003 + epoch)
        t0 = time.time()
        sums: dict = {}
        for it in range(cfg.iters_per_epoch):
            x, fg, hv = make_batch(rng, train_data, weights, full_cfg)
            wb = weak_batch(rng, point_tiles, reg, jcfg, cfg)
            xs = x if wb is None else torch.cat([x, wb[0]]).contiguous(memory_format=torch.channels_last)
            o = model(xs)
            ls = losses(o["maps"][:n_full], fg, hv)
            if wb is not None:
                wo = {"maps": o["maps"][n_full:], "embed": o["embed"][n_full:]}
                wl = weak_losses(wo, *wb[1:], type_clf, jcfg)
                ls = {**ls, **wl, "loss": ls["loss"] + wl["weak"]}
            if anchor is not None:
                fd = feature_loss(o["embed"], anchor, xs)
                ls = {**ls, "feat": fd, "loss": ls["loss"] + jcfg.feature_weight * fd}
            optimizer_step(ls, opt, sched, params, sums)
            if ema is not None:
                ema.update(model)
            if cfg.log_every and (it + 1) % cfg.log_every == 0:
                log.info("epoch %d iter %d/%d loss %.4f (%.1f s)", epoch, it + 1, cfg.iters_per_epoch,
                         sums["loss"] / (it + 1), time.time() - t0)
        row = {"epoch": epoch, "lr": opt.param_groups[0]["lr"], "train_s": round(time.time() - t0, 1)}
        row.update({k: round(v / cfg.iters_per_epoch, 5) for k, v in sums.items()})
        scored.eval()
        res = evaluate_model(scored, metadata, val_samples, PostprocessParams.from_dict(metadata["postprocess"]))
        row.update({f"val_{k}": round(res[k], 4) for k in ("aji", "pq", "dice", "pixel_precision", "pixel_recall")})
        scored.eval()
        det = point_detection(Segmenter(scored, metadata, device="cpu", engine="torch"), point_val, CRCHISTO_MPP)
        _train_mode(model)
        row.update({"val_det_p": round(det["precision"], 4), "val_det_r": round(det["recall"], 4),
                    "val_det_f1": round(det["f1"], 4)})
        score = res["aji"] + res["pq"] + det["f1"]
        if score > best_score:
            best_score = score
            save_checkpoint(run / "best.pt", scored, {**metadata, "epoch": epoch})
        torch.save(type_clf.state_dict(), clf_path)
        end_epoch(run, model, metadata, opt, sched, epoch, row, seed=cfg.seed, ema=ema, best_score=best_score,
                  resume_state=resume_state)
        log.info("epoch %d %s", epoch, row)
    model, meta = load_checkpoint(run / "best.pt")
    final_meta = {**metadata, "epoch": meta.get("epoch")}
    if tune and val_samples:
        best_p, res = tune_postprocess(model, final_meta, val_samples)
        final_meta["postprocess"] = best_p.to_dict()
        final_meta["validation"] = {k: round(float(v), 4) for k, v in res.items() if isinstance(v, float)}
    if fit_types:
        from .typehead import crchisto_examples, fit_head, stage2_radii_for, with_type_head

        seg = Segmenter(model, final_meta, device="cpu", engine="torch")
        examples = crchisto_examples(seg, proot, vocab, tr_names)
        head = fit_head(examples, vocab.names, reject=True, colors=vocab.colors,
                        stage2_radii_um=stage2_radii_for(examples))
        head.cfg["reject_threshold"] = None  # rejection off: it costs segmentation quality elsewhere
        model = with_type_head(model, head)
        final_meta["type_head_training"] = {"data": proot.name, "tiles": len(tr_names), "val_tiles": va_names}
    save_checkpoint(out, model, final_meta)
    finish_run(run, out, resume_state)
    return final_meta
