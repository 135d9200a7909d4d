"""Build-time smoke check of a cellsam image (run by containers/Dockerfile and containers/cellsam.def).

Asserts that the installed package carries the shipped model (package data, brought by
``pip install .``), that the model loads on the CPU, and that it finds nuclei in a synthetic
H&E-like tile. Prints one line and exits 0; any failure is a failed build.
"""

from __future__ import annotations

import sys


def main() -> int:
    import numpy as np

    from pipeline.model import load_model
    from pipeline.model.checkpoint import DEFAULT_WEIGHTS
    from pipeline.synthetic import render_tile, tissue_regions

    if not DEFAULT_WEIGHTS.is_file():
        print(f"smoke: shipped model missing: {DEFAULT_WEIGHTS}", file=sys.stderr)
        return 1
    seg = load_model(None, device="cpu")
    px_um = float(seg.mpp)  # the model's own µm/px
    size_px = 256
    regions = tissue_regions((size_px * px_um, size_px * px_um), seed=0, n_regions=1, tissue_scale=2.0)
    tile = render_tile(0, 0, size_px, size_px, px_um, regions, seed=0)
    labels = seg.segment_batch(tile[None])[0][0]  # (labels, scores[, class_probs]) of the one tile
    nuclei = int(np.unique(labels[labels > 0]).size)
    if nuclei == 0:
        print("smoke: the shipped model found no nuclei in the synthetic tile", file=sys.stderr)
        return 1
    print(f"smoke: ok: {DEFAULT_WEIGHTS.name} loaded, {nuclei} nuclei in a {size_px}x{size_px} px synthetic tile")
    return 0


if __name__ == "__main__":
    sys.exit(main())
