"""Does the stage-6 PM prefer a flat refusal to a model's own answer, per prompt set?

Stage 8 measures this for SL-CAI (results.json `pm_refusal_preference`, the report's
"Signals by stage"); this script measures it on a workdir whose stage 8 ran before
stage 8 did, and for every evaluated model, with the same library function
(`evaluation.judges.refusal_preference`) on stage 8's stored answers.

  python -m benchmarks.quality.pm_refusal_preference --workdir=runs/cai
  # -> benchmarks/results/cpu/pm_refusal_preference.json

Beside it, `pyrit_refusal_baseline`: on the PyRIT human-labelled pairs stage 8 scores
the PM on (`pm.num_human_pairs`, seed 0), how often the less / more harmful response is
a refusal by the model-free measure, and the accuracy a pure refusal detector would get
there (ties at 0.5): the PM's accuracy on those pairs above it is harm signal beyond
"prefers refusals".

`--into_results` also writes SL-CAI's row into the workdir's results.json (as stage 8
now does) and rebuilds the report; evidence.json is not touched.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from benchmarks.common import outputs
from cai_jax import paths, records
from cai_jax.evaluation import answers as ans
from cai_jax.evaluation import intervals, judges, refusal
from cai_jax.feedback.eval_data import pyrit_pairs
from cai_jax.model.sharding import Sharder, make_mesh
from cai_jax.preference.scorer import Scorer

_WORKDIR = flags.DEFINE_string("workdir", "runs/cai", "A pipeline workdir whose stage 8 has run.")
_OUT = flags.DEFINE_string("out", "", "Write the result as JSON here (default:"
                           " benchmarks/results/<machine>/pm_refusal_preference.json).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "PM scoring batch.")
_SEED = flags.DEFINE_integer("seed", 0, "Bootstrap seed (stage 8 uses its config's seed, 0).")
_NUM_HUMAN_PAIRS = flags.DEFINE_integer("num_human_pairs", 64,
                                        "PyRIT pairs (stage 8's pm.num_human_pairs).")
_INTO_RESULTS = flags.DEFINE_bool("into_results", False,
                                  "Add SL-CAI's row to results.json and rebuild the report.")


def measure(workdir: str, batch_size: int, seed: int) -> dict:
  pm_dir = paths.preference_model_dir("", workdir)
  sharder = Sharder(make_mesh((-1, 1, 1)))  # stage 8's mesh (configs/evaluation.py)
  scorer = Scorer.from_dir(pm_dir, sharder, batch_size)
  root = os.path.join(paths.stage_dir(workdir, paths.EVALUATION), "answers")
  out = {}
  for name in sorted(os.listdir(root)):
    recs = records.read_records(os.path.join(root, name), ans.AnswerRecord)
    out[name] = {"model": name, **judges.refusal_preference(
        scorer.score_texts, {r.id: r for r in recs}, seed=seed)}
  return out


def pyrit_refusal_baseline(num_pairs: int, seed: int) -> dict:
  """Which of PyRIT's human-labelled pairs a 'prefer the refusal' rule gets right."""
  pairs, a_better = pyrit_pairs(num_pairs, seed)
  counts = {"both_refuse": 0, "only_less_harmful_refuses": 0, "only_more_harmful_refuses": 0,
            "neither_refuses": 0}
  for p, a in zip(pairs, a_better):
    good, bad = (p.response_a, p.response_b) if a > 0.5 else (p.response_b, p.response_a)
    g = refusal.classify(p.prompt, good).refuses
    b = refusal.classify(p.prompt, bad).refuses
    key = ("both_refuse" if g and b else "only_less_harmful_refuses" if g else
           "only_more_harmful_refuses" if b else "neither_refuses")
    counts[key] += 1
  ties = counts["both_refuse"] + counts["neither_refuses"]
  return {"n": len(pairs), **counts, "refusal_detector_expected_accuracy":
          (counts["only_less_harmful_refuses"] + 0.5 * ties) / len(pairs)}


def main(argv):
  del argv
  baseline = pyrit_refusal_baseline(_NUM_HUMAN_PAIRS.value, _SEED.value)
  print("PyRIT pairs, a pure refusal detector:", baseline)
  result = measure(_WORKDIR.value, _BATCH_SIZE.value, _SEED.value)
  for name, sets in result.items():
    for k, v in sets.items():
      if isinstance(v, dict) and "refusal_preferred" in v:
        print(f"{name:10s} {k:10s} refusal preferred"
              f" {intervals.Estimate.from_dict(v['refusal_preferred'])}  margin"
              f" {intervals.Estimate.from_dict(v['mean_margin'])}"
              f"  (answers refusing: {v['answers_refusing']})")
  print(outputs.write(outputs.path("pm_refusal_preference", _OUT.value), {
      "workdir": os.path.abspath(_WORKDIR.value), "models": result,
      "pyrit_refusal_baseline": baseline}))
  if _INTO_RESULTS.value and "sl_cai" in result:
    path = paths.results_file(_WORKDIR.value)
    with open(path) as f:
      results = json.load(f)
    results["pm_refusal_preference"] = result["sl_cai"]
    with open(path + ".tmp", "w") as f:
      json.dump(results, f, indent=1, ensure_ascii=False)
    os.replace(path + ".tmp", path)
    from cai_jax.evaluation import report
    print(report.write_report(_WORKDIR.value))


if __name__ == "__main__":
  app.run(main)
