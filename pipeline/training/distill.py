"""Knowledge distillation of the SAM teacher into the CellSAM student, and dual-mode training.

``distill`` (the default): the student encoder (stem, stages, neck) learns to reproduce the frozen
SAM ViT teacher's 256-d stride-16 image embedding. Loss per crop, averaged over the grid::

    L = MSE(s, t) + (1 - cos(s, t))        # cos over the 256 channels of each grid position

The teacher is slow, so it runs once per crop: every training tile (at the model's µm/px) is cut
into a fixed, deterministic grid of ``crop_px`` crops (step ``crop_px``, the last row/column aligned
to the tile edge; tiles smaller than a crop are padded with white) and the teacher embeddings are
cached in a zarr store (``--cache``, default ``OUT.run/teacher.zarr``; one group per teacher
identity / µm/px / crop size, one ``float32 (256, crop/16, crop/16)`` array per ``<tile>__r<row>_c<col>``
crop, marked ``complete`` once written, so an interrupted fill resumes). Augmentation is limited to
the 8 dihedral transforms (``dihedral``), applied to the crop and, as the same permutation of grid
cells, to the cached teacher embedding (crops are multiples of 16 px, so the transform maps grid
cells onto grid cells exactly). This assumes the teacher is equivariant to these transforms, which
SAM is only approximately; ``dihedral=False`` trains on the exact targets. No colour augmentation
(it would change the teacher's answer). The dense heads are not trained here: fine-tune them
afterwards with ``cellsam train --init``.

``dual``: the teacher is attached, a gated fusion (:class:`pipeline.model.cellsam.GatedFusion`) is
added, and the fusion gate + dense decoder are trained with the supervised losses of
:mod:`pipeline.training.train` (student frozen; teacher runs on every batch, GPU recommended).

``refiner``: see :mod:`pipeline.training.refine_train`.

All modes are resumable: ``OUT.run/last.pt`` (model + optimiser + scheduler + epoch) is written
atomically after every epoch and ``OUT.run/log.csv`` gets one row per epoch.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..model.cellsam import DEFAULT_ARCH, PIXEL_MEAN, PIXEL_STD, CellSAM, GatedFusion
from ..model.checkpoint import load_checkpoint
from ..model.student import EMBED_STRIDE
from .loop import fit, sampling_weights, train_only

log = logging.getLogger(__name__)


from ..config import DistillConfig  # noqa: E402,F401  (defaults live in pipeline/config.py)


# --------------------------------------------------------------------------------------------------
# data: fixed crops and the teacher cache


def crop_grid(shape_hw: tuple[int, int], crop_px: int) -> list[tuple[int, int]]:
    """Top-left corners ``(row, col)`` of the fixed crops of a tile (step ``crop_px``; last crop
    aligned to the far edge; a single crop at 0 along an axis shorter than ``crop_px``)."""

    def axis(n):
        if n <= crop_px:
            return [0]
        pos = list(range(0, n - crop_px + 1, crop_px))
        if pos[-1] != n - crop_px:
            pos.append(n - crop_px)
        return pos

    return [(r, c) for r in axis(shape_hw[0]) for c in axis(shape_hw[1])]


def cut_crop(image: np.ndarray, r: int, c: int, crop_px: int) -> np.ndarray:
    """``uint8 (crop_px, crop_px, 3)`` crop at (r, c), padded with white beyond the tile."""
    sub = image[r:r + crop_px, c:c + crop_px]
    if sub.shape[:2] != (crop_px, crop_px):
        sub = np.pad(sub, ((0, crop_px - sub.shape[0]), (0, crop_px - sub.shape[1]), (0, 0)), constant_values=255)
    return np.ascontiguousarray(sub)


def load_crops(data, cfg: DistillConfig) -> list[dict]:
    """Fixed crops of the training tiles of ``data`` (see :func:`pipeline.training.train.load_data`): dicts with
    ``key`` (``<tile>__r<row>_c<col>``) and ``image`` uint8 (crop, crop, 3)."""
    from .train import training_tiles

    if cfg.crop_px % EMBED_STRIDE:
        raise InputError(f"crop_px must be a multiple of {EMBED_STRIDE}, got {cfg.crop_px}")
    tiles = training_tiles(data, cfg.mpp, cfg.max_tiles)
    crops = []
    for t in tiles:
        name = re.sub(r"[^A-Za-z0-9._-]", "_", t["name"])
        for r, c in crop_grid(t["image"].shape[:2], cfg.crop_px):
            crops.append({"key": f"{name}__r{r}_c{c}", "image": cut_crop(t["image"], r, c, cfg.crop_px)})
    return crops


class TeacherCache:
    """Teacher embeddings on disk (zarr v3): ``<root>/<teacher>_<sha256[:16]>/mpp<mpp>_crop<px>_tile<px>/<key>``,
    each a ``float32 (256, crop/16, crop/16)`` array whose ``complete`` attribute is set last (the
    teacher's crop size ``tile_px`` fixes its scale, so it is part of the key)."""

    def __init__(self, root, teacher_info: dict, mpp: float, crop_px: int) -> None:
        import zarr

        self.root = Path(root)
        try:
            top = zarr.open_group(str(self.root), mode="a")
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"{self.root}: cannot open the teacher cache ({exc})") from None
        top.attrs["schema"] = "cellsam-teacher-cache"
        top.attrs["schema_version"] = 2
        ident = str(teacher_info.get("sha256") or teacher_info["bytes"])[:16]
        tkey = f"{teacher_info['type']}_{ident}"
        tile = int(teacher_info.get("tile_px", 0))
        self.group = top.require_group(tkey).require_group(f"mpp{mpp:g}_crop{crop_px}_tile{tile}")
        self.group.attrs["teacher"] = teacher_info
        self.grid = crop_px // EMBED_STRIDE

    def has(self, key: str) -> bool:
        try:
            return bool(self.group[key].attrs.get("complete", False))
        except KeyError:
            return False

    def put(self, key: str, emb: np.ndarray) -> None:
        arr = self.group.create_array(key, shape=emb.shape, dtype="float32", chunks=emb.shape, overwrite=True)
        arr[...] = emb.astype(np.float32)
        arr.attrs["complete"] = True

    def get(self, key: str) -> np.ndarray:
        return np.asarray(self.group[key][...], dtype=np.float32)


