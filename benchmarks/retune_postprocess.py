"""Re-tune a checkpoint's decoding thresholds on the validation split; the network is untouched.

    python benchmarks/retune_postprocess.py CKPT [-o OUT.pt]   # default: rewrite CKPT in place

Runs :func:`pipeline.training.train.tune_postprocess` (the same search a training run ends with:
foreground x distance x minimum area by AJI + PQ, then the minimum instance score) on the fixed
6-tile validation split and stores the result as ``metadata["postprocess"]`` and
``metadata["validation"]``. Every other entry of the checkpoint (architecture, state dict, type
head, classes) is copied unchanged, so the weights' bytes stay the same. This is how the shipped
``min_score`` was added to ``pipeline/weights/cellsam_default.pt`` (docs/model_card.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data"

from pipeline.data.datasets import builtin_samples, split_samples  # noqa: E402
from pipeline.model.checkpoint import load_checkpoint, read_checkpoint  # noqa: E402
from pipeline.paths import atomic_write  # noqa: E402
from pipeline.training.train import tune_postprocess  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("-o", "--output", default=None)
    args = ap.parse_args(argv)
    src = Path(args.checkpoint)
    obj = read_checkpoint(src)
    model, meta = load_checkpoint(src)
    val = split_samples(builtin_samples(DATA / "nuclei"))[1]
    best, res = tune_postprocess(model, meta, val)
    obj["metadata"] = {**obj["metadata"], "postprocess": best.to_dict(),
                       "validation": {k: round(float(v), 4) for k, v in res.items() if isinstance(v, float)}}
    atomic_write(Path(args.output or src), lambda tmp: torch.save(obj, tmp), "checkpoint", mkdir=True)
    print(json.dumps({"postprocess": obj["metadata"]["postprocess"], "validation": obj["metadata"]["validation"]},
                     indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
