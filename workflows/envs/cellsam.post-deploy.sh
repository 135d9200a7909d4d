#!/usr/bin/env bash
# Runs once inside the new conda env of workflows/envs/cellsam.yaml (Snakemake's post-deploy hook):
# installs the cellsam package, with the shipped model (package data), from the checkout the
# workflow runs from. workflows/rules/common.smk sets CELLSAM_REPO to that checkout. Editable, so
# the env follows the checkout; the dependencies are already in the env (--no-deps).
set -euo pipefail
: "${CELLSAM_REPO:?not set: run snakemake on the cellsam Snakefile (workflows/rules/common.smk sets it)}"
python -m pip install --no-deps -e "$CELLSAM_REPO"
cellsam --version
