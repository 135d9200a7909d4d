"""`cellsam distill`: distil a SAM teacher into the student, train dual mode, or train the refiner.

Modes (see pipeline/training/distill.py, pipeline/training/refine_train.py and docs/model.md):

- default: student encoder learns the teacher's embeddings (teacher embeddings cached in ``--cache``);
- ``--dual``: fusion gate + dense heads trained with the teacher attached (writes a dual checkpoint);
- ``--refiner``: SAM prompt encoder + mask decoder trained on frozen embeddings (``--teacher``
  optional: initialises the decoder from SAM's and supplies dual embeddings).

Rerunning the same command resumes from ``OUT.run/last.pt``.
"""

from __future__ import annotations

import argparse
from dataclasses import fields


def _config_fields():
    from ..config import DistillConfig, RefinerConfig

    seen = {}
    for cls in (DistillConfig, RefinerConfig):
        for f in fields(cls):
            seen.setdefault(f.name, f)
    return seen


def register(sub):
    from .argtypes import config_type

    p = sub.add_parser("distill", help="distil SAM into the student / train dual mode / train the SAM-decoder refiner",
                       description="Knowledge distillation of a SAM ViT teacher (an official SAM checkpoint you "
                                   "supply, e.g. sam_vit_b_01ec64.pth) into the CellSAM student. Resumable.")
    p.add_argument("--teacher", metavar="CKPT", default=None,
                   help="official SAM checkpoint (vit_b/vit_l/vit_h); required except with --refiner")
    p.add_argument("--data", required=True, help="annotated data folder (as for `cellsam train`)")
    p.add_argument("-o", "--output", required=True, metavar="CKPT", help="output checkpoint (run state in CKPT.run/)")
    p.add_argument("--init", default=None, metavar="CKPT",
                   help="CellSAM checkpoint to start from ('default' = shipped weights; required with --refiner)")
    p.add_argument("--cache", default=None, metavar="DIR", help="teacher-embedding zarr cache (default OUT.run/teacher.zarr)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--resume-state", metavar="FILE", default=None,
                   help="compact resume file (fp16, <= 15 MB) rewritten every epoch and resumed from when OUT.run/ "
                        "is gone; deleted at the end (see `cellsam train --resume-state`)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dual", action="store_true", help="train the fusion gate + dense heads with the teacher attached")
    mode.add_argument("--refiner", action="store_true", help="train the SAM prompt encoder + mask decoder")
    for name, f in _config_fields().items():
        flag = f"--{name.replace('_', '-')}"
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"default {f.default}")
        else:
            p.add_argument(flag, type=config_type(name, f.default), default=None, help=f"default {f.default}")
    p.set_defaults(func=run)


def run(args) -> int:
    import logging

    from ..config import with_overrides
    from ..errors import InputError
    from ..model.checkpoint import DEFAULT_WEIGHTS, init_identity, load_checkpoint
    from ..training.distill import DistillConfig, check_out, distill, train_dual
    from ..training.refine_train import RefinerConfig, train_refiner
    from ..model.teacher import load_teacher

    log = logging.getLogger("pipeline.cli")
    cls = RefinerConfig if args.refiner else DistillConfig
    own = {f.name for f in fields(cls)}
    given = {name: getattr(args, name) for name in _config_fields() if getattr(args, name) is not None}
    wrong = sorted(set(given) - own)
    if wrong:
        mode = "--refiner" if args.refiner else ("--dual" if args.dual else "distill")
        raise InputError(f"option(s) {', '.join('--' + w.replace('_', '-') for w in wrong)} do not apply to {mode}")
    cfg = with_overrides(cls(), **given)
    out = check_out(args.output)
    init = DEFAULT_WEIGHTS if args.init == "default" else args.init
    if args.refiner:
        if init is None:
            raise InputError("--refiner needs --init CKPT (the model whose embeddings the decoder learns)")
        model, meta = load_checkpoint(init)
        teacher = load_teacher(args.teacher) if args.teacher else None
        meta = train_refiner(model, args.data, out, cfg=cfg, teacher=teacher, metadata={**meta, **init_identity(init)},
                             device=args.device, resume_state=args.resume_state)
    else:
        if not args.teacher:
            raise InputError("--teacher CKPT (an official SAM checkpoint) is required for distillation and --dual")
        fn = train_dual if args.dual else distill
        kwargs = {} if args.dual else {"cache": args.cache}
        meta = fn(args.data, out, args.teacher, init=init, cfg=cfg, device=args.device,
                  resume_state=args.resume_state, **kwargs)
    log.info("distill: wrote %s (mode %s)", out, meta.get("mode"))
    return 0
