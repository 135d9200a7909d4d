"""``cellsam tile``: slide -> OME-Zarr (NGFF 0.4) tile store at the model's µm/px.

Also writes the tissue-mask preview PNG, by default next to the store as ``<STORE>.tissue.png``
(``--tissue-png`` to choose; the workflow passes ``OUTDIR/.work/S/tissue.png``).
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def register(sub):
    from ..config import StoreConfig
    from .argtypes import positive_float

    d = StoreConfig()
    p = sub.add_parser("tile", help="write the OME-Zarr tile store of a slide (tissue chunks only)",
                       description="Detect tissue on a thumbnail of SLIDE and write its tissue chunks to an "
                       "OME-Zarr (NGFF 0.4) tile store at the model's µm/px, with a pyramid and a tissue "
                       "label image; plus a tissue-mask preview PNG.")
    p.add_argument("slide", help="whole-slide image (anything OpenSlide reads, or an OME-TIFF)")
    p.add_argument("-o", "--output", required=True, metavar="STORE", help="output store directory, e.g. S.ome.zarr")
    p.add_argument("--mpp", type=positive_float, default=None, help=f"store level-0 µm/px (default {d.mpp})")
    p.add_argument("--chunk", type=int, default=None, help=f"chunk edge in store pixels (default {d.chunk_px})")
    p.add_argument("--levels", type=int, default=None, help=f"pyramid levels incl. level 0 (default {d.pyramid_levels})")
    p.add_argument("--slide-mpp", type=positive_float, default=None, help="µm/px of the slide's level 0 (overrides/supplies metadata)")
    p.add_argument("--workers", type=int, default=None, help=f"reader/writer threads (default {d.workers})")
    p.add_argument("--slide-id", default=None, help="id recorded in the store (default: file name without extension)")
    p.add_argument("--tissue-png", default=None, help="tissue preview PNG (default: <STORE>.tissue.png)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..config import StoreConfig, TissueConfig, with_overrides
    from ..errors import ConfigError
    from ..paths import check_slide_id, slide_id_from_path
    from ..slide import open_slide
    from ..store import write_store

    if args.levels is not None and args.levels < 1:
        raise ConfigError(f"--levels must be >= 1, got {args.levels}")
    cfg = with_overrides(StoreConfig(), mpp=args.mpp, chunk_px=args.chunk, workers=args.workers, pyramid_levels=args.levels)
    slide_id = check_slide_id(args.slide_id or slide_id_from_path(args.slide))
    out = Path(args.output)
    png = Path(args.tissue_png) if args.tissue_png else out.with_name(out.name + ".tissue.png")
    with open_slide(args.slide, slide_mpp=args.slide_mpp) as slide:
        write_store(slide, out, cfg, TissueConfig(), slide_id, tissue_png=png)
    return 0
