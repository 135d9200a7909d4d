"""`cellsam tile` / `cellsam check` on bad input: one line naming the file, non-zero, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from conftest import REPO, shared_file


def _cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def _assert_one_line_error(res, name):
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("cellsam: error: ") and name in lines[0]


@pytest.mark.parametrize(
    "name", ["format-fixtures/unopenable.tiff", "format-fixtures/unreadable.svs", "format-fixtures/boxes.tiff", "TCGA-CR-7395-01A-01-TS1.svs"]
)
def test_tile_bad_slides(tmp_path, name):
    path = shared_file(f"slides/{name}")
    res = _cli("--quiet", "tile", path, "-o", tmp_path / "s.zarr")
    _assert_one_line_error(res, path.name)
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("name", ["format-fixtures/small.svs", "format-fixtures/boxes_0.dcm"])
def test_tile_small_fixtures_work(tmp_path, name):
    path = shared_file(f"slides/{name}")
    out = tmp_path / "s.zarr"
    res = _cli("--quiet", "tile", path, "-o", out)
    assert res.returncode == 0, res.stderr
    attrs = json.loads((out / ".zattrs").read_text())["cellsam"]
    assert attrs["complete"] is True and attrs["shape_rc"][0] >= 1
    assert (tmp_path / "s.zarr.tissue.png").is_file()


def test_tile_missing_zero_byte_and_fake(tmp_path):
    missing = tmp_path / "nope.svs"
    res = _cli("tile", missing, "-o", tmp_path / "o.zarr")
    _assert_one_line_error(res, "nope.svs")
    assert res.returncode == 2
    empty = tmp_path / "zero.svs"
    empty.write_bytes(b"")
    _assert_one_line_error(_cli("tile", empty, "-o", tmp_path / "o.zarr"), "zero.svs")
    fake = tmp_path / "fake.svs"
    Image.new("RGB", (30, 30), (200, 100, 150)).save(fake, format="PNG")
    res = _cli("tile", fake, "-o", tmp_path / "o.zarr")
    _assert_one_line_error(res, "fake.svs")
    assert res.returncode == 3


def test_tile_unwritable_output(tmp_path):
    blocker = tmp_path / "plainfile"
    blocker.write_text("not a directory")
    out = blocker / "x" / "s.zarr"  # works as root too: a path under a regular file
    res = _cli("tile", shared_file("slides/format-fixtures/small.svs"), "-o", out)
    _assert_one_line_error(res, "s.zarr")
    assert res.returncode == 8


def test_tile_bad_option(tmp_path):
    res = _cli("tile", shared_file("slides/format-fixtures/small.svs"), "-o", tmp_path / "s.zarr", "--chunk", "0")
    _assert_one_line_error(res, "chunk_px")


def test_check_ok_and_failures(tmp_path):
    ok = _cli("check", shared_file("slides/CMU-1-Small-Region.svs"), "-o", tmp_path / "ok.json")
    assert ok.returncode == 0, ok.stderr
    status = json.loads((tmp_path / "ok.json").read_text())
    assert status["ok"] is True and status["error"] is None and status["mpp_x"] == pytest.approx(0.499)
    assert json.loads(ok.stdout) == status

    jp2k = shared_file("slides/TCGA-CR-7395-01A-01-TS1.svs")
    bad = _cli("check", jp2k, "-o", tmp_path / "bad.json")
    _assert_one_line_error(bad, jp2k.name)
    assert bad.returncode == 3
    status = json.loads((tmp_path / "bad.json").read_text())
    assert status["ok"] is False and "--slide-mpp" in status["error"]

    fixed = _cli("check", jp2k, "--slide-mpp", "0.25")
    assert fixed.returncode == 0 and json.loads(fixed.stdout)["level_count"] == 2
