"""``cellsam check``: can this slide be processed? (readable, has µm/px, a region decodes).

Prints ``{"slide": PATH, "ok": BOOL, "error": MSG|null, ...}`` as one JSON line on stdout (and
writes it atomically to ``-o STATUS.json``). Exit 0 when ok, else the error's exit code, with the
usual one-line ``cellsam: error: ...`` on stderr.
"""

from __future__ import annotations

import json


def register(sub):
    p = sub.add_parser("check", help="validate a slide (readable, µm/px present, pixels decode)")
    p.add_argument("slide", help="whole-slide image")
    p.add_argument("--slide-mpp", type=float, default=None, help="µm/px of the slide's level 0 (overrides/supplies metadata)")
    p.add_argument("-o", "--out", default=None, help="also write the JSON status here")
    p.set_defaults(func=run)


def check_slide(path, slide_mpp: float | None = None) -> dict:
    """Open ``path`` and decode a region of level 0 and of the lowest level.

    Returns
    -------
    dict
        ``slide``, ``ok`` (True) and metadata (``mpp_x``, ``mpp_y``, ``dimensions_l0``, ``level_count``,
        ``bounds_l0``, ``objective_power``, ``backend``).

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
        return {
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


def _emit(status: dict, out) -> None:
    text = json.dumps(status, ensure_ascii=False)
    print(text)
    if out:
        from ..paths import atomic_write

        atomic_write(out, lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"), "status", mkdir=True)


def run(args) -> int:
    from ..errors import PipelineError

    try:
        status = check_slide(args.slide, args.slide_mpp)
    except PipelineError as exc:
        _emit({"slide": str(args.slide), "ok": False, "error": str(exc), "exit_code": exc.exit_code}, args.out)
        raise
    _emit(status, args.out)
    return 0
