"""`cellsam cohort`: one table + report over the per-slide results of a cohort."""

from __future__ import annotations


def register(sub):
    p = sub.add_parser(
        "cohort",
        help="summarise a cohort: table (CSV + parquet), PNG plots and an HTML report",
        description=(
            "Summarise the per-slide results of a cohort (one row per slide of the sample sheet, sorted "
            "by slide_id) and list the failed slides with their reason. Writes PREFIX.csv, PREFIX.parquet, "
            "PREFIX.png and PREFIX.html."
        ),
    )
    p.add_argument("--results", required=True, metavar="OUTDIR", help="directory with the per-slide outputs")
    p.add_argument("--samples", required=True, metavar="SHEET", help="sample sheet (TSV/CSV: slide_id, path[, mpp])")
    p.add_argument("--status-dir", metavar="DIR", help="`cellsam check` status files (default: OUTDIR/status if present)")
    p.add_argument("--logs", metavar="DIR", help="per-stage job logs DIR/<stage>/<id>.log (default: OUTDIR/logs if present)")
    p.add_argument("--benchmarks", metavar="DIR", help="Snakemake benchmark files (default: OUTDIR/benchmarks if present)")
    p.add_argument("-o", "--output", required=True, metavar="PREFIX", help="output prefix, e.g. results/cohort")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ..cohort import CohortLayout, run_cohort
    from ..errors import InputError

    results = Path(args.results)
    if not results.is_dir():
        raise InputError(f"results directory not found: {results}")
    layout = CohortLayout(results)

    def pick(given, default):
        if given is not None:
            return Path(given)
        return default if default.is_dir() else None

    table = run_cohort(
        results,
        args.samples,
        args.output,
        status_dir=pick(args.status_dir, layout.status_dir),
        logs_dir=pick(args.logs, layout.logs_dir),
        benchmarks_dir=pick(args.benchmarks, layout.benchmarks_dir),
    )
    return 0 if len(table) else 1
