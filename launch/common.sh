# Sourced by the launch scripts: environment every run shares.
#
# CAI_DETERMINISTIC=1 makes GPU runs bit-reproducible: XLA picks deterministic
# kernels (scatter-add, reductions, cuDNN algorithms), at some speed cost.
# TPU and CPU runs are deterministic for a fixed mesh without it.
set -euo pipefail
STAGE="${STAGE:-pipeline}"      # pipeline, or one stage: phases.p3_sft, ...
CONFIG="${CONFIG:-configs/pipeline.py:full}"
WORKDIR="${WORKDIR:?set WORKDIR to the run directory (shared by all hosts)}"
if [[ "${CAI_DETERMINISTIC:-0}" == "1" ]]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_deterministic_ops=true --xla_gpu_exclude_nondeterministic_ops=true"
  export TF_CUDNN_DETERMINISTIC=1
fi
# Let JAX take most of the GPU memory up front (default 75%).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
module_for_stage() {
  if [[ "$STAGE" == "pipeline" ]]; then echo cai_jax.pipeline; else echo "cai_jax.$STAGE"; fi
}
