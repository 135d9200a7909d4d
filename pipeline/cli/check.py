"""``cellsam check``: can this slide be processed? (readable, has µm/px, a region decodes).

Prints ``{"slide": PATH, "ok": BOOL, "error": MSG|null, ...}`` as one JSON line on stdout (and
writes it atomically to ``-o STATUS.json``). Exit 0 when ok, else the error's exit code, with the
usual one-line ``cellsam: error: ...`` on stderr.
"""

from __future__ import annotations

import json
from pathlib import Path


def register(sub):
    from .argtypes import positive_float

    p = sub.add_parser("check", help="validate a slide (readable, µm/px present, pixels decode)",
                       description="Open SLIDE, read its µm/px and decode a region of its first and last "
                       "level. Prints one JSON status line (and writes it to -o). With --estimate-mpp, "
                       "also runs the shipped model on a few tissue tiles and reports the likely µm/px.")
    p.add_argument("slide", help="whole-slide image")
    p.add_argument("--slide-mpp", type=positive_float, default=None, help="µm/px of the slide's level 0 (overrides/supplies metadata)")
    p.add_argument("-o", "--output", default=None, metavar="STATUS.json", help="also write the JSON status here")
    p.add_argument("--estimate-mpp", action="store_true",
                   help="also run the shipped model on a few tissue tiles and report the likely µm/px "
                        "(key mpp_estimate; see pipeline/mppcheck.py)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="device for --estimate-mpp")
    p.set_defaults(func=run)


def estimate_mpp(slide, device: str = "auto") -> dict:
    """:func:`pipeline.mppcheck.mpp_check` of the shipped model's scale probe on tissue tiles read
    from the open ``slide`` (no nucleus-size verdict: no whole-slide segmentation here)."""
    from ..config import MppCheckConfig
    from ..model import load_model
    from ..mppcheck import mpp_check, probe_grid_mpp, probe_images, probe_tiles_from_slide

    cfg = MppCheckConfig()
    seg = load_model(None, device=device)
    declared = (slide.mpp_x * slide.mpp_y) ** 0.5
    grid = probe_grid_mpp(seg.mpp, declared)
    tiles = probe_tiles_from_slide(slide, grid, cfg=cfg)
    probe = probe_images(tiles, seg.segment, grid, cfg) if tiles else None
    return mpp_check(declared, None, 0, probe, cfg)


def check_slide(path, slide_mpp: float | None = None, estimate: bool = False, device: str = "auto") -> dict:
    """Open ``path`` and decode a region of level 0 and of the lowest level.

    Returns
    -------
    dict
        ``slide``, ``ok`` (True) and metadata (``mpp_x``, ``mpp_y``, ``dimensions_l0``, ``level_count``,
        ``bounds_l0``, ``objective_power``, ``backend``); with ``estimate``, ``mpp_estimate``
        (:func:`estimate_mpp`: ``plausible``, ``suggested_mpp``, the probe).

    Raises
    ------
    PipelineError
        Whatever :func:`pipeline.slide.open_slide` or the reads raise.
    """
    from ..slide import open_slide

    with open_slide(path, slide_mpp=slide_mpp) as slide:
        bx, by, bw, bh = slide.bounds_l0
        size = 256
        slide.read_region_l0(bx + max(0, bw // 2 - size // 2), by + max(0, bh // 2 - size // 2), min(size, bw), min(size, bh), 0)
        last = slide.level_count - 1
        lw, lh = slide.level_dimensions[last]
        slide.read_region_l0(bx, by, min(size, lw), min(size, lh), last)
        status = {
            "slide": str(path),
            "ok": True,
            "error": None,
            "backend": type(slide).__name__,
            "dimensions_l0": list(slide.dimensions_l0),
            "level_count": slide.level_count,
            "bounds_l0": list(slide.bounds_l0),
            "mpp_x": slide.mpp_x,
            "mpp_y": slide.mpp_y,
            "objective_power": slide.objective_power,
        }
        if estimate:
            import logging

            from ..mppcheck import warning_line

            status["mpp_estimate"] = est = estimate_mpp(slide, device)
            if not est["plausible"]:
                logging.getLogger("pipeline.cli").warning("%s", warning_line(Path(str(path)).name, est))
        return status


def _emit(status: dict, out) -> None:
    text = json.dumps(status, ensure_ascii=False)
    print(text)
    if out:
        from ..paths import atomic_write

        atomic_write(out, lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"), "status", mkdir=True)


def run(args) -> int:
    from ..errors import PipelineError

    try:
        status = check_slide(args.slide, args.slide_mpp, args.estimate_mpp, args.device)
    except PipelineError as exc:
        _emit({"slide": str(args.slide), "ok": False, "error": str(exc), "exit_code": exc.exit_code}, args.output)
        raise
    _emit(status, args.output)
    return 0
