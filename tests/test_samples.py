"""Sample sheet: parsing, path resolution and one-line errors naming the line and column."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from pipeline.errors import ConfigError
from pipeline.samples import read_sample_sheet

SCHEMA = Path(__file__).resolve().parents[1] / "workflows" / "schemas" / "samples.schema.yaml"


def _write_sheet(path: Path, rows: list[str], header: str = "slide_id\tpath\tmpp") -> Path:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def _fake_slide(tmp: Path, name: str) -> Path:
    p = tmp / "slides" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"not really a slide")
    return p


def test_sample_sheet_resolves_relative_paths_and_sorts(tmp_path):
    _fake_slide(tmp_path, "x.svs")
    sheet = _write_sheet(
        tmp_path / "sheet.csv", ["zeta,slides/x.svs,", "# a comment line", "alpha,slides/x.svs,0.5"],
        header="slide_id,path,mpp",
    )
    df = read_sample_sheet(sheet)
    assert list(df.index) == ["alpha", "zeta"]
    assert df.loc["zeta", "path"] == str(tmp_path / "slides" / "x.svs")
    assert df.loc["alpha", "mpp"] == 0.5
    assert math.isnan(df.loc["zeta", "mpp"])


@pytest.mark.parametrize(
    "rows, header, message",
    [
        (["a\tslides/x.svs", "a\tslides/x.svs"], "slide_id\tpath", "line 3: column 'slide_id': duplicate id 'a'"),
        (["a\tslides/missing.svs"], "slide_id\tpath", "line 2: column 'path': slide file not found"),
        (["../up\tslides/x.svs"], "slide_id\tpath", "line 2: column 'slide_id': unsafe slide id '../up'"),
        (["a/b\tslides/x.svs"], "slide_id\tpath", "column 'slide_id': unsafe slide id 'a/b'"),
        (["a\tslides/x.svs\t-1"], "slide_id\tpath\tmpp", "line 2: column 'mpp' must be > 0"),
        (["a\tslides/x.svs\tfast"], "slide_id\tpath\tmpp", "line 2: column 'mpp' must be a number"),
        (["a\tslides/x.svs\t1"], "slide_id\tpath\tmmp", "unknown column(s) 'mmp'"),
        (["a"], "slide_id", "missing column(s) 'path'"),
        ([], "slide_id\tpath", "no slides listed"),
    ],
)
def test_sample_sheet_errors_name_line_and_column(tmp_path, rows, header, message):
    _fake_slide(tmp_path, "x.svs")
    sheet = _write_sheet(tmp_path / "sheet.tsv", rows, header=header)
    with pytest.raises(ConfigError) as info:
        read_sample_sheet(sheet)
    assert message in str(info.value)
    assert str(sheet) in str(info.value)


def test_schema_row_validation_names_line_and_column(tmp_path):
    _fake_slide(tmp_path, "x.svs")
    schema = yaml.safe_load(SCHEMA.read_text(encoding="utf-8"))
    sheet = _write_sheet(tmp_path / "s.tsv", ["a\tslides/x.svs\t0.5", "", "b\tslides/x.svs\t0"])
    with pytest.raises(ConfigError, match=r"s.tsv line 4: column 'mpp': 0.0 is less than or equal to the minimum of 0"):
        read_sample_sheet(sheet, schema=schema)


def test_missing_files_allowed_when_not_checked(tmp_path):
    sheet = _write_sheet(tmp_path / "s.tsv", ["a\t/nowhere/a.svs\t"])
    assert read_sample_sheet(sheet, check_files=False).loc["a", "path"] == "/nowhere/a.svs"
