"""Two RL models of two pipeline runs, paired on the same held-out prompts: the
difference of their model-free refusal rates per prompt set, with a paired
bootstrap 95% interval (`evaluation.intervals.paired`), from each run's stage-8
results.json (never typed in).

With `measure="pm_reward"`, two models of one run are paired by its stage-6 PM's reward
for their answers (stage 8's `measures.pm_reward`, or for runs from before it the PM's
game rows in comparisons.jsonl): did PPO gain the reward it maximised, on prompts it
never saw?

Runs whose stages 1-4 reproduce each other (the same seed and preset) ask the same
prompts; only prompts both models answered are paired. A model is named
"<workdir>:<model>" (e.g. "runs/cai8:rl_cai").
"""

from __future__ import annotations

import json
import types

from cai_jax import paths
from cai_jax.evaluation import intervals, judges, refusal

KEYS = {"refusal": "refusal_rate", "pm_reward": "pm_reward"}


def refusals(spec: str) -> tuple[dict[str, bool], dict[str, tuple[str, str]]]:
  """{prompt id: the model refuses} and {prompt id: (kind, split)} of "<workdir>:<model>"."""
  workdir, model = spec.rsplit(":", 1)
  with open(paths.results_file(workdir)) as f:
    m = json.load(f)["measures"]
  return ({i: c in refusal.REFUSING for i, c in m["refusal"][model].items()},
          {i: tuple(k) for i, k in m["kinds"].items()})


def pm_rewards(spec: str) -> tuple[dict[str, float], dict[str, tuple[str, str]]]:
  """{prompt id: the run's PM reward for the model's answer} and {prompt id: (kind, split)}."""
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
  """Model a minus model b per prompt set of stage 8 (and, for the PM reward, on all
  held-out prompts), each a paired bootstrap estimate."""
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
