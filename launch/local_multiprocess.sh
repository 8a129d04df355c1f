#!/usr/bin/env bash
# N processes on this machine (CPU devices): the multi-host code path without
# a cluster, as the tests run it.
#   N=2 WORKDIR=/tmp/cai CONFIG=configs/pipeline.py:tiny bash launch/local_multiprocess.sh
source "$(dirname "$0")/common.sh"
N="${N:-2}"
PORT="${PORT:-12355}"
export XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-4}"
pids=()
for ((i = 0; i < N; i++)); do
  python -m "$(module_for_stage)" --config="$CONFIG" --workdir="$WORKDIR" --distributed=on \
    --coordinator_address="localhost:$PORT" --num_processes="$N" --process_id="$i" "$@" &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
