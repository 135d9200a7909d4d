"""`cellsam export STORE CHUNKS_DIR -o OUTDIR`: stitch chunk files into the final outputs (CPU job)."""

from __future__ import annotations

from ..config import SegmentConfig

_D = SegmentConfig()


def register(sub):
    from .argtypes import nonnegative_float

    p = sub.add_parser(
        "export",
        help="stitch per-chunk results into GeoJSON, GeoParquet, summary and QC image",
        description="Deduplicate the chunk files written by `cellsam infer`, number the nuclei and write "
        "OUTDIR/<id>.geojson.gz, <id>.nuclei.parquet, <id>.summary.json and <id>.qc.png.",
    )
    p.add_argument("store", metavar="STORE", help="OME-Zarr tile store the chunks were computed from")
    p.add_argument("chunks", metavar="CHUNKS_DIR", help="output directory of `cellsam infer`")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output directory")
    p.add_argument("--slide-id", default=None, metavar="ID", help="output file prefix (default: the store's slide id)")
    p.add_argument(
        "--geojson-plain", action="store_true", default=None, help="also write an uncompressed .geojson"
    )
    p.add_argument("--cell-expansion-um", type=nonnegative_float, default=None, metavar="D",
                   help="write QuPath cells: each nucleus grown by D µm, Voronoi-limited, within tissue "
                   "(default: off, nuclei as detections)")
    from .infer import add_reject_arg

    add_reject_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import logging

    from ..config import Config, with_overrides
    from ..segment import run_export

    cfg = Config()
    cfg = Config(tissue=cfg.tissue, store=cfg.store, segment=with_overrides(cfg.segment, geojson_plain=args.geojson_plain,
                                                                        cell_expansion_um=args.cell_expansion_um,
                                                                        reject_threshold=args.reject_threshold))
    summary = run_export(args.store, args.chunks, args.output, slide_id=args.slide_id, cfg=cfg, quiet=args.quiet)
    logging.getLogger("pipeline.cli").info("export: %d nuclei -> %s", summary["nuclei"], args.output)
    return 0
