"""`cellsam train`: train or fine-tune the CellSAM model (resumable; see pipeline/training/train.py)."""

from __future__ import annotations

from dataclasses import fields


def register(sub):
    from .argtypes import config_type

    from ..config import TrainConfig

    p = sub.add_parser("train", help="train / resume / fine-tune the CellSAM model on annotated tiles",
                       description="Train the CellSAM dense heads. Rerunning the same command resumes "
                                   "from OUT.run/last.pt. --init fine-tunes an existing checkpoint.")
    p.add_argument("--data", required=True,
                   help="annotated data: ../shared/data/nuclei (built-in split) or a folder with "
                        "images/, labels/ (label TIFF/PNG, ImageScope XML or QuPath GeoJSON) and mpp.txt")
    p.add_argument("-o", "--output", required=True, metavar="CKPT", help="final checkpoint path (run state in CKPT.run/)")
    p.add_argument("--init", default=None, help="checkpoint to fine-tune from ('default' = shipped weights)")
    for f in fields(TrainConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=config_type(f.name, f.default), default=None,
                       help=f"default {f.default}")
    p.add_argument("--no-tune", action="store_true", help="skip the post-processing threshold search")
    p.add_argument("--resume-state", metavar="FILE", default=None,
                   help="compact resume file (fp16 weights, <= 15 MB) rewritten every epoch, resumed from when "
                        "OUT.run/ is gone (e.g. committed and continued on another machine), deleted at the end")
    p.set_defaults(func=run)


def run(args):
    from ..config import with_overrides
    from ..model.checkpoint import DEFAULT_WEIGHTS
    from ..config import TrainConfig
    from ..training.train import train

    cfg = with_overrides(TrainConfig(), **{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    init = DEFAULT_WEIGHTS if args.init == "default" else args.init
    meta = train(args.data, args.output, init=init, cfg=cfg, tune=not args.no_tune, resume_state=args.resume_state)
    val = meta.get("validation")
    print(f"wrote {args.output}" + (f" (validation AJI {val['aji']:.3f} PQ {val['pq']:.3f})" if val else ""))
    return 0
