"""`cellsam infer STORE -o CHUNKS_DIR`: segment the tissue chunks of a tile store (GPU job, resumable)."""

from __future__ import annotations

from ..config import SegmentConfig

_D = SegmentConfig()


def add_model_args(p) -> None:
    """Model/scheduling flags shared by ``infer`` and ``segment`` (defaults from pipeline/config.py)."""
    p.add_argument(
        "--model",
        metavar="CKPT",
        default=None,
        help="model checkpoint (.pt) or shipped model (default, quality: + patch-CNN typing); 'classical' = the classical baseline; default: default",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help=f"default: {_D.device}")
    p.add_argument("--engine", choices=["auto", "torch", "onnxruntime", "openvino"], default=None,
                   help=f"network runner (default: {_D.engine} = fastest installed engine passing parity)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=None,
                   help=f"network precision (default: {_D.precision})")
    p.add_argument("--batch-size", type=int, default=None, metavar="N", help=f"tiles per forward pass (default: {_D.batch_size})")
    p.add_argument("--workers", type=int, default=None, metavar="N", help=f"dask threads (default: {_D.workers})")
    p.add_argument("--halo", type=int, default=None, metavar="PX", help=f"context around each chunk, store px (default: {_D.halo_px})")
    p.add_argument("--tissue-margin", type=int, default=None, metavar="PX",
                   help=f"model runs on the window's tissue box grown by PX store px (default: {_D.tissue_margin_px})")
    p.add_argument("--no-tissue-crop", dest="crop_to_tissue", action="store_false", default=None,
                   help="run the model on whole windows, background included")
    p.add_argument("--refine", action="store_true", default=None, help="SAM-decoder refinement (slower)")
    p.add_argument("--min-score", type=float, default=None, metavar="P",
                   help="drop nuclei whose score (mean nucleus probability) is below P; 0 keeps all "
                   "(default: the checkpoint's, 0.82 for the shipped model)")
    p.add_argument("--teacher", metavar="SAM.pth", default=None,
                   help="official SAM ViT checkpoint: runs a dual --model (teacher + student fused; GPU recommended)")
    p.add_argument("--scheduler", metavar="ADDRESS", default=None, help="dask.distributed scheduler address (default: local threads)")


def segment_overrides(args) -> dict:
    return {
        "device": args.device,
        "engine": args.engine,
        "precision": args.precision,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "halo_px": args.halo,
        "tissue_margin_px": args.tissue_margin,
        "crop_to_tissue": args.crop_to_tissue,
        "refine": args.refine,
        "teacher": args.teacher,
        "min_score": args.min_score,
    }


def add_reject_arg(p) -> None:
    """``--reject-threshold`` of ``segment`` and ``export``: applied when the outputs are written, so
    changing it re-exports from the existing chunk files (no second inference)."""
    p.add_argument("--reject-threshold", type=float, default=None, metavar="P",
                   help="nuclei whose 'not a nucleus' probability (the model's patch typer) is above P are "
                   "written to rejected/ instead; 1 keeps all (default: the checkpoint's, 0.7 for the shipped "
                   "models). Applied at export: changing it reuses the chunk files")


def register(sub):
    p = sub.add_parser(
        "infer",
        help="segment the tissue chunks of a tile store into per-chunk parquet files",
        description="Run the model over every tissue chunk of STORE (written by `cellsam tile`); one "
        "parquet per chunk in CHUNKS_DIR. Rerunning skips finished chunks.",
    )
    p.add_argument("store", metavar="STORE", help="OME-Zarr tile store (.ome.zarr)")
    p.add_argument("-o", "--output", required=True, metavar="CHUNKS_DIR", help="directory for the chunk files")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..config import with_overrides
    from ..infer import run_infer

    cfg = with_overrides(SegmentConfig(), **segment_overrides(args))
    result = run_infer(args.store, args.output, model=args.model, cfg=cfg, scheduler=args.scheduler, quiet=args.quiet)
    import logging

    logging.getLogger("pipeline.cli").info(
        "infer: %d chunks (%d reused) -> %s", result["chunks_total"], result["chunks_reused"], args.output
    )
    return 0
