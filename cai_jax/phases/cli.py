"""The absl entry point every phase shares: --config=<file>[:variant] --workdir=<dir>.

Flags are defined only in the process that runs a phase, so phase modules
import each other freely.
"""

from collections.abc import Callable

from absl import app, flags
from ml_collections import config_flags

from cai_jax import distributed


def main(run: Callable) -> None:
  config = config_flags.DEFINE_config_file("config", None, "Phase config file[:variant].")
  workdir = flags.DEFINE_string("workdir", None, "Pipeline working directory.", required=True)
  mode = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                           "Multi-process JAX: auto-detects TPU pods and SLURM.")
  coordinator = flags.DEFINE_string("coordinator_address", None,
                                    "host:port of process 0 (explicit multi-process).")
  num_processes = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
  process_id = flags.DEFINE_integer("process_id", None, "This process's index.")

  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if config.value is None:
      raise app.UsageError("--config is required, e.g. --config=configs/sft.py:cpu")
    distributed.initialize(mode.value, coordinator.value, num_processes.value,
                           process_id.value)
    result = run(config.value, workdir.value)
    if result is not None and distributed.is_leader():
      print(result)

  app.run(_main)