def fill_cache(cache: TeacherCache, teacher, crops: list[dict], device: torch.device, batch: int = 4) -> int:
    """Compute the missing teacher embeddings; returns how many were computed."""
    todo = [c for c in crops if not cache.has(c["key"])]
    if not todo:
        return 0
    mean = torch.tensor(PIXEL_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD, device=device).view(1, 3, 1, 1)
    teacher = teacher.to(device)
    t0 = time.time()
    for i in range(0, len(todo), batch):
        part = todo[i:i + batch]
        x = torch.from_numpy(np.stack([c["image"] for c in part])).to(device).permute(0, 3, 1, 2).float()
        with torch.inference_mode():
            emb = teacher((x - mean) / std).float().cpu().numpy()
        for c, e in zip(part, emb):
            cache.put(c["key"], e)
        log.info("teacher cache: %d/%d crops (%.1f s)", min(i + batch, len(todo)), len(todo), time.time() - t0)
    return len(todo)


def dihedral_pair(img: np.ndarray, emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Apply dihedral element ``k`` (bit 0 transpose, bit 1 flip rows, bit 2 flip cols) to an image
    ``(H, W, 3)`` and, identically, to its embedding grid ``(256, H/16, W/16)``."""
    if k & 1:
        img, emb = img.transpose(1, 0, 2), emb.transpose(0, 2, 1)
    if k & 2:
        img, emb = img[::-1], emb[:, ::-1]
    if k & 4:
        img, emb = img[:, ::-1], emb[:, :, ::-1]
    return np.ascontiguousarray(img), np.ascontiguousarray(emb)


def embedding_loss(s: torch.Tensor, t: torch.Tensor) -> dict:
    """``MSE + (1 - cosine)`` between student and teacher embeddings ``(N, 256, h, w)``."""
    mse = F.mse_loss(s, t)
    cos = 1.0 - F.cosine_similarity(s, t, dim=1, eps=1e-6).mean()
    return {"loss": mse + cos, "mse": mse, "cos": cos}


# --------------------------------------------------------------------------------------------------
# entry points


def _resolve_device(device: str) -> torch.device:
    from ..model.segmenter import resolve_device

    return resolve_device(device)


def _init_model(init, cfg: DistillConfig) -> tuple[CellSAM, dict]:
    from .train import base_metadata

    if init is not None:
        model, meta = load_checkpoint(init)
        meta = dict(meta)
        from ..model.checkpoint import init_identity

        meta.update(init_identity(init))  # file name + sha256, never a machine path
    else:
        model, meta = CellSAM(DEFAULT_ARCH), base_metadata(_train_cfg(cfg))
    return model, meta


def _train_cfg(cfg: DistillConfig):
    from ..config import TrainConfig

    return TrainConfig(epochs=cfg.epochs, iters_per_epoch=cfg.iters_per_epoch, batch_size=cfg.batch_size,
                       crop_px=cfg.crop_px, lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_iters=cfg.warmup_iters,
                       mpp=cfg.mpp, seed=cfg.seed, aug_strength=cfg.aug_strength, threads=cfg.threads)


def distill(data, out, teacher, *, init=None, cache=None, cfg: DistillConfig = DistillConfig(),
            device: str = "auto", resume_state=None) -> dict:
    """Distil the teacher's embeddings into the student encoder (+ neck); see the module docstring.

    Parameters
    ----------
    data : path-like
        Annotated-data folder (as for ``cellsam train``; only the images are used).
    out : path-like
        Final CellSAM checkpoint (lite; metadata ``distilled_from`` = the teacher's identity).
    teacher : path-like or SamTeacher
    init : path-like, optional
        CellSAM checkpoint to start from (default: a fresh student).
    cache : path-like, optional
        Teacher-embedding zarr store (default ``OUT.run/teacher.zarr``).
    resume_state : path-like, optional
        Compact resume file (:mod:`pipeline.training.loop`); the teacher cache is not part of it
        (it is recomputed on a fresh machine unless ``cache`` points to a kept copy).

    Returns
    -------
    dict
        Final metadata; ``metadata["distill"]["cache_new"]`` counts teacher runs of this call.
    """
    from ..model.teacher import SamTeacher, load_teacher

    dev = _resolve_device(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t = teacher if isinstance(teacher, SamTeacher) else load_teacher(teacher)
    out = Path(out)
    crops = load_crops(data, cfg)
    store = TeacherCache(cache or out.with_name(out.name + ".run") / "teacher.zarr", t.info, cfg.mpp, cfg.crop_px)
    t0 = time.time()
    n_new = fill_cache(store, t, crops, dev)
    fill_s = time.time() - t0
    t.to("cpu")
    targets = {c["key"]: store.get(c["key"]) for c in crops}
    torch.manual_seed(cfg.seed)
    model, meta = _init_model(init, cfg)
    model = model.to(dev).train()
    params = list(model.student.parameters())
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("student."))
    mean = model.pixel_mean
    std = model.pixel_std

    def step(rng):
        idx = rng.integers(0, len(crops), cfg.batch_size)
        ks = rng.integers(0, 8, cfg.batch_size) if cfg.dihedral else np.zeros(cfg.batch_size, np.int64)
        pairs = [dihedral_pair(crops[i]["image"], targets[crops[i]["key"]], int(k)) for i, k in zip(idx, ks)]
        x = torch.from_numpy(np.stack([p[0] for p in pairs])).to(dev).permute(0, 3, 1, 2).float()
        tgt = torch.from_numpy(np.stack([p[1] for p in pairs])).to(dev)
        s = model.student((x - mean) / std)["embed"]
        return embedding_loss(s, tgt)

    done = {"first": True}

    def extra(epoch):
        row = {"cache_new": n_new if done["first"] else 0, "cache_s": round(fill_s, 2) if done["first"] else 0.0}
        done["first"] = False
        return row

    meta = {**meta, "mode": "lite", "distilled_from": t.info,
            "distill": {"config": asdict(cfg), "loss": "mse + (1 - cosine)", "crops": len(crops)}}
    final = fit(model, params, out, meta, cfg, step, extra_row=extra, resume_state=resume_state)
    final["distill"] = {**final["distill"], "cache_new": n_new}
    return final


def train_dual(data, out, teacher, *, init=None, cfg: DistillConfig = DistillConfig(), device: str = "auto",
               resume_state=None) -> dict:
    """Dual mode: attach the teacher, add the gated fusion, train fusion gate + dense decoder with the
    supervised losses of :mod:`pipeline.training.train` (student frozen). Returns the final metadata
    (``mode`` "dual", ``teacher`` = the teacher's identity; arch ``fusion`` = True)."""
    from ..model.teacher import SamTeacher, load_teacher
    from .train import losses, make_batch, training_tiles

    dev = _resolve_device(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t = teacher if isinstance(teacher, SamTeacher) else load_teacher(teacher)
    tiles = training_tiles(data, cfg.mpp, cfg.max_tiles)
    weights = sampling_weights(tiles)
    torch.manual_seed(cfg.seed)
    model, meta = _init_model(init, cfg)
    if model.fusion is None:
        model.fusion = GatedFusion()
        model.arch["fusion"] = True
    model.teacher = t
    model = model.to(dev).train()
    model.student.eval()
    params = train_only(model, ("fusion.", "decoder."))
    tcfg = _train_cfg(cfg)

    def step(rng):
        model.student.eval()
        x, fg, hv = make_batch(rng, tiles, weights, tcfg)
        out_maps = model(x.to(dev))["maps"]
        return losses(out_maps, fg.to(dev), hv.to(dev))

    meta = {**meta, "mode": "dual", "teacher": t.info, "dual": {"config": asdict(cfg)}}
    return fit(model, params, out, meta, cfg, step, resume_state=resume_state)


def check_out(out) -> Path:
    out = Path(out)
    if out.exists() and out.is_dir():
        raise InputError(f"{out}: is a directory (give a checkpoint file path)")
    return out

