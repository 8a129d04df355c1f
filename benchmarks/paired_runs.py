"""Two RL models of two pipeline runs, paired on the same held-out prompts: the
difference of their model-free refusal rates per prompt set, with a paired
bootstrap 95% interval (`evaluation.intervals.paired`), from each run's stage-8
results.json (never typed in).

  python -m benchmarks.paired_runs --a=runs/cai8:rl_cai --b=runs/cai7:rl_cai \\
      --out=benchmarks/results/paired_run8_vs_run7.json

`--measure=pm_reward` pairs two models of one run by its stage-6 PM's reward for their
answers (stage 8's `measures.pm_reward`, or for runs from before it the PM's game rows
in comparisons.jsonl): did PPO gain the reward it maximised, on prompts it never saw?

  python -m benchmarks.paired_runs --measure=pm_reward --a=runs/cai7:rl_cai \\
      --b=runs/cai7:sl_cai

Runs whose stages 1-4 reproduce each other (the same seed and preset) ask the same
prompts; only prompts both models answered are paired.
"""

from __future__ import annotations

import json
import types

from absl import app, flags

from cai_jax import paths
from cai_jax.evaluation import intervals, judges, refusal

FLAGS = flags.FLAGS


def define_flags() -> None:
  """At run time, not import time: tests import this module beside other benchmarks
  whose absl flags share names."""
  flags.DEFINE_string("a", None, "workdir:model", required=True)
  flags.DEFINE_string("b", None, "workdir:model", required=True)
  flags.DEFINE_enum("measure", "refusal", ["refusal", "pm_reward"],
                    "refusal: the model-free refusal measure (1 = refuses); pm_reward: the"
                    " run's PM reward (both models of one run).")
  flags.DEFINE_string("out", "", "Write the result as JSON here too.")
  flags.DEFINE_integer("seed", 0, "Bootstrap seed.")



KEYS = {"refusal": "refusal_rate", "pm_reward": "pm_reward"}


def refusals(spec: str) -> tuple[dict[str, bool], dict[str, tuple[str, str]]]:
  workdir, model = spec.rsplit(":", 1)
  with open(paths.results_file(workdir)) as f:
    m = json.load(f)["measures"]
  return ({i: c in refusal.REFUSING for i, c in m["refusal"][model].items()},
          {i: tuple(k) for i, k in m["kinds"].items()})


def pm_rewards(spec: str) -> tuple[dict[str, float], dict[str, tuple[str, str]]]:
  workdir, model = spec.rsplit(":", 1)
  with open(paths.results_file(workdir)) as f:
    m = json.load(f)["measures"]
  if m.get("pm_reward"):
    return m["pm_reward"][model], {i: tuple(k) for i, k in m["kinds"].items()}
  reward = {}
  path = paths.comparisons_file(workdir)
  with open(path) as f:
    for line in f:
      r = json.loads(line)
      for side in "ab":
        if r["judge"] == "pm" and r[side] == model:
          reward[r["id"]] = r[f"reward_{side}"]
  if not reward:
    raise ValueError(f"{path}: no PM rewards for model {model!r}")
  return reward, {i: tuple(k) for i, k in m["kinds"].items()}


def compare(a: str, b: str, seed: int, measure: str = "refusal") -> dict:
  if measure == "pm_reward" and a.rsplit(":", 1)[0] != b.rsplit(":", 1)[0]:
    raise ValueError(f"--measure=pm_reward pairs two models of one run (one PM); got {a}, {b}")
  read = refusals if measure == "refusal" else pm_rewards
  ra, kinds = read(a)
  rb, _ = read(b)
  out = {"a": a, "b": b, "measure": measure, "sets": {}}
  for name, pick in judges.REFUSAL_PREFERENCE_SETS:  # stage 8's prompt sets
    ids = sorted(i for i in ra if i in rb and pick(
        types.SimpleNamespace(kind=kinds[i][0], split=kinds[i][1])))
    if not ids:
      continue  # stage 8 scores held-out answers with the PM, not the borderline set
    est = intervals.paired([float(ra[i]) for i in ids], [float(rb[i]) for i in ids], seed=seed)
    out["sets"][name] = {f"{KEYS[measure]}_difference_a_minus_b": est.as_dict()}
  if measure == "pm_reward":
    ids = sorted(i for i in ra if i in rb and kinds[i][1] == "held_out")
    out["sets"]["held_out"] = {"pm_reward_difference_a_minus_b": intervals.paired(
        [ra[i] for i in ids], [rb[i] for i in ids], seed=seed).as_dict()}
  return out


def main(argv):
  del argv
  result = compare(FLAGS.a, FLAGS.b, FLAGS.seed, FLAGS.measure)
  for name, v in result["sets"].items():
    e = intervals.Estimate.from_dict(v[f"{KEYS[FLAGS.measure]}_difference_a_minus_b"])
    print(f"{name}: {KEYS[FLAGS.measure]} {FLAGS.a} - {FLAGS.b} = {e}")
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
