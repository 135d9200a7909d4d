# Helpers of the cohort workflow: config + sample-sheet validation and artifact names.
# All names come from pipeline.paths.SlidePaths (results) and pipeline.cohort.CohortLayout
# (status, logs, benchmarks, cohort report); all defaults from the schema (== pipeline/config.py).

import json
import os
import re
import shlex
from pathlib import Path

import yaml
import jsonschema
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from pipeline.cohort import CohortLayout, report_paths
from pipeline.samples import read_sample_sheet
from pipeline.errors import ConfigError


SCHEMAS = Path(workflow.current_basedir) / ".." / "schemas"

# The checkout this workflow runs from: workflows/envs/cellsam.post-deploy.sh installs it into the
# rules' conda env (--sdm conda). Snakemake copies env files into .snakemake/conda/, so the env
# file itself cannot name the repository by a relative path.
os.environ.update(CELLSAM_REPO=str(Path(workflow.basedir).resolve()))  # set, not read: no envvars:


def load_schema(name):
    with open(SCHEMAS / name, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def check_config(cfg):
    """One-line ConfigError naming the first offending key (snakemake's own message is a schema dump)."""
    error = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(load_schema("config.schema.yaml")).iter_errors(cfg)
    )
    if error is not None:
        key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        raise ConfigError(f"invalid workflow config: {key}: {error.message}")


check_config(config)
validate(config, schema="../schemas/config.schema.yaml")  # same schema; fills in the defaults

# index slide_id (sorted), columns path (absolute), mpp (NaN = from the slide's metadata)
SAMPLES = read_sample_sheet(config["samples"], schema=load_schema("samples.schema.yaml"))
SLIDE_IDS = list(SAMPLES.index)

OUT = Path(config["output_dir"])
LAYOUT = CohortLayout(OUT)
REPORT = report_paths(LAYOUT.prefix)
W = "{slide}"  # wildcard placeholder used to turn the path helpers into patterns


def slide_file(name):
    """Pattern of a per-slide artifact, e.g. slide_file("geojson_gz") -> results/{slide}.geojson.gz."""
    return str(getattr(LAYOUT.slide(W), name))


def log_file(stage):
    return str(LAYOUT.log(stage, W))


def cohort_log(name="cohort"):
    return str(LAYOUT.logs_dir / f"{name}.log")


def benchmark_file(stage):
    return str(LAYOUT.benchmark(stage, W))


def status_file(slide_id=W):
    return str(LAYOUT.status(slide_id))


def maybe_temp(path):
    """Intermediate stores are temp() (deleted after export) unless keep_stores is set."""
    return path if config["keep_stores"] else temp(path)


def export_outputs():
    names = ["geojson_gz", "parquet", "summary", "qc_png"]
    if config["export"]["geojson_plain"]:
        names.append("geojson")
    return {name: slide_file(name) for name in names}


def export_flags():
    """Flags of `cellsam export` from the config's ``export`` section."""
    flags = ["--geojson-plain"] if config["export"]["geojson_plain"] else []
    if config["export"].get("cell_expansion_um", 0):
        flags.append(f"--cell-expansion-um {float(config['export']['cell_expansion_um'])!r}")
    if config["export"].get("reject_threshold") is not None:
        flags.append(f"--reject-threshold {float(config['export']['reject_threshold'])!r}")
    return " ".join(flags)


def slide_path(wildcards):
    return SAMPLES.loc[wildcards.slide, "path"]


def slide_mpp_flag(wildcards):
    mpp = SAMPLES.loc[wildcards.slide, "mpp"]
    return "" if mpp != mpp else f"--slide-mpp {float(mpp)!r}"  # NaN -> no override


