"""Two RL models of two pipeline runs, paired on the same held-out prompts: the
difference of their model-free refusal rates per prompt set, with a paired
bootstrap 95% interval (`evaluation.intervals.paired`), from each run's stage-8
results.json (never typed in).

  python -m benchmarks.paired_runs --a=runs/cai8:rl_cai --b=runs/cai7:rl_cai \\
      --out=benchmarks/results/paired_run8_vs_run7.json

Runs whose stages 1-4 reproduce each other (the same seed and preset) ask the same
prompts; only prompts both models answered are paired.
"""

from __future__ import annotations

import json
import types

from absl import app, flags

from cai_jax.evaluation import intervals, judges, refusal
from cai_jax.phases import paths

FLAGS = flags.FLAGS


def define_flags() -> None:
  """At run time, not import time: tests import this module beside other benchmarks
  whose absl flags share names."""
  flags.DEFINE_string("a", None, "workdir:model", required=True)
  flags.DEFINE_string("b", None, "workdir:model", required=True)
  flags.DEFINE_string("out", "", "Write the result as JSON here too.")
  flags.DEFINE_integer("seed", 0, "Bootstrap seed.")



def refusals(spec: str) -> tuple[dict[str, bool], dict[str, tuple[str, str]]]:
  workdir, model = spec.rsplit(":", 1)
  with open(paths.results_file(workdir)) as f:
    m = json.load(f)["measures"]
  return ({i: c in refusal.REFUSING for i, c in m["refusal"][model].items()},
          {i: tuple(k) for i, k in m["kinds"].items()})


def compare(a: str, b: str, seed: int) -> dict:
  ra, kinds = refusals(a)
  rb, _ = refusals(b)
  out = {"a": a, "b": b, "sets": {}}
  for name, pick in judges.REFUSAL_PREFERENCE_SETS:  # stage 8's prompt sets
    ids = sorted(i for i in ra if i in rb and pick(
        types.SimpleNamespace(kind=kinds[i][0], split=kinds[i][1])))
    est = intervals.paired([float(ra[i]) for i in ids], [float(rb[i]) for i in ids], seed=seed)
    out["sets"][name] = {"refusal_rate_difference_a_minus_b": est.as_dict()}
  return out


def main(argv):
  del argv
  result = compare(FLAGS.a, FLAGS.b, FLAGS.seed)
  for name, v in result["sets"].items():
    e = v["refusal_rate_difference_a_minus_b"]
    print(f"{name}: refusal rate {FLAGS.a} - {FLAGS.b} = {e['estimate']:+.3f} "
          f"[{e['ci95'][0]:+.3f}, {e['ci95'][1]:+.3f}] (n={e['n']})")
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
