"""Shared pieces of every training run: optimiser + schedule, one step, weight EMA, the resumable
loop of the distillation modes (:func:`fit`) and the run state on disk.

Run state (``OUT.run/``, rewritten atomically after every epoch):

* ``last.pt``: model + optimiser + scheduler + epoch (+ ``ema_state_dict``, ``best_score``), fp32;
* ``log.csv``: one row per epoch; ``best.pt``: the best validated weights (``cellsam train``).

**Compact resume state** (``resume_state=FILE``, ``cellsam train --resume-state FILE``): one file
meant to be committed next to the code, so that a run can continue on another machine that has
nothing of ``OUT.run/``. Written atomically after every epoch, overwritten in place, deleted when
the run ends. It holds (``torch.save`` of a tensor-only dict, read with ``weights_only=True``)::

    {"format": "cellsam-resume-state", "format_version": 1, "arch": {...}, "metadata": {...},
     "epoch": E, "seed": S, "best_score": float,
     "state_dict": fp16 weights, "ema_state_dict": fp16 | absent, "best": {"state_dict", "metadata"} | absent,
     "optimizer": AdamW state with bf16 moments | None, "scheduler": {...}, "log_csv": "<log.csv text>"}

fp16 keeps ~3 significant digits of every weight; the optimiser moments are stored in bfloat16
(fp16 would flush AdamW's tiny second moments to 0, and ``m / (sqrt(0) + eps)`` would blow the first
resumed steps up). Integer buffers are kept exact. If the file would exceed
:data:`pipeline.config.RESUME_STATE_MAX_MB`, the best weights and then the optimiser moments are
left out (a fresh AdamW state on resume; the schedule position is kept), with a warning. Epoch
randomness needs no saved generator state: epoch ``e`` draws from ``numpy.random.default_rng([seed,
e])`` and ``torch.manual_seed(seed * 100003 + e)``.

On resume the newer of ``last.pt`` and the compact file wins (``last.pt`` on a tie: it is exact); a
state whose architecture differs from the run's is refused with one :class:`ModelError` line naming
the file (never loaded non-strictly).
"""

from __future__ import annotations

import copy
import csv
import io
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ..config import RESUME_STATE_MAX_MB
from ..errors import ConfigError, ModelError
from ..model.cellsam import CellSAM
from ..model.checkpoint import FORMAT, _load_problem, read_checkpoint, save_checkpoint
from ..paths import atomic_write, unlink_quietly

log = logging.getLogger(__name__)

RESUME_FORMAT = "cellsam-resume-state"


def optimizer_and_schedule(params, cfg):
    """AdamW + linear warm-up (``cfg.warmup_iters``) then cosine decay to 2 % over
    ``cfg.epochs * cfg.iters_per_epoch`` iterations; shared by ``train`` and ``distill``."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.epochs * cfg.iters_per_epoch

    def lr_at(it):
        # python floats: a numpy scalar in the scheduler state breaks weights_only loading of last.pt
        if it < cfg.warmup_iters:
            return float((it + 1) / cfg.warmup_iters)
        prog = (it - cfg.warmup_iters) / max(1, total - cfg.warmup_iters)
        return float(0.02 + 0.98 * 0.5 * (1 + np.cos(np.pi * min(prog, 1.0))))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_at)


def train_only(model, prefixes: tuple[str, ...]) -> list:
    """Freeze every parameter of ``model`` but those whose name starts with one of ``prefixes``;
    returns the trainable ones (in ``named_parameters`` order)."""
    params = []
    for name, p in model.named_parameters():
        on = name.startswith(prefixes)
        p.requires_grad_(on)
        if on:
            params.append(p)
    return params


def append_log_row(log_path, row: dict) -> None:
    """Append one epoch row to a run's ``log.csv`` (header written with the first row)."""
    new = not Path(log_path).exists()
    with open(log_path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


def sampling_weights(tiles: list[dict]) -> np.ndarray:
    """Probability of drawing each prepared tile for a crop: proportional to its pixel count."""
    areas = np.array([d["labels"].size for d in tiles], float)
    return areas / areas.sum()


def optimizer_step(ls: dict, opt, sched, params, sums: dict) -> None:
    """One optimisation step on ``ls["loss"]`` (gradient clipping at 5), accumulating every loss
    term of ``ls`` into ``sums``; shared by ``train`` and ``distill``."""
    opt.zero_grad(set_to_none=True)
    ls["loss"].backward()
    torch.nn.utils.clip_grad_norm_(params, 5.0)
    opt.step()
    sched.step()
    for k, v in ls.items():
        sums[k] = sums.get(k, 0.0) + float(v.detach())


class WeightEMA:
    """Exponential moving average of a model's state (floating-point parameters and buffers):
    ``ema = decay * ema + (1 - decay) * current`` after every step; integer buffers are copied."""

    def __init__(self, model: CellSAM, decay: float) -> None:
        self.decay = float(decay)
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: CellSAM) -> None:
        cur = model.state_dict()
        for k, e in self.model.state_dict().items():
            if e.is_floating_point():
                e.mul_(self.decay).add_(cur[k], alpha=1 - self.decay)
            else:
                e.copy_(cur[k])


