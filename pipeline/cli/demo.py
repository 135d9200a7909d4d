"""`cellsam demo [-o OUTDIR]`: segment a small synthetic slide end to end (offline, no data needed)."""

from __future__ import annotations

DEMO_SIZE_PX = (3000, 3000)  # synthetic slide, level 0 (rows, cols)
DEMO_MPP = 0.5  # µm/px of the synthetic slide
DEMO_SEED = 0


def register(sub):
    p = sub.add_parser(
        "demo",
        help="generate a small synthetic slide and segment it (checks an installation)",
        description="Write a 3000x3000 px synthetic H&E-like pyramidal TIFF (0.5 µm/px) to OUTDIR and run "
        "`cellsam segment` on it with the shipped model. Works offline.",
    )
    p.add_argument("-o", "--output", default="cellsam-demo", metavar="OUTDIR", help="output directory (default: ./cellsam-demo)")
    p.add_argument("--model", default=None, metavar="CKPT", help="checkpoint, a shipped model (default, quality) or 'classical' (default: default)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="default: auto")
    p.set_defaults(func=run)


def run(args) -> int:
    import logging
    from pathlib import Path

    from ..config import Config
    from ..segment import run_segment
    from ..synthetic import write_synthetic_slide

    log = logging.getLogger("pipeline.cli")
    out = Path(args.output)
    slide = out / "demo_slide.tif"
    if not slide.exists():
        log.info("demo: writing synthetic slide %s (%dx%d px, %g µm/px)", slide, DEMO_SIZE_PX[1], DEMO_SIZE_PX[0], DEMO_MPP)
        write_synthetic_slide(slide, size_px=DEMO_SIZE_PX, mpp=DEMO_MPP, seed=DEMO_SEED)
    summary = run_segment(slide, out, model_path=args.model, cfg=Config(), device=args.device, quiet=args.quiet)
    sid = summary["slide_id"]
    print(f"cellsam demo: {summary['nuclei']} nuclei in {summary['tissue_area_mm2'] or 0:.2f} mm² of tissue")
    for key in ("geojson_gz", "parquet", "qc_png", "rejected_geojson_gz"):
        if summary["outputs"].get(key):  # rejected_*: what the model removed as "not a nucleus"
            print(f"  {out / summary['outputs'][key]}")
    print(f"  {out / (sid + '.summary.json')}")
    return 0
