"""`cellsam segment SLIDE -o OUTDIR`: the whole pipeline for one slide (tile -> infer -> export)."""

from __future__ import annotations

from ..config import StoreConfig
from .infer import add_model_args, add_reject_arg, segment_overrides

_S = StoreConfig()


def register(sub):
    from .argtypes import nonnegative_float, positive_float

    p = sub.add_parser(
        "segment",
        help="segment all nuclei of one slide (tile store, model, stitching, exports)",
        description="Read SLIDE, build (or reuse) its OME-Zarr tile store, segment every tissue chunk and "
        "write OUTDIR/<id>.geojson.gz (QuPath), <id>.nuclei.parquet, <id>.summary.json and <id>.qc.png. "
        "Interrupted runs resume from the finished chunks.",
    )
    p.add_argument("slide", metavar="SLIDE", help="whole-slide image (anything OpenSlide reads, or OME-TIFF)")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output directory")
    p.add_argument("--slide-id", default=None, metavar="ID", help="output file prefix (default: slide file name)")
    p.add_argument("--slide-mpp", type=positive_float, default=None, metavar="M", help="µm/px of level 0 if the slide lacks it")
    p.add_argument("--store", default=None, metavar="STORE", help="tile store to write/reuse (default: OUTDIR/.work/<id>/store.ome.zarr)")
    p.add_argument("--chunk", type=int, default=None, metavar="PX", help=f"store chunk = inference core edge (default: {_S.chunk_px})")
    add_model_args(p)
    add_reject_arg(p)
    p.add_argument("--geojson-plain", action="store_true", default=None, help="also write an uncompressed .geojson")
    p.add_argument("--cell-expansion-um", type=nonnegative_float, default=None, metavar="D",
                   help="write QuPath cells: each nucleus grown by D µm, Voronoi-limited, within tissue "
                   "(default: off, nuclei as detections)")
    p.set_defaults(func=run)


def run(args) -> int:
    import logging

    from ..config import Config, with_overrides
    from ..segment import run_segment

    base = Config()
    cfg = Config(
        tissue=base.tissue,
        store=with_overrides(base.store, chunk_px=args.chunk),
        segment=with_overrides(base.segment, geojson_plain=args.geojson_plain,
                               cell_expansion_um=args.cell_expansion_um, reject_threshold=args.reject_threshold,
                               **segment_overrides(args)),
    )
    summary = run_segment(
        args.slide,
        args.output,
        slide_id=args.slide_id,
        slide_mpp=args.slide_mpp,
        store_path=args.store,
        model_path=args.model,
        cfg=cfg,
        scheduler=args.scheduler,
        quiet=args.quiet,
    )
    logging.getLogger("pipeline.cli").info("segment: %d nuclei -> %s", summary["nuclei"], args.output)
    return 0