# --------------------------------------------------------------------------------------------------
# run state: last.pt, compact resume file


def load_weights_strict(model: CellSAM, state: dict, where) -> None:
    """Load ``state`` (without ``teacher.*``) into ``model``; every non-teacher key must match.

    Raises
    ------
    ModelError
        One line naming ``where`` when keys or shapes differ.
    """
    try:
        missing, unexpected = model.load_state_dict({k: v.float() if v.is_floating_point() else v
                                                     for k, v in state.items()}, strict=False)
    except RuntimeError as exc:  # shape mismatch
        first = str(exc).strip().splitlines()
        detail = next((ln.strip() for ln in first[1:] if ln.strip()), first[0] if first else "")
        raise ModelError(f"{where}: resume state does not match this run's architecture ({detail[:160]}); "
                         "delete it or pick another --out") from None
    missing = [k for k in missing if not k.startswith("teacher.")]
    if missing or unexpected:
        raise ModelError(f"{where}: resume state does not match this run's architecture (missing {missing[:2]}, "
                         f"unexpected {unexpected[:2]}); delete it or pick another --out")


def _check_arch(obj: dict, model: CellSAM, where) -> None:
    if obj.get("arch") != model.arch:
        diff = sorted(k for k in set(obj.get("arch") or {}) | set(model.arch)
                      if (obj.get("arch") or {}).get(k) != model.arch.get(k))
        raise ModelError(f"{where}: resume state was written for another architecture (differs in {', '.join(diff)}); "
                         "delete it or pick another --out")


def _half_state(state: dict) -> dict:
    return {k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).clone() for k, v in state.items()}


def _opt_state(state: dict, dtype) -> dict:
    """Optimizer ``state_dict`` with its per-parameter tensors (not the scalar ``step``) cast to ``dtype``."""
    out = {"param_groups": state["param_groups"], "state": {}}
    for i, s in state["state"].items():
        out["state"][i] = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() and v.ndim > 0 else v)
                           for k, v in s.items()}
    return out


def _nbytes(obj) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    if isinstance(obj, str):
        return len(obj.encode())
    return 0


