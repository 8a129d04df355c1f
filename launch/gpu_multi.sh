#!/usr/bin/env bash
# Several GPUs on one host: one process drives all of them; the mesh in the
# config spreads work over them (e.g. --config.sft.mesh='(1,-1,1)' for FSDP).
#   WORKDIR=runs/cai bash launch/gpu_multi.sh --config.sft.mesh='(1,-1,1)'
# Needs: pip install -e . "jax[cuda12]"
source "$(dirname "$0")/common.sh"
python -c "import jax; print('devices:', jax.devices())"
exec python -m "$(module_for_stage)" --config="$CONFIG" --workdir="$WORKDIR" --distributed=off "$@"
