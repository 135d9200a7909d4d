"""CellSAM checkpoint format (one format for lite and dual models).

A checkpoint is a ``torch.save`` of a plain dict (loads with ``torch.load(weights_only=True)``)::

    {"format": "cellsam-checkpoint", "format_version": 1,
     "arch": {...},                 # CellSAM architecture (JSON-able)
     "metadata": {"mpp": 0.5,       # µm/px the model works at
                  "input": "RGB uint8 0..255, SAM pixel mean/std",
                  "pixel_mean": [...], "pixel_std": [...],
                  "version": "...", "mode": "lite"|"dual", "postprocess": {...},
                  "teacher": null | {"type": "vit_b", ...}, "trained_on": ..., "metrics": {...}},
     "state_dict": {...}}           # without the frozen SAM teacher

Training checkpoints (``last.pt``) add ``optimizer``, ``scheduler``, ``epoch``, ``rng`` entries.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch

from ..errors import ModelError
from .cellsam import CellSAM

FORMAT = "cellsam-checkpoint"
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "cellsam_default.pt"
#: the shipped models by name (``--model NAME``): ``default`` (lite), ``quality`` (+ the patch typer,
#: docs/model_card.md "Nucleus types")
NAMED_WEIGHTS = {"default": DEFAULT_WEIGHTS, "quality": DEFAULT_WEIGHTS.with_name("cellsam_quality.pt")}


def resolve_weights(spec=None) -> Path:
    """Checkpoint path of ``spec``: None or a shipped model's name (:data:`NAMED_WEIGHTS`, unless a
    file of that name exists here) -> the shipped file; anything else -> ``Path(spec)``."""
    if spec is None:
        return DEFAULT_WEIGHTS
    if str(spec) in NAMED_WEIGHTS and not Path(spec).exists():
        return NAMED_WEIGHTS[str(spec)]
    return Path(spec)


def save_checkpoint(path, model: CellSAM, metadata: dict, **extra) -> None:
    """Write atomically (:func:`pipeline.paths.atomic_write`)."""
    from ..paths import atomic_write

    obj = {"format": FORMAT, "format_version": 1, "arch": model.arch, "metadata": metadata,
           "state_dict": model.trainable_state_dict(), **extra}
    atomic_write(path, lambda tmp: torch.save(obj, tmp), "checkpoint", mkdir=True)


def read_checkpoint(path) -> dict:
    """Load a checkpoint dict safely (``weights_only=True``); raise ModelError with one line."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: model checkpoint not found (a .pt file, or a shipped model: "
                         f"{', '.join(NAMED_WEIGHTS)})")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it all
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle refusal, truncation, not-a-zip, ...
        raise ModelError(f"{path}: not a loadable CellSAM checkpoint ({_load_problem(exc)})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ModelError(f"{path}: not a CellSAM checkpoint (missing format marker '{FORMAT}')")
    return obj


def _load_problem(exc: Exception) -> str:
    """One-line reason of a ``torch.load(weights_only=True)`` failure."""
    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)|Unsupported global: GLOBAL ([\w.]+)", text)
    if found or "Unsupported global" in text:
        name = next((g for g in found.groups() if g), "?") if found else "?"
        return f"refused: contains non-tensor Python objects (unsafe pickle, would import {name})"
    if "Unsupported operand" in text or "WeightsUnpickler error" in text:
        return "refused: not a tensor-only pickle (corrupt file, or an unsafe/legacy pickle)"
    if "inline_container" in text or "PytorchStreamReader" in text or "hasRecord" in text:
        detail = re.sub(r"^\[enforce fail at [^\]]*\][ .]*", "", text.strip().splitlines()[0])
        detail = detail.split("  (Could this error message")[0]
        return f"not a PyTorch checkpoint archive: {detail[:150]}"
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return (lines[0] if lines else exc.__class__.__name__)[:200]


def init_identity(path) -> dict:
    """What a checkpoint records about the checkpoint it was started from: its file name and
    sha256 (``{"init": NAME, "init_sha256": HEX}``), never the absolute path of a machine."""
    import hashlib

    path = Path(path)
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return {"init": path.name, "init_sha256": h.hexdigest()}


def load_checkpoint(path=None) -> tuple[CellSAM, dict]:
    """Build the model from a checkpoint (default: shipped weights; a shipped model's name:
    :func:`resolve_weights`). Returns ``(model.eval(), metadata)``."""
    path = resolve_weights(path)
    obj = read_checkpoint(path)
    try:
        model = CellSAM(obj["arch"])
        missing, unexpected = model.load_state_dict(obj["state_dict"], strict=False)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"{path}: checkpoint does not match the CellSAM architecture ({str(exc)[:200]})") from None
    missing = [k for k in missing if not k.startswith("teacher.")]
    if missing or unexpected:
        raise ModelError(f"{path}: checkpoint does not match the architecture "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval(), dict(obj.get("metadata", {}))