def read_resume_state(path) -> dict:
    """Read a compact resume file (``weights_only=True``); one-line :class:`ModelError` otherwise."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"{path}: resume state not found") from None
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"{path}: not a loadable resume state ({_load_problem(exc)})") from None
    if not isinstance(obj, dict) or obj.get("format") != RESUME_FORMAT:
        raise ModelError(f"{path}: not a CellSAM resume state (missing format marker '{RESUME_FORMAT}')")
    return obj


def save_resume_state(path, model: CellSAM, metadata: dict, opt, sched, epoch: int, *, seed: int,
                      ema: WeightEMA | None = None, best_score: float | None = None, run_dir=None,
                      max_mb: float = RESUME_STATE_MAX_MB) -> int:
    """Write the compact resume file (see the module docstring); returns its size in bytes."""
    path = Path(path)
    obj = {"format": RESUME_FORMAT, "format_version": 1, "arch": model.arch, "metadata": metadata,
           "epoch": int(epoch), "seed": int(seed), "best_score": float(-1.0 if best_score is None else best_score),
           "state_dict": _half_state(model.trainable_state_dict()), "scheduler": sched.state_dict(),
           "optimizer": _opt_state(opt.state_dict(), torch.bfloat16), "log_csv": ""}
    if ema is not None:
        obj["ema_state_dict"] = _half_state(ema.model.trainable_state_dict())
    if run_dir is not None:
        run_dir = Path(run_dir)
        if (run_dir / "log.csv").exists():
            obj["log_csv"] = (run_dir / "log.csv").read_text()
        if (run_dir / "best.pt").exists():
            best = read_checkpoint(run_dir / "best.pt")
            obj["best"] = {"state_dict": _half_state(best["state_dict"]), "metadata": best.get("metadata", {})}
    limit = int(max_mb * 1e6)
    for drop in ("best", "optimizer"):
        if _nbytes(obj) + 65536 <= limit:
            break
        if obj.get(drop) is not None:
            log.warning("%s: resume state over %.0f MB: leaving out the %s", path, max_mb,
                        "best weights" if drop == "best" else "optimiser moments")
            obj[drop] = None if drop == "optimizer" else obj.pop(drop)
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    if len(data) > limit:
        raise ConfigError(f"{path}: resume state would be {len(data) / 1e6:.1f} MB (> {max_mb:g} MB) even without "
                          "optimiser moments; the model is too large for a compact resume file")
    atomic_write(path, lambda tmp: tmp.write_bytes(data), "resume state", mkdir=True)
    return len(data)


def restore_run(run_dir, model: CellSAM, opt, sched, *, ema: WeightEMA | None = None, resume_state=None,
                seed: int | None = None) -> dict | None:
    """Restore a run from the newer of ``run_dir/last.pt`` and the compact ``resume_state`` file.

    Returns
    -------
    dict or None
        ``{"epoch": last finished epoch, "best_score": float, "source": path}``; None = fresh run.
        Restoring from the compact file also rewrites ``run_dir/log.csv`` (and ``best.pt`` when
        absent) from it.

    Raises
    ------
    ModelError
        A state whose architecture or weights do not match ``model`` (one line naming the file).
    ConfigError
        A compact state written by a run with another seed.
    """
    run_dir = Path(run_dir)
    last = run_dir / "last.pt"
    full = read_checkpoint(last) if last.exists() else None
    compact = None
    if resume_state is not None and Path(resume_state).exists():
        compact = read_resume_state(resume_state)
        if full is not None and int(full["epoch"]) >= int(compact["epoch"]):
            compact = None
    obj, where = (compact, Path(resume_state)) if compact is not None else (full, last)
    if obj is None:
        return None
    _check_arch(obj, model, where)
    load_weights_strict(model, obj["state_dict"], where)
    if ema is not None and obj.get("ema_state_dict") is not None:
        load_weights_strict(ema.model, obj["ema_state_dict"], where)
    if compact is not None:
        if seed is not None and int(compact["seed"]) != int(seed):
            raise ConfigError(f"{where}: resume state was written by a run with seed {compact['seed']}, "
                              f"this run has seed {seed}")
        if compact.get("optimizer") is not None:
            opt.load_state_dict(_opt_state(compact["optimizer"], torch.float32))
        else:
            log.warning("%s: no optimiser moments in the resume state: AdamW restarts its moments", where)
        sched.load_state_dict(compact["scheduler"])
        run_dir.mkdir(parents=True, exist_ok=True)
        text = compact.get("log_csv") or ""
        atomic_write(run_dir / "log.csv", lambda tmp: tmp.write_text(text), "training log")
        if compact.get("best") is not None and not (run_dir / "best.pt").exists():
            best = {"format": FORMAT, "format_version": 1, "arch": compact["arch"],
                    "metadata": compact["best"]["metadata"],
                    "state_dict": {k: v.float() if v.is_floating_point() else v
                                   for k, v in compact["best"]["state_dict"].items()}}
            atomic_write(run_dir / "best.pt", lambda tmp: torch.save(best, tmp), "checkpoint")
    else:
        opt.load_state_dict(obj["optimizer"])
        sched.load_state_dict(obj["scheduler"])
    log.info("resumed from %s at epoch %d", where, int(obj["epoch"]) + 1)
    return {"epoch": int(obj["epoch"]), "best_score": float(obj.get("best_score", -1.0)), "source": str(where)}


def end_epoch(run_dir, model: CellSAM, metadata: dict, opt, sched, epoch: int, row: dict, *, seed: int,
              ema: WeightEMA | None = None, best_score: float | None = None, resume_state=None) -> None:
    """After an epoch: ``last.pt``, the ``log.csv`` row, then the compact resume file (if asked)."""
    run_dir = Path(run_dir)
    extra = {} if ema is None else {"ema_state_dict": ema.model.trainable_state_dict()}
    if best_score is not None:
        extra["best_score"] = best_score
    save_checkpoint(run_dir / "last.pt", model, metadata, optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                    epoch=epoch, **extra)
    append_log_row(run_dir / "log.csv", row)
    if resume_state is not None:
        n = save_resume_state(resume_state, model, metadata, opt, sched, epoch, seed=seed, ema=ema,
                              best_score=best_score, run_dir=run_dir)
        log.info("resume state %s: %.1f MB (epoch %d)", resume_state, n / 1e6, epoch)


def finish_run(run_dir, out, resume_state=None) -> None:
    """Copy ``log.csv`` next to ``out`` (``OUT.log.csv``, atomically) and delete the compact resume file."""
    log_path = Path(run_dir) / "log.csv"
    out = Path(out)
    if log_path.exists():
        text = log_path.read_bytes()
        atomic_write(out.with_name(out.name + ".log.csv"), lambda tmp: tmp.write_bytes(text), "training log")
    if resume_state is not None:
        unlink_quietly(Path(resume_state))


def fit(model, params, out, metadata: dict, cfg, step, *, extra_row=None, resume_state=None) -> dict:
    """Generic resumable training loop (AdamW, warmup + cosine), shared by the distillation modes.

    Parameters
    ----------
    model : CellSAM
        Built with its final architecture (fusion / SAM decoder attached) before calling.
    params : list of Parameter
        The trainable parameters.
    out : path-like
        Final checkpoint; run state in ``OUT.run/`` (``last.pt``, ``log.csv``).
    step : callable
        ``step(rng) -> dict`` of scalar tensors with a ``loss`` entry (one optimisation step's loss).
    extra_row : callable, optional
        ``extra_row(epoch) -> dict`` of extra CSV columns.
    resume_state : path-like, optional
        Compact resume file (see the module docstring).

    Returns
    -------
    dict
        The metadata written with the final checkpoint.
    """
    out = Path(out)
    run = out.with_name(out.name + ".run")
    run.mkdir(parents=True, exist_ok=True)
    opt, sched = optimizer_and_schedule(params, cfg)
    got = restore_run(run, model, opt, sched, resume_state=resume_state, seed=cfg.seed)
    start = 0 if got is None else got["epoch"] + 1
    for epoch in range(start, cfg.epochs):
        rng = np.random.default_rng([cfg.seed, epoch])
        torch.manual_seed(cfg.seed * 100003 + epoch)
        t0 = time.time()
        sums: dict = {}
        for _ in range(cfg.iters_per_epoch):
            optimizer_step(step(rng), opt, sched, params, sums)
        row = {"epoch": epoch, "lr": round(float(opt.param_groups[0]["lr"]), 8), "train_s": round(time.time() - t0, 2)}
        row.update({k: round(v / cfg.iters_per_epoch, 6) for k, v in sums.items()})
        if extra_row is not None:
            row.update(extra_row(epoch))
        end_epoch(run, model, metadata, opt, sched, epoch, row, seed=cfg.seed, resume_state=resume_state)
        log.info("epoch %d %s", epoch, row)
    final = {**metadata, "epochs": cfg.epochs}
    save_checkpoint(out, model, final)
    finish_run(run, out, resume_state)
    return final
