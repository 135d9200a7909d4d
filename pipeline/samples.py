"""Sample sheet of a cohort: parse, validate and resolve (before any workflow job starts).

Used by the Snakemake workflow (``workflows/rules/common.smk``, together with
``workflows/schemas/samples.schema.yaml``) and by ``cellsam cohort``.

Sample sheet
------------
TSV (``.tsv``/``.txt``) or CSV (``.csv``) with a header row and the columns

==========  ======  ==========================================================================
column      type    meaning
==========  ======  ==========================================================================
slide_id    str     unique id naming every output; see :func:`pipeline.paths.check_slide_id`
path        str     slide file; relative paths are relative to the sheet's directory
mpp         float   optional µm/px override (> 0) for slides lacking resolution metadata
==========  ======  ==========================================================================

Blank lines and lines starting with ``#`` are ignored. Every problem is reported as one
:class:`~pipeline.errors.ConfigError` line naming the sheet, the line and the column.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .errors import ConfigError, InputError
from .paths import check_slide_id

SAMPLE_COLUMNS = ("slide_id", "path", "mpp")
REQUIRED_COLUMNS = ("slide_id", "path")


def _sheet_sep(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".txt"):
        return "\t"
    if suffix == ".csv":
        return ","
    raise ConfigError(f"sample sheet {path}: unknown extension {path.suffix!r}; use .tsv or .csv")


def read_sample_table(path: str | os.PathLike):
    """Read a sample sheet as written, without checks beyond the format.

    Returns
    -------
    pandas.DataFrame
        Columns as in the file; ``slide_id``/``path`` as ``str``, ``mpp`` as ``float64``
        (NaN where empty). Blank lines and lines starting with ``#`` are skipped;
        ``df.attrs["lines"]`` holds the file line number of each row (for messages).

    Raises
    ------
    ConfigError
        Missing/unreadable file, unknown extension, ragged rows or a non-numeric ``mpp``
        (naming the line).
    """
    import csv

    import pandas as pd

    path = Path(path)
    sep = _sheet_sep(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"sample sheet {path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"sample sheet {path}: cannot read ({exc})") from None
    numbered = [(i + 1, ln) for i, ln in enumerate(text.splitlines()) if ln.strip() and not ln.lstrip().startswith("#")]
    if not numbered:
        raise ConfigError(f"sample sheet {path}: empty (expected a header: slide_id, path[, mpp])")
    rows = list(csv.reader([ln for _, ln in numbered], delimiter=sep))
    header = [c.strip() for c in rows[0]]
    records, lines = [], []
    for (lineno, _), row in zip(numbered[1:], rows[1:]):
        if len(row) > len(header):
            raise ConfigError(f"sample sheet {path} line {lineno}: {len(row)} fields but {len(header)} columns in the header")
        row = [c.strip() for c in row] + [""] * (len(header) - len(row))
        records.append(dict(zip(header, row)))
        lines.append(lineno)
    df = pd.DataFrame(records, columns=header, dtype=object)
    if "mpp" in df.columns:
        values = []
        for lineno, text_value in zip(lines, df["mpp"]):
            try:
                values.append(float(text_value) if text_value != "" else math.nan)
            except ValueError:
                raise ConfigError(
                    f"sample sheet {path} line {lineno}: column 'mpp' must be a number, got {text_value!r}"
                ) from None
        df["mpp"] = pd.Series(values, index=df.index, dtype="float64")
    df.attrs["lines"] = lines
    return df


def check_columns(df, sheet: str | os.PathLike) -> None:
    """Raise :class:`ConfigError` for unknown or missing sample-sheet columns."""
    where = f"sample sheet {sheet}"
    unknown = [c for c in df.columns if c not in SAMPLE_COLUMNS]
    if unknown:
        raise ConfigError(
            f"{where}: unknown column(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(SAMPLE_COLUMNS)}"
        )
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ConfigError(f"{where}: missing column(s) {', '.join(map(repr, missing))}")
    if len(df) == 0:
        raise ConfigError(f"{where}: no slides listed")


def _line_numbers(df) -> list[int]:
    return list(df.attrs.get("lines") or range(2, len(df) + 2))


def check_sample_table(df, sheet: str | os.PathLike, *, check_files: bool = True):
    """Check a table from :func:`read_sample_table` and resolve its paths.

    Parameters
    ----------
    df : pandas.DataFrame
        As returned by :func:`read_sample_table` (not modified).
    sheet : path
        The sheet file: names it in errors; relative slide paths are resolved against its directory.
    check_files : bool
        Require every slide file to exist.

    Returns
    -------
    pandas.DataFrame
        Index ``slide_id`` (sorted), columns ``path`` (absolute ``str``) and ``mpp`` (float64, NaN = from
        the slide's metadata).

    Raises
    ------
    ConfigError
        Unknown/missing columns, empty sheet, empty/unsafe/duplicate ``slide_id``, empty ``path``,
        non-positive ``mpp`` or a missing slide file; the message names the sheet, line and column.
    """
    import pandas as pd

    sheet = Path(sheet)
    check_columns(df, sheet)
    base = sheet.resolve().parent
    seen: dict[str, int] = {}
    rows = []
    for lineno, rec in zip(_line_numbers(df), df.to_dict("records")):
        line = f"sample sheet {sheet} line {lineno}"
        sid = rec["slide_id"]
        if not sid:
            raise ConfigError(f"{line}: column 'slide_id' is empty")
        try:
            check_slide_id(sid)
        except InputError as exc:
            raise ConfigError(f"{line}: column 'slide_id': {exc}") from None
        if sid in seen:
            raise ConfigError(f"{line}: column 'slide_id': duplicate id {sid!r} (first on line {seen[sid]})")
        seen[sid] = lineno
        if not rec["path"]:
            raise ConfigError(f"{line}: column 'path' is empty")
        slide = Path(os.path.expanduser(rec["path"]))
        if not slide.is_absolute():
            slide = base / slide
        slide = Path(os.path.normpath(slide))
        if check_files and not slide.is_file():
            raise ConfigError(f"{line}: column 'path': slide file not found: {slide}")
        mpp = rec.get("mpp", math.nan)
        if mpp is not None and not math.isnan(mpp) and not (mpp > 0 and math.isfinite(mpp)):
            raise ConfigError(f"{line}: column 'mpp' must be > 0, got {mpp}")
        rows.append({"slide_id": sid, "path": str(slide), "mpp": math.nan if mpp is None else float(mpp)})
    out = pd.DataFrame(rows, columns=["slide_id", "path", "mpp"]).set_index("slide_id").sort_index()
    out["mpp"] = out["mpp"].astype("float64")
    return out


def validate_rows(df, schema: dict, sheet: str | os.PathLike) -> None:
    """Validate each row of ``df`` against a JSON schema for one record (``samples.schema.yaml``).

    Raises
    ------
    ConfigError
        For the first invalid row, naming the sheet, the line and the column.
    """
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema)
    for lineno, rec in zip(_line_numbers(df), df.to_dict("records")):
        rec = {k: v for k, v in rec.items() if not (isinstance(v, float) and math.isnan(v))}
        error = jsonschema.exceptions.best_match(validator.iter_errors(rec))
        if error is not None:
            column = ".".join(str(p) for p in error.absolute_path)
            what = f"column {column!r}: " if column else ""
            raise ConfigError(f"sample sheet {sheet} line {lineno}: {what}{error.message}")


def read_sample_sheet(path: str | os.PathLike, *, schema: dict | None = None, check_files: bool = True):
    """Read, validate and resolve a sample sheet (see the module docstring for the format).

    Parameters
    ----------
    path : path
        TSV/CSV sample sheet.
    schema : dict, optional
        JSON schema of one row (``workflows/schemas/samples.schema.yaml``), checked first.
    check_files : bool
        Require every slide file to exist.

    Returns
    -------
    pandas.DataFrame
        Index ``slide_id`` (sorted), columns ``path`` (absolute str) and ``mpp`` (float64, NaN if unset).

    Raises
    ------
    ConfigError
        Any problem, as one line naming the sheet, line and column.
    """
    df = read_sample_table(path)
    check_columns(df, path)
    if schema is not None:
        validate_rows(df, schema, path)
    return check_sample_table(df, path, check_files=check_files)
