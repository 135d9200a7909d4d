"""The shipped weights on the real validation tiles: segmentation quality floors and the minimum score.

Measured with the default engine (docs/model_card.md, "Validation metrics"): mean over the 6 tiles
AJI 0.615, PQ 0.603, Dice 0.839, pixel precision / recall 0.843 / 0.841. The floors sit about 0.01
under that, so a decoding or engine change that loses quality fails here.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from conftest import shared_file
from pipeline.data.datasets import builtin_samples, split_samples
from pipeline.metrics import aggregate, evaluate_pair

FLOORS = {"aji": 0.605, "pq": 0.59, "dice": 0.83, "pixel_precision": 0.83, "pixel_recall": 0.83}


@pytest.fixture(scope="module")
def seg():
    from pipeline.model import load_model

    return load_model(device="cpu")


@pytest.fixture(scope="module")
def val():
    root = shared_file("nuclei/monuseg2018_train").parent
    samples = split_samples(builtin_samples(root))[1]
    assert len(samples) == 6
    return [(s.name, s.mpp, *s.load()) for s in samples]


def test_shipped_validation_quality_floors(seg, val):
    per = {name: evaluate_pair(lab, seg.segment(img, mpp)[0]) for name, mpp, img, lab in val}
    res = aggregate(per)
    low = {k: round(res[k], 4) for k, floor in FLOORS.items() if res[k] < floor}
    assert not low, f"below the floors {FLOORS}: {low}"


def test_shipped_min_score_drops_only_weak_instances(seg, val):
    assert seg.params.min_score == pytest.approx(0.82)
    name, mpp, img, lab = next(v for v in val if v[0].startswith("TCGA-B0-5710"))
    prob, hv = seg.predict_maps(img, mpp)
    from pipeline.model.postprocess import instances_from_maps

    kept, s_kept = instances_from_maps(prob, hv, mpp, seg.params)
    full, s_full = instances_from_maps(prob, hv, mpp, replace(seg.params, min_score=0.0))
    assert s_kept.min() >= 0.82 and s_full.min() < 0.82
    n_drop = int((s_full < 0.82).sum())
    assert kept.max() == full.max() - n_drop and 0 < n_drop < 0.2 * full.max()
    # the survivors keep exactly their pixels
    weak = np.flatnonzero(s_full < 0.82) + 1
    assert np.array_equal(kept > 0, (full > 0) & ~np.isin(full, weak))


def test_min_score_override_from_the_cli_and_config(tmp_path):
    """``--min-score 0`` keeps the weak instances the shipped 0.82 drops; the setting is part of the
    model identity that chunk resume compares, and an out-of-range value is one config error."""
    import csv
    import subprocess
    import sys

    from pipeline.config import SegmentConfig, with_overrides
    from pipeline.errors import ConfigError
    from pipeline.infer import resolve_model

    img = shared_file("nuclei/crchisto/images/img1.png")
    counts = {}
    for tag, extra in (("default", []), ("all", ["--min-score", "0"])):
        out = tmp_path / f"{tag}.tif"
        r = subprocess.run([sys.executable, "-m", "pipeline.cli", "predict", str(img), "--mpp", "0.55", "-o", str(out),
                            *extra], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        with open(tmp_path / f"{tag}.nuclei.csv") as fh:
            rows = list(csv.DictReader(fh))
        counts[tag] = len(rows)
        scores = [float(row["score"]) for row in rows]
        if tag == "default":
            assert min(scores) >= 0.82
        else:
            assert min(scores) < 0.82
    assert counts["default"] < counts["all"] <= 1.3 * counts["default"], counts
    shipped = resolve_model(None, device="cpu", refine=False, store_mpp=0.5)
    keep_all = resolve_model(None, device="cpu", refine=False, store_mpp=0.5, min_score=0.0)
    assert shipped.info["min_score"] == pytest.approx(0.82) and keep_all.info["min_score"] == 0.0
    assert with_overrides(SegmentConfig(), min_score=0.5).min_score == 0.5
    with pytest.raises(ConfigError, match="min_score"):
        with_overrides(SegmentConfig(), min_score=1.5)
