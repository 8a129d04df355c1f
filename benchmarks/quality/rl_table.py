"""Which stage-7 algorithm and reward moved harmlessness most per minute, at what KL:
one row per RL model a pipeline run trained and stage 8 evaluated
(`cai_jax.evaluation.rl_table`: what each column is and where it is read from).

  python -m benchmarks.quality.rl_table --workdir=runs/cai
  # -> benchmarks/results/cpu/rl_table.json
  python -m benchmarks.quality.rl_table --merge=/tmp/rl_table_a.json,/tmp/rl_table_b.json

`--merge` prints one table from several runs' `--out` files (every algorithm and reward
tried, side by side), each row named by its run and the settings that differ between
runs (stage 5's label temperature, stage 7's lr).
"""

from __future__ import annotations

import os

from absl import app, flags

from benchmarks.common import outputs
from cai_jax.evaluation import rl_table

_WORKDIR = flags.DEFINE_string("workdir", "runs/cai", "A pipeline workdir whose stage 8 has run.")
_OUT = flags.DEFINE_string("out", "", "Write the rows as JSON here too (default:"
                           " benchmarks/results/<machine>/rl_table.json).")
_MERGE = flags.DEFINE_list("merge", [], "rl_table JSON files (from --out) to print as one"
                           " table instead of reading --workdir.")


def main(argv):
  del argv
  if _MERGE.value:
    print(rl_table.markdown(rl_table.merged(_MERGE.value)))
    return
  table = rl_table.rows(_WORKDIR.value)
  print(rl_table.markdown(table))
  print(outputs.write(outputs.path("rl_table", _OUT.value),
                      {"workdir": os.path.abspath(_WORKDIR.value), "rows": table}))


if __name__ == "__main__":
  app.run(main)