def infer_flags():
    cfg = config["infer"]
    flags = [f"--device {cfg['device']}", f"--engine {cfg['engine']}", f"--precision {cfg['precision']}",
             f"--batch-size {cfg['batch_size']}", f"--halo {cfg['halo_px']}",
             f"--tissue-margin {cfg['tissue_margin_px']}"]
    if not cfg["crop_to_tissue"]:
        flags.append("--no-tissue-crop")
    if cfg["model"] is not None:
        flags.append(f"--model {shlex.quote(cfg['model'])}")
    if cfg["refine"]:
        flags.append("--refine")
    if cfg["teacher"] is not None:
        flags.append(f"--teacher {shlex.quote(cfg['teacher'])}")
    if cfg.get("min_score") is not None:
        flags.append(f"--min-score {float(cfg['min_score'])!r}")
    if cfg["scheduler"] is not None:
        flags.append(f"--scheduler {shlex.quote(cfg['scheduler'])}")
    return " ".join(flags)


def infer_gpus():
    """gpu=1 unless the device is cpu or a dask scheduler does the work: bounds concurrent GPU jobs
    (--resources gpu=N) and asks SLURM for one (profiles may override)."""
    cfg = config["infer"]
    return 0 if cfg["device"] == "cpu" or cfg["scheduler"] is not None else 1


def known_status(slide_id):
    """The slide's check status if its status file exists and is newer than the slide, else None."""
    status = Path(status_file(slide_id))
    slide = Path(SAMPLES.loc[slide_id, "path"])
    if not (status.is_file() and status.stat().st_mtime >= slide.stat().st_mtime):
        return None
    try:
        with open(status, encoding="utf-8") as fh:
            return bool(json.load(fh).get("ok"))
    except (OSError, ValueError, AttributeError):  # unreadable status: let the checkpoint decide
        return None


def check_passed(slide_id):
    """True if the slide's `cellsam check` status (written by the checkpoint) says it is readable.

    An up-to-date status file is read directly; only a missing or stale one goes through
    ``checkpoints.check.get``, which defers the decision until the check has run.
    """
    ok = known_status(slide_id)
    if ok is None:
        path = checkpoints.check.get(slide=slide_id).output.status
        try:
            with open(path, encoding="utf-8") as fh:
                ok = bool(json.load(fh).get("ok"))
        except (OSError, ValueError, AttributeError) as exc:
            raise WorkflowError(f"{path}: unreadable check status ({exc}); delete it to re-check the slide")
    return ok


def slide_finals(slide_ids):
    return [path.format(slide=sid) for sid in slide_ids for path in export_outputs().values()]


def cohort_inputs(wildcards):
    """Status of every slide, plus the final outputs of the slides whose check passed.

    A slide that fails its check contributes only its status file (the cohort lists it as failed),
    so one unreadable slide never blocks the cohort summary.
    """
    passed = [sid for sid in SLIDE_IDS if check_passed(sid)]
    return {"status": [status_file(s) for s in SLIDE_IDS], "finals": slide_finals(passed)}


def all_inputs(wildcards):
    """Default target: every status file (so all checks start at once), the cohort report, and
    the finals of the slides already known to pass their check. Those finals are targets
    themselves so that deleting one reruns its slide: snakemake does not rebuild a missing
    intermediate file whose consumer (the cohort report) is up to date. No checkpoint here:
    on a first run the cohort rule pulls in the finals once the checks have run."""
    known = [sid for sid in SLIDE_IDS if known_status(sid)]
    return [status_file(s) for s in SLIDE_IDS] + [str(p) for p in REPORT.values()] + slide_finals(known)


def run_cohort_after_error():
    """onerror: write the cohort report anyway, listing the slides whose jobs failed (and why)."""
    if not LAYOUT.status_dir.is_dir():
        return
    q = shlex.quote
    cmd = (
        f"cellsam cohort --results {q(str(OUT))} --samples {q(config['samples'])}"
        f" --status-dir {q(str(LAYOUT.status_dir))} --logs {q(str(LAYOUT.logs_dir))}"
        f" --benchmarks {q(str(LAYOUT.benchmarks_dir))} -o {q(str(LAYOUT.prefix))}"
    )
    try:
        LAYOUT.logs_dir.mkdir(parents=True, exist_ok=True)
        shell(f"{cmd} > {q(cohort_log('cohort.onerror'))} 2>&1")
        logger.warning(f"some jobs failed; the cohort report lists them: {REPORT['html']}")
    except Exception as exc:  # the report is best effort; the run has already failed
        logger.warning(f"could not write the cohort report after the error: {exc}")
