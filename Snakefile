# cellsam cohort workflow: whole-slide nucleus segmentation for every slide of a sample sheet.
#
#   snakemake --cores 4 --keep-going                       # local, workflows/config/config.yaml
#   snakemake --profile workflows/profiles/slurm           # SLURM cluster
#
# Per slide: check -> tile -> infer (GPU) -> export; then one cohort summary/report.
# Slides that fail `cellsam check` are listed as failed in the report; if a later job fails,
# the onerror handler still writes the report. See docs/workflow.md.


configfile: "workflows/config/config.yaml"


include: "workflows/rules/common.smk"
include: "workflows/rules/slide.smk"


rule all:
    input:
        all_inputs,
    default_target: True


onerror:
    run_cohort_after_error()
