"""Training of the foreground gate (:class:`pipeline.model.cellsam.ForegroundGate`) on a frozen network.

``cellsam train --init CKPT --negatives GEOJSON --fg-gate`` (:func:`train_gate`) adds a gate to a
lite checkpoint and trains **only the gate** (2 small convolutions on the stride-16 embedding, ~74 k
parameters); every other weight, BatchNorm statistic and decoding threshold stays byte for byte.
The gate can only lower the nucleus logit, so it can only remove foreground.

Each step's batch holds ``batch_size - region_crops`` crops of the annotated instance tiles (the
MoNuSeg/CPM training split; target: the true foreground, BCE) and ``region_crops`` crops of slide
tissue around hand-drawn negative regions (:func:`pipeline.training.joint.load_negative_regions`):
foreground 0 inside the polygons (weight ``neg_weight``), and outside them the starting model's own
8-fold test-time-augmentation soft map (weight 1), which keeps the real nuclei next to the
negatives. Half of the region crops are centred on a negative pixel. The frozen network runs
without gradients; only the gate is differentiated, so a step costs about one forward pass.

The run takes minutes and is not resumable (rerun it); it is seeded. The validation split's AJI
/ PQ / Dice / pixel P/R are logged before and after and stored in the metadata (``fg_gate_training``).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..config import TrainConfig
from ..model.cellsam import CellSAM
from ..model.checkpoint import init_identity, load_checkpoint, save_checkpoint
from ..model.postprocess import PostprocessParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GateConfig:
    """Gate training (the rest of the run's settings come from :class:`TrainConfig`: crop, batch
    size, µm/px, seed, augmentation strength, threads)."""

    iters: int = 400
    lr: float = 1e-3
    hidden: int = 32
    region_crops: int = 1
    neg_weight: float = 1.0
    log_every: int = 50


def with_gate(model: CellSAM, hidden: int = 32) -> CellSAM:
    """A copy of ``model`` with an untrained :class:`ForegroundGate` (same outputs up to 0.25 % of a
    logit's sigmoid: the gate starts at softplus(-6))."""
    arch = copy.deepcopy(model.arch)
    arch["fg_gate"] = {"hidden": int(hidden)}
    new = CellSAM(arch)
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not k.startswith("fg_gate.") for k in missing):
        raise ValueError(f"cannot add a gate: unexpected {unexpected[:3]}, missing {missing[:3]}")
    new.teacher = model.teacher
    return new


def _gated_logit(model: CellSAM, x: torch.Tensor) -> torch.Tensor:
    """Nucleus logit ``(N, H, W)`` with gradients through the gate only."""
    with torch.no_grad():
        xn = model.normalize(x)
        feats = model.student(xn)
        embed = feats["embed"]
        maps = model.decoder(xn, feats, embed)
    return maps[:, 0] + model.fg_gate(embed, maps.shape[-2:])[:, 0]


def train_gate(data, regions: list[dict], out, *, init, cfg: TrainConfig = TrainConfig(),
               gcfg: GateConfig = GateConfig()) -> dict:
    """Train a foreground gate on ``init`` and write the gated checkpoint to ``out``.

    Parameters
    ----------
    data : path-like
        Annotated tiles (``cellsam train --data``; the built-in MoNuSeg/CPM folder has a validation split).
    regions : list of dict
        :func:`pipeline.training.joint.load_negative_regions` output (at ``cfg.mpp``, with teacher maps).
    out : path-like
        The gated checkpoint.
    init : path-like
        The lite checkpoint to gate (with a distance head).

    Returns
    -------
    dict
        The metadata written.
    """
    from .joint import JointConfig, weak_batch
    from .train import evaluate_model, make_batch, start_run

    if not regions:
        raise ValueError("gate training needs negative regions")
    out, run, train_data, val_samples, weights = start_run(data, out, cfg)
    model, meta = load_checkpoint(init)
    model = with_gate(model, gcfg.hidden).eval()  # the embedding does not move: a type head stays valid
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("fg_gate."))
    params = list(model.fg_gate.parameters())
    opt = torch.optim.AdamW(params, lr=gcfg.lr, weight_decay=1e-4)
    n_lab = max(1, cfg.batch_size - gcfg.region_crops)
    lab_cfg = TrainConfig(**{**asdict(cfg), "batch_size": n_lab})
    jcfg = JointConfig(point_crops=0, region_crops=gcfg.region_crops)
    params_pp = PostprocessParams.from_dict(meta.get("postprocess"))
    before = evaluate_model(model, meta, val_samples, params_pp) if val_samples else {}
    model.eval()
    rng = np.random.default_rng([cfg.seed, 7])
    torch.manual_seed(cfg.seed)
    t0, sums = time.time(), {"lab": 0.0, "neg": 0.0}
    for it in range(gcfg.iters):
        x, fg, _ = make_batch(rng, train_data, weights, lab_cfg)
        xr, fr, _, wr, _ = weak_batch(rng, [], regions, jcfg, cfg)
        logit = _gated_logit(model, torch.cat([x, xr]).contiguous(memory_format=torch.channels_last))
        # balanced: nucleus and background pixels weigh the same, so removing a real nucleus costs
        # as much as keeping a false one (mean BCE would let the background dominate)
        bce = F.binary_cross_entropy_with_logits(logit[:n_lab], fg, reduction="none")
        l_lab = (bce * fg).sum() / fg.sum().clamp_min(1) + (bce * (1 - fg)).sum() / (1 - fg).sum().clamp_min(1)
        l_neg = (F.binary_cross_entropy_with_logits(logit[n_lab:], fr, reduction="none") * wr).sum() / wr.sum().clamp_min(1)
        loss = l_lab + l_neg
        opt.zero_grad()
        loss.backward()
        opt.step()
        sums["lab"] += float(l_lab.detach())
        sums["neg"] += float(l_neg.detach())
        if gcfg.log_every and (it + 1) % gcfg.log_every == 0:
            log.info("gate iter %d/%d bce labelled %.4f regions %.4f (%.0f s)", it + 1, gcfg.iters,
                     sums["lab"] / (it + 1), sums["neg"] / (it + 1), time.time() - t0)
    for p in model.parameters():
        p.requires_grad_(False)
    after = evaluate_model(model, meta, val_samples, params_pp) if val_samples else {}
    model.eval()
    keys = ("aji", "pq", "dice", "pixel_precision", "pixel_recall")
    info = {"config": asdict(gcfg), "regions": [r["name"] for r in regions], "train_s": round(time.time() - t0, 1),
            "validation_before": {k: round(float(before[k]), 4) for k in keys if k in before},
            "validation_after": {k: round(float(after[k]), 4) for k in keys if k in after}}
    log.info("gate trained: %s", info)
    metadata = {**meta, **init_identity(init), "fg_gate_training": info}
    if after:
        metadata["validation"] = {k: round(float(v), 4) for k, v in after.items() if isinstance(v, float)}
    save_checkpoint(out, model, metadata)
    try:
        run.rmdir()  # nothing to resume
    except OSError:
        pass
    return metadata
