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


# ----------------------------------------------------------------------------- rough edges (issue 16)


@pytest.mark.parametrize("argv", [
    ["tile", "SLIDE", "-o", "OUT/s.zarr", "--mpp", "nan"],
    ["tile", "SLIDE", "-o", "OUT/s.zarr", "--slide-mpp", "inf"],
    ["check", "SLIDE", "--slide-mpp", "-inf"],
    ["segment", "SLIDE", "-o", "OUT", "--slide-mpp", "nan"],
    ["predict", "SLIDE", "-o", "OUT/l.tif", "--mpp", "nan"],
    ["predict", "SLIDE", "-o", "OUT/l.tif", "--mpp", "0"],
    ["evaluate", "--pred", "OUT", "--truth", "OUT", "--baseline-mpp", "nan"],
    ["train", "--data", "OUT", "-o", "OUT/m.pt", "--lr", "nan"],
    ["distill", "--data", "OUT", "-o", "OUT/m.pt", "--lr", "inf"],
])
def test_non_finite_float_options_are_one_line_usage_errors(tmp_path, argv):
    slide = shared_file("slides/format-fixtures/small.svs")
    argv = [str(slide) if a == "SLIDE" else a.replace("OUT", str(tmp_path)) for a in argv]
    res = _cli(*argv)
    _assert_one_line_error(res, argv[0])
    assert res.returncode == 2 and "--" in res.stderr
    assert not any(tmp_path.iterdir())


def test_every_command_has_a_description_and_output_is_one_long_form():
    from pipeline.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, p in sub.choices.items():
        assert p.description and len(p.description) > 30, name
        outs = [a for a in p._actions if "-o" in a.option_strings]
        if outs:
            assert outs[0].option_strings == ["-o", "--output"], (name, outs[0].option_strings)
            assert not any(s == "--out" for a in p._actions for s in a.option_strings), name
    for name in ("train", "distill"):
        assert any(a.option_strings == ["-o", "--output"] for a in sub.choices[name]._actions), name
    # the old long form --out still works (an unambiguous prefix of --output)
    args = parser.parse_args(["tile", "s.svs", "--out", "x.zarr"])
    assert args.output == "x.zarr"
    epilog = parser.epilog
    for code in (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 130):
        assert f"\n  {code:<4d} " in epilog, code


def test_progress_lines_in_logs_not_carriage_returns(tmp_path):
    """stderr is a pipe here: one line per 10 % for tiling, inference and export, no '\\r'."""
    from pipeline.synthetic import write_synthetic_slide

    slide = write_synthetic_slide(tmp_path / "s.tif", size_px=(900, 900), mpp=0.5, seed=2)
    res = _cli("segment", slide, "-o", tmp_path / "out", "--chunk", 256, "--model", "classical")
    assert res.returncode == 0, res.stderr
    assert "\r" not in res.stderr
    for stage in ("tile", "infer", "export"):
        lines = [ln for ln in res.stderr.splitlines() if f"pipeline.progress: {stage}: " in ln]
        assert lines and lines[-1].split(f"{stage}: ", 1)[1].startswith("100 %"), (stage, res.stderr[-2000:])
        assert len(lines) <= 11
    quiet = _cli("--quiet", "segment", slide, "-o", tmp_path / "q", "--chunk", 256, "--model", "classical")
    assert quiet.returncode == 0 and "progress" not in quiet.stderr and "\r" not in quiet.stderr


def test_quiet_predict_on_a_real_tile_prints_nothing(tmp_path):
    """No library warnings leak in --quiet runs (NumPy's 'array is not writable' from a read-only
    input used to): stderr is empty."""
    tile = shared_file("nuclei/monuseg2018_train/images/TCGA-18-5592-01Z-00-DX1.tif")
    res = _cli("--quiet", "predict", tile, "-o", tmp_path / "labels.tif", "--mpp", "0.25", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    assert (tmp_path / "labels.tif").stat().st_size > 0


def test_unwritable_output_names_the_directory_given(tmp_path):
    blocker = tmp_path / "plainfile"
    blocker.write_text("not a directory")
    out = blocker / "results"
    res = _cli("segment", shared_file("slides/format-fixtures/small.svs"), "-o", out, "--model", "classical")
    _assert_one_line_error(res, str(out))
    assert res.returncode == 8 and ".work" not in res.stderr
