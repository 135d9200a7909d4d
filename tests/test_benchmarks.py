"""Smoke tests of the benchmark suite: the slide generator writes an OpenSlide-readable pyramid."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, shared_file


def _load(name: str):
    path = REPO / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def make_slide():
    shared_file("slides/CMU-1-Small-Region.svs")
    shared_file("nuclei/monuseg2018_train/images")
    return _load("make_slide")


def test_make_slide_openslide_mpp_tissue_and_determinism(make_slide, tmp_path):
    import openslide

    size = 2304  # > MIN_LEVEL_PX: two levels
    path, info = make_slide.ensure_slide(size, seed=3, path=tmp_path / "a.tif")
    assert json.loads(Path(str(path) + ".json").read_text())["bytes"] == path.stat().st_size
    with openslide.OpenSlide(str(path)) as s:
        assert s.dimensions == (size, size)
        assert s.level_count == 2 and s.level_dimensions[1] == (size // 2, size // 2)
        assert s.properties["openslide.vendor"] == "generic-tiff"
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.5, rel=1e-4)
        assert float(s.properties["openslide.mpp-y"]) == pytest.approx(0.5, rel=1e-4)
        region = np.asarray(s.read_region((512, 768), 0, (512, 512)).convert("RGB")).astype(np.int16)
        region1 = np.asarray(s.read_region((512, 768), 1, (256, 256)).convert("RGB")).astype(np.int16)
    assert 0.35 <= info["tissue_fraction"] <= 0.65, info
    # pixels are the generator's content (JPEG quality 90: small differences)
    content = make_slide.SlideContent((size, size), 3, make_slide.load_sources(make_slide.SHARED, 0.5), 0.5)
    want = content.render(768, 512, 512, 512, 0)
    err = np.abs(region - want).mean()
    assert err < 7.0 and np.abs(region - content.render(770, 512, 512, 512, 0)).mean() > 2 * err
    want1 = content.render(384, 256, 256, 256, 1)  # level 1 = 2x2 block means of level 0 content
    assert np.abs(region1 - want1).mean() < 7.0
    # real tissue, not a flat fill: many distinct colours, background present
    assert len(np.unique(want.reshape(-1, 3), axis=0)) > 1000
    # deterministic: same seed -> same bytes; another seed -> another slide
    again = make_slide.write_slide(tmp_path / "b.tif", size, seed=3)
    assert (tmp_path / "b.tif").read_bytes() == path.read_bytes()
    assert again["tissue_fraction"] == info["tissue_fraction"]
    other = make_slide.SlideContent((size, size), 4, make_slide.load_sources(make_slide.SHARED, 0.5), 0.5)
    assert not np.array_equal(other.render(768, 512, 512, 512, 0), want)
    # cached: an existing file with the same parameters is reused as is
    mtime = path.stat().st_mtime_ns
    assert make_slide.ensure_slide(size, seed=3, path=path)[0] == path and path.stat().st_mtime_ns == mtime


def test_run_measured_peak_rss_and_report():
    run = _load("run")
    code = "import time; a = b'x' * (200 * 2**20); time.sleep(0.6)"
    m = run.run_measured([sys.executable, "-c", code], poll_s=0.05)
    assert m["rc"] == 0 and m["wall_s"] > 0.5
    assert 0.19 <= m["peak_rss_gb"] < 1.0 and m["peak_tree_rss_gb"] >= 0.19
    assert run.run_measured([sys.executable, "-c", "raise SystemExit(3)"])["rc"] == 3
    # report: a failed run and a partial stitch measurement never count as a met target
    res = {
        "machine": run.machine_info(),
        "args": {"quick": True, "device": "cpu", "note": ""},
        "e2e": [{"size_px": [4096, 4096], "model": "default", "error": "exit 5: boom"}],
        "stitch_export": {"nuclei": 200_000, "stitch_export_s": 10.0, "peak_rss_gb": 1.0},
    }
    res["targets"] = run.targets_check(res)
    assert all(t["met"] is None for t in res["targets"])
    text = run.markdown(res)
    assert "error: exit 5: boom" in text and "measured at 200000 nuclei" in text
