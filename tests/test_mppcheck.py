"""µm/px plausibility (pipeline/mppcheck.py): pure rules, then the real slides through the real CLI.

* At their own µm/px the shared slides do not warn (CMU-1-Small-Region 0.499, HE_example 0.5,
  TCGA-CR-7395 at 1.0: that slide carries no µm/px; its nuclei say ~1 µm/px, and both 0.25 and
  0.5 are flagged).
* A wrong ``--slide-mpp`` warns with one line containing "implausible µm/px", the slide's name and
  a likely value near the truth: 0.25 on the 0.5 µm/px CMU slide (declared too fine) and 1.0 on it
  (declared too coarse), through ``cellsam segment`` (recorded in the summary's ``mpp_check``) and
  ``cellsam check --estimate-mpp``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from conftest import REPO, shared_file
from pipeline.config import MppCheckConfig
from pipeline.mppcheck import WARNING_TEXT, estimate_factor, mpp_check, warning_line

WEIGHTS = REPO / "pipeline" / "weights" / "cellsam_default.pt"
needs_weights = pytest.mark.skipif(not WEIGHTS.exists(), reason=f"shipped model weights missing: {WEIGHTS}")


def cli(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "--quiet", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def warnings_of(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if WARNING_TEXT in line]


# ----------------------------------------------------------------------------- pure rules


def test_estimate_factor_interpolates_on_the_side_of_the_reference():
    assert estimate_factor([0.5, 1, 2], [10.0, 27.0, 60.0], 27) == pytest.approx(1.0)
    h = 2 ** (math.log(27 / 20) / math.log(80 / 20))  # log-log between (1, 20) and (2, 80)
    assert estimate_factor([0.5, 1, 2], [10.0, 20.0, 80.0], 27) == pytest.approx(h)
    # a falling far end (noise) is ignored: the search goes up from h = 1 where the median is too small
    assert estimate_factor([0.5, 1, 2], [44.8, 13.8, 19.0], 27) == pytest.approx(2 * (27 / 19.0) ** 0.5, rel=1e-6)
    # too large at h = 1 and everything below too: extended down with area ~ h^2
    assert estimate_factor([0.5, 1, 2], [54.0, 80.0, 90.0], 27) == pytest.approx(0.5 * (27 / 54.0) ** 0.5, rel=1e-6)
    assert estimate_factor([0.5, 1, 2], [None, None, None], 27) is None
    assert estimate_factor([0.5, 1, 2], [None, None, 1e-6], 27) == 8.0  # clamped


def test_mpp_check_verdicts_and_warning_line():
    probe = {"tiles": 4, "factors": [0.5, 1.0, 2.0], "nuclei": [100, 300, 600], "median_area_um2": [10.0, 26.0, 40.0]}
    ok = mpp_check(0.5, 25.0, 3000, probe)
    assert ok["plausible"] is True and ok["suggested_mpp"] is None and ok["in_expected_range"] is True
    assert ok["median_diameter_um"] == pytest.approx(5.64, abs=0.01)
    assert ok["expected_diameter_um"] == [pytest.approx(3.91, abs=0.01), pytest.approx(11.83, abs=0.01)]
    small = mpp_check(0.25, 10.9, 1278, {**probe, "median_area_um2": [None, 9.5, 22.0]})
    assert small["plausible"] is False and small["in_expected_range"] is False
    assert 0.4 < small["suggested_mpp"] < 0.7
    line = warning_line("CMU-1-Small-Region.svs", small)
    assert WARNING_TEXT in line and "CMU-1-Small-Region.svs" in line and f"{small['suggested_mpp']:g}" in line
    assert "\n" not in line
    # the size alone in range, the probe out of it: implausible
    big = mpp_check(1.0, 26.4, 8000, {**probe, "median_area_um2": [26.75, 43.5, 36.0]})
    assert big["in_expected_range"] is True and big["plausible"] is False and big["suggested_mpp"] < 0.6
    # too few nuclei and no probe: nothing judged, no warning
    none = mpp_check(0.5, 5.0, 3, None)
    assert none["plausible"] is True and none["in_expected_range"] is None and none["note"]
    json.dumps(none, allow_nan=False)


# ----------------------------------------------------------------------------- real slides


@needs_weights
@pytest.mark.parametrize("name, slide_mpp", [
    ("CMU-1-Small-Region.svs", None), ("HE_example.ome.tif", None), ("TCGA-CR-7395-01A-01-TS1.svs", 1.0),
])
def test_check_estimate_no_warning_at_own_mpp(name, slide_mpp):
    path = shared_file(f"slides/{name}")
    res = cli("check", path, "--estimate-mpp", "--device", "cpu", *(["--slide-mpp", slide_mpp] if slide_mpp else []))
    assert res.returncode == 0, res.stderr
    est = json.loads(res.stdout)["mpp_estimate"]
    assert est["plausible"] is True and est["suggested_mpp"] is None, est
    lo, hi = MppCheckConfig().probe_factor_range
    assert lo <= est["probe"]["factor"] <= hi
    assert not warnings_of(res.stderr)


@needs_weights
@pytest.mark.parametrize("name, wrong, lo, hi", [
    ("CMU-1-Small-Region.svs", 0.25, 0.4, 0.75),
    ("CMU-1-Small-Region.svs", 1.0, 0.3, 0.7),
    ("TCGA-CR-7395-01A-01-TS1.svs", 0.25, 0.5, 1.6),
    ("TCGA-CR-7395-01A-01-TS1.svs", 0.5, 0.7, 1.6),
])
def test_check_estimate_flags_wrong_mpp(name, wrong, lo, hi):
    path = shared_file(f"slides/{name}")
    res = cli("check", path, "--estimate-mpp", "--device", "cpu", "--slide-mpp", wrong)
    assert res.returncode == 0, res.stderr
    est = json.loads(res.stdout)["mpp_estimate"]
    assert est["plausible"] is False and lo <= est["suggested_mpp"] <= hi, est
    (line,) = warnings_of(res.stderr)
    assert name in line and f"--slide-mpp {est['suggested_mpp']:g}" in line


@needs_weights
def test_segment_records_mpp_check_and_warns_only_when_wrong(tmp_path):
    """The whole CMU slide: at its own µm/px no warning and a plausible check in the summary;
    declared 0.25 (store 4x smaller, fast) warns once, naming the slide and ~0.5 µm/px."""
    path = shared_file("slides/CMU-1-Small-Region.svs")
    good = cli("segment", path, "-o", tmp_path / "own", "--device", "cpu")
    assert good.returncode == 0, good.stderr
    assert not warnings_of(good.stderr)
    check = json.loads((tmp_path / "own" / "CMU-1-Small-Region.summary.json").read_text())["mpp_check"]
    assert check["plausible"] is True and check["declared_mpp"] == pytest.approx(0.499)
    assert 12 <= check["median_area_um2"] <= 110 and check["probe"]["tiles"] >= 1

    bad = cli("segment", path, "-o", tmp_path / "wrong", "--slide-mpp", 0.25, "--device", "cpu")
    assert bad.returncode == 0, bad.stderr
    (line,) = warnings_of(bad.stderr)
    assert "CMU-1-Small-Region.svs" in line
    check = json.loads((tmp_path / "wrong" / "CMU-1-Small-Region.summary.json").read_text())["mpp_check"]
    assert check["plausible"] is False and 0.4 <= check["suggested_mpp"] <= 0.75
    assert f"{check['suggested_mpp']:g}" in line
