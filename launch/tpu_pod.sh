#!/usr/bin/env bash
# A TPU VM pod slice: the same command on every worker; jax.distributed finds
# the other workers from the TPU metadata. WORKDIR must be shared (a GCS
# bucket path works for Orbax checkpoints and a mounted filesystem for records).
#   TPU=my-v5e-32 ZONE=us-west4-a WORKDIR=/mnt/shared/runs/cai bash launch/tpu_pod.sh
# Needs on every worker: the repo checked out at the same path, and
#   pip install -e . "jax[tpu]"
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR}"
REPO="${REPO:-~/cai_jax}"
CONFIG="${CONFIG:-configs/pipeline.py:full}"
STAGE="${STAGE:-pipeline}"
MODULE=$([[ "$STAGE" == "pipeline" ]] && echo cai_jax.pipeline || echo "cai_jax.$STAGE")
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command \
  "cd $REPO && python -m $MODULE --config=$CONFIG --workdir=$WORKDIR --distributed=on $*"
