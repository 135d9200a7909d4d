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
    p.add_argument("--points", metavar="DIR", default=None,
                   help="joint training (needs --init): also nucleus-centre point tiles, images/<t>.png + "
                        "points/<t>.csv (x_px,y_px,class at 0.55 µm/px, e.g. ../shared/data/nuclei/crchisto): "
                        "teacher soft maps corrected by the points (hard negatives, missed nuclei) and a "
                        "fitted type head; see pipeline/training/joint.py")
    p.add_argument("--negatives", metavar="GEOJSON", default=None,
                   help="with --points: hand-drawn regions without nuclei on slides (level-0 polygons with "
                        "properties.slide relative to --negatives-root), e.g. "
                        "pipeline/data/negatives/cmu1_negatives.geojson")
    p.add_argument("--point-crops", type=int, default=None, metavar="N",
                   help="with --points: point-tile crops per batch (default 3; 0 = the point tiles only "
                        "validate detection)")
    p.add_argument("--feature-distill", type=float, default=None, metavar="W",
                   help="with --points: weight of feature distillation, the starting model's stride-16 "
                        "embedding on every crop (default 0 = off)")
    p.add_argument("--negatives-root", metavar="DIR", default=None,
                   help="folder the negative regions' slide paths are relative to (default: the parent of --data)")
    p.add_argument("--fg-gate", action="store_true",
                   help="with --init and --negatives: add a foreground gate to the checkpoint and train only it "
                        "(the network stays frozen; pipeline/training/gate.py)")
    p.add_argument("--gate-iters", type=int, default=None, metavar="N", help="gate training steps (default 400)")
    p.add_argument("--no-tune", action="store_true", help="skip the post-processing threshold search")
    p.add_argument("--no-types", action="store_true",
                   help="do not fit a type head for the classes found in a user folder's annotations "
                        "(classified QuPath GeoJSON objects, point CSVs, label + type pairs)")
    p.add_argument("--resume-state", metavar="FILE", default=None,
                   help="compact resume file (fp16 weights, <= 15 MB) rewritten every epoch, resumed from when "
                        "OUT.run/ is gone (e.g. committed and continued on another machine), deleted at the end")
    p.set_defaults(func=run)


def _fit_user_classes(data, out) -> None:
    """After training on a user folder whose annotations carry >= 2 class names, replace the
    output's (absent) type head by one fitted for those classes on the new network."""
    import logging
    from pathlib import Path

    from ..training.user_classes import classes_found, train_types

    root = Path(data)
    if (root / "monuseg2018_train").exists() or (root / "cpm15").exists():
        return  # the built-in instance data has no classes
    names = classes_found(root)
    if len(names) < 2:
        return
    mpp = float((root / "mpp.txt").read_text().strip())
    summary = train_types(root, out, mpp, init=out)
    logging.getLogger(__name__).info("type head fitted for %s", ", ".join(summary["classes"]))
    print(f"classes: {', '.join(summary['classes'])}")


def _train_gate(args, cfg, init) -> int:
    """``--fg-gate``: gate ``init`` with the negative regions (pipeline/training/gate.py)."""
    from pathlib import Path

    from ..errors import ConfigError
    from ..model.checkpoint import load_checkpoint
    from ..model.segmenter import Segmenter
    from ..training.gate import GateConfig, train_gate
    from ..training.joint import load_negative_regions

    if init is None or not args.negatives:
        raise ConfigError("--fg-gate needs --init (the checkpoint to gate) and --negatives (the regions)")
    gcfg = GateConfig() if args.gate_iters is None else GateConfig(iters=args.gate_iters)
    teacher = Segmenter(*load_checkpoint(init), device="cpu", engine="torch")
    regions = load_negative_regions(args.negatives, args.negatives_root or Path(args.data).parent, cfg.mpp,
                                    teacher, gcfg.neg_weight)
    meta = train_gate(args.data, regions, args.output, init=init, cfg=cfg, gcfg=gcfg)
    info = meta["fg_gate_training"]
    print(f"gate trained: validation {info['validation_before']} -> {info['validation_after']}")
    return 0


def run(args):
    from ..config import with_overrides
    from ..model.checkpoint import DEFAULT_WEIGHTS
    from ..config import TrainConfig
    from ..training.train import train

    cfg = with_overrides(TrainConfig(), **{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    init = DEFAULT_WEIGHTS if args.init == "default" else args.init
    if args.fg_gate:
        return _train_gate(args, cfg, init)
    if args.points:
        from ..errors import ConfigError
        from ..training.joint import JointConfig, train_joint

        if init is None:
            raise ConfigError("--points (joint training) needs --init (a checkpoint with a distance head, e.g. default)")
        jover = {k: v for k, v in (("point_crops", args.point_crops), ("feature_weight", args.feature_distill))
                 if v is not None}
        jcfg = JointConfig(**jover)
        meta = train_joint(args.data, args.points, args.output, init=init, regions=args.negatives,
                           regions_root=args.negatives_root, cfg=cfg, jcfg=jcfg, resume_state=args.resume_state,
                           tune=not args.no_tune)
    elif args.negatives:
        from ..errors import ConfigError

        raise ConfigError("--negatives needs --points (joint training)")
    else:
        meta = train(args.data, args.output, init=init, cfg=cfg, tune=not args.no_tune,
                     resume_state=args.resume_state)
        if not args.no_types:
            _fit_user_classes(args.data, args.output)
    val = meta.get("validation")
    print(f"wrote {args.output}" + (f" (validation AJI {val['aji']:.3f} PQ {val['pq']:.3f})" if val else ""))
    return 0
