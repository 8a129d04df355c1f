#!/usr/bin/env bash
# One GPU, one process.
#   WORKDIR=runs/cai CONFIG=configs/pipeline.py:full bash launch/gpu_single.sh [extra flags]
# Needs: pip install -e . "jax[cuda12]"
source "$(dirname "$0")/common.sh"
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
exec python -m "$(module_for_stage)" --config="$CONFIG" --workdir="$WORKDIR" --distributed=off "$@"
