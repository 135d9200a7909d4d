#!/usr/bin/env bash
# Unattended GPU benchmark: end-to-end `cellsam segment` on the 10k² and 30k² benchmark slides
# (100k² with SIZES=10000,30000,100000) with --device cuda and a larger batch, GPU busy % sampled
# with nvidia-smi, stitch + export at 1 M nuclei, forward throughput on the GPU.
#
# Usage (repository root):  bash benchmarks/gpu_run.sh
# Environment:
#   PYTHON      interpreter with the pipeline installed (default: .venv/bin/python, else python3)
#   OUT         result folder (default: benchmarks/results); writes $OUT/gpu.json, gpu.md, gpu.log
#   SIZES       slide edges (default: 10000,30000)
#   MODEL       default | classical | checkpoint path (default: default = shipped weights)
#   BATCH       tiles per forward pass (default: 16)
#   WORKERS     dask threads feeding the GPU (default: number of CPU cores, at most 8)
#   NUCLEI      stitch+export size (default: 1000000; 0 skips)
#   SHARED      real data folder (default: ../shared/data) for the slide generator
set -euo pipefail

cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT="${OUT:-benchmarks/results}"
SIZES="${SIZES:-10000,30000}"
MODEL="${MODEL:-default}"
BATCH="${BATCH:-16}"
NCPU="$(nproc)"
WORKERS="${WORKERS:-$(( NCPU < 8 ? NCPU : 8 ))}"
NUCLEI="${NUCLEI:-1000000}"
if [[ -n "${SHARED:-}" ]]; then export CELLSAM_SHARED_DATA="$SHARED"; fi
mkdir -p "$OUT"

if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu_run.sh: error: nvidia-smi not found (no NVIDIA GPU here); use benchmarks/run.py for CPU" >&2
    exit 2
fi
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_run.sh: error: torch sees no CUDA device ($PYTHON)" >&2
    exit 2
fi

{
    echo "== $(date -u +%FT%TZ) $(hostname)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,utilization.gpu --format=csv
    "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
} 2>&1 | tee "$OUT/gpu.log"

# The slides are generated on the CPU first (cached in benchmarks/data), so that generation does not
# overlap the measured runs.
IFS=',' read -ra SIZE_LIST <<< "$SIZES"
for s in "${SIZE_LIST[@]}"; do
    "$PYTHON" benchmarks/make_slide.py --size "$s" 2>&1 | tee -a "$OUT/gpu.log"
done

"$PYTHON" benchmarks/run.py \
    --device cuda \
    --sizes "$SIZES" \
    --model "$MODEL" \
    --batch-size "$BATCH" \
    --workers "$WORKERS" \
    --fwd-batch "$BATCH" \
    --threads "$WORKERS" \
    --nuclei "$NUCLEI" \
    --note "gpu_run.sh: batch $BATCH, $WORKERS workers, $NCPU CPU cores" \
    --out "$OUT/gpu.json" 2>&1 | tee -a "$OUT/gpu.log"
echo "gpu_run.sh: results in $OUT/gpu.json and $OUT/gpu.md"
