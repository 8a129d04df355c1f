"""The absl entry point every phase shares: --config=<file>[:variant] --workdir=<dir>.

Flags are defined only in the process that runs a phase, so phase modules
import each other freely.
"""

from collections.abc import Callable

from absl import app, flags
from ml_collections import config_flags


def main(run: Callable) -> None:
  config = config_flags.DEFINE_config_file("config", None, "Phase config file[:variant].")
  workdir = flags.DEFINE_string("workdir", None, "Pipeline working directory.", required=True)

  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if config.value is None:
      raise app.UsageError("--config is required, e.g. --config=configs/sft.py:cpu")
    result = run(config.value, workdir.value)
    if result is not None:
      print(result)

  app.run(_main)
