"""Two RL models of two pipeline runs, paired on the same held-out prompts: the
difference of their model-free refusal rates per prompt set, with a paired
bootstrap 95% interval (`cai_jax.evaluation.paired_runs`).

  python -m benchmarks.quality.paired_runs --a=runs/cai8:rl_cai --b=runs/cai7:rl_cai
  # -> benchmarks/results/cpu/paired_runs.json

`--measure=pm_reward` pairs two models of one run by its stage-6 PM's reward for their
answers: did PPO gain the reward it maximised, on prompts it never saw?

  python -m benchmarks.quality.paired_runs --measure=pm_reward --a=runs/cai7:rl_cai \\
      --b=runs/cai7:sl_cai --out=/tmp/pm_gain.json
"""

from __future__ import annotations

from absl import app, flags

from benchmarks.common import outputs
from cai_jax.evaluation import intervals, paired_runs

_A = flags.DEFINE_string("a", None, "workdir:model", required=True)
_B = flags.DEFINE_string("b", None, "workdir:model", required=True)
_MEASURE = flags.DEFINE_enum("measure", "refusal", ["refusal", "pm_reward"],
                             "refusal: the model-free refusal measure (1 = refuses); pm_reward:"
                             " the run's PM reward (both models of one run).")
_OUT = flags.DEFINE_string("out", "", "Write the result as JSON here too (default:"
                           " benchmarks/results/<machine>/paired_runs.json).")
_SEED = flags.DEFINE_integer("seed", 0, "Bootstrap seed.")


def main(argv):
  del argv
  result = paired_runs.compare(_A.value, _B.value, _SEED.value, _MEASURE.value)
  key = paired_runs.KEYS[_MEASURE.value]
  for name, v in result["sets"].items():
    e = intervals.Estimate.from_dict(v[f"{key}_difference_a_minus_b"])
    print(f"{name}: {key} {_A.value} - {_B.value} = {e}")
  print(outputs.write(outputs.path("paired_runs", _OUT.value), result))


if __name__ == "__main__":
  app.run(main)
