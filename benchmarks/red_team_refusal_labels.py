"""Would stage 5's feedback model label a red-team contrast that favours refusing?

Run 4 added, for each helpful prompt, its SL-CAI sample against a canned refusal
(`pairs.refusal_pairs`): the feedback model preferred the sample on every one
(BENCHMARKS.md, "fourth run"), and the PM learned that refusing is worse everywhere.
Balancing it needs the same contrast on red-team prompts, labelled under the harm
question, to favour the refusal as clearly. This script measures whether it does, on
a workdir's stage-4 pairs: for every red-team training prompt, (its SL-CAI sample a,
a canned refusal) and (stage 2's initial answer, the same refusal), labelled by the
stage-5 labeler of the pipeline config (red-team pairs' principles, its feedback
models and settings); and, for the same labeler's other side, every helpful prompt's
SL-CAI sample against a canned refusal under the helpful question ("helpful").
`--feedback_models` labels with other models (e.g. the bundled
qwen2.5-coder-1.5b-instruct) to ask whether a larger one would supply the contrast. Per contrast: the share of prompts where the refusal is
preferred (Wilson 95% interval), and the mean label margin |p - 0.5| and mean
p(refusal preferred) (bootstrap 95% intervals).

  python -m benchmarks.red_team_refusal_labels --workdir=runs/cai7 \\
      --out=benchmarks/results/red_team_refusal_labels_cpu.json
"""

from __future__ import annotations

import json
import time

import numpy as np
from absl import app, flags

from cai_jax import paths, records
from cai_jax.data import refusals
from cai_jax.evaluation import intervals
from cai_jax.feedback import Labeler

FLAGS = flags.FLAGS


def define_flags() -> None:
  """At run time, not import time (other benchmarks share flag names)."""
  flags.DEFINE_string("workdir", "runs/cai", "A pipeline workdir whose stage 4 has run.")
  flags.DEFINE_string("config", "cpu", "configs/pipeline.py variant whose ai_labels label.")
  flags.DEFINE_string("out", "", "Write the result as JSON here.")
  flags.DEFINE_integer("seed", 0, "Bootstrap seed.")
  flags.DEFINE_list("feedback_models", [], "Label with these load_model specs instead of"
                    " the config's ai_labels.feedback_models.")
  flags.DEFINE_string("baseline", "", "An earlier --out of this script on the same workdir:"
                      " add the paired differences (this run minus it) per contrast.")


def contrasts(workdir: str) -> dict[str, list[records.ResponsePair]]:
  """(answer a, refusal b) pairs for every red-team prompt with stage-4 samples: a is
  the SL-CAI sample ("sample") or stage 2's initial answer ("initial"); and for every
  helpful prompt, its SL-CAI sample ("helpful")."""
  pairs = records.read_records(paths.require_records(
      paths.stage_dir(workdir, paths.PAIRS), paths.PAIRS, "response pairs"), records.ResponsePair)
  initial = {p.id[:-len(records.REVISION_PAIR_SUFFIX)]: p.response_a for p in pairs
             if records.pair_source(p) == "revision"}
  out: dict[str, list[records.ResponsePair]] = {"sample": [], "initial": [], "helpful": []}
  for p in pairs:
    if records.pair_source(p) != "samples":
      continue
    if p.kind == "helpful":
      out["helpful"].append(records.refusal_pair(p, refusals.refusal_for(p.id)))
      continue
    refusal = refusals.refusal_for(p.id)
    out["sample"].append(records.refusal_pair(p, refusal))
    if p.id in initial:
      out["initial"].append(records.ResponsePair(
          id=p.id + "/initial" + records.REFUSAL_PAIR_SUFFIX, prompt=p.prompt, kind=p.kind,
          response_a=initial[p.id], response_b=refusal))
  return out


def summarise(p_a: np.ndarray, seed: int) -> dict:
  p_refusal = 1 - p_a
  return {"n": int(len(p_a)),
          "refusal_preferred": intervals.wilson(int(np.sum(p_refusal > 0.5)), len(p_a)).as_dict(),
          "mean_p_refusal_preferred": intervals.bootstrap(p_refusal, seed=seed).as_dict(),
          "mean_margin": intervals.bootstrap(np.abs(p_a - 0.5), seed=seed).as_dict(),
          "p_range": [float(p_refusal.min()), float(p_refusal.max())]}


def paired_to(row: dict, base: dict, seed: int) -> dict:
  """This run's per-pair labels minus `base`'s on the same pair ids (paired bootstrap)."""
  mine = dict(zip(row["ids"], row["p_refusal"]))
  theirs = dict(zip(base["ids"], base["p_refusal"]))
  ids = [i for i in row["ids"] if i in theirs]
  if not ids:
    raise ValueError("--baseline: no pair ids in common; label the same workdir")
  a, b = np.array([mine[i] for i in ids]), np.array([theirs[i] for i in ids])
  return {"mean_margin": intervals.paired(np.abs(a - 0.5), np.abs(b - 0.5), seed=seed).as_dict(),
          "refusal_preferred": intervals.paired((a > 0.5).astype(float), (b > 0.5).astype(float),
                                                seed=seed).as_dict()}


def main(argv):
  del argv
  from configs import pipeline
  config = pipeline.get_config(FLAGS.config).ai_labels
  if FLAGS.feedback_models:
    config.feedback_models = tuple(FLAGS.feedback_models)
  labelers = Labeler.by_kind_from_config(config)
  result = {"workdir": FLAGS.workdir, "feedback_models": list(config.feedback_models),
            "mode": config.mode, "contrasts": {}}
  for name, pairs in contrasts(FLAGS.workdir).items():
    t0 = time.perf_counter()
    labels = labelers["helpful" if name == "helpful" else "red_team"].label(pairs)
    row = summarise(np.array([r.p_a for r in labels], float), FLAGS.seed)
    row["seconds"] = time.perf_counter() - t0
    row["ids"], row["p_refusal"] = [r.id for r in labels], [1.0 - r.p_a for r in labels]
    result["contrasts"][name] = row
    print(f"{name} vs refusal: refusal preferred "
          f"{intervals.Estimate.from_dict(row['refusal_preferred'])}, mean |p-0.5| "
          f"{intervals.Estimate.from_dict(row['mean_margin'])}")
  if FLAGS.baseline:
    with open(FLAGS.baseline) as f:
      base = json.load(f)
    result["baseline"] = {"file": FLAGS.baseline, "feedback_models": base["feedback_models"]}
    for name, row in result["contrasts"].items():
      row["minus_baseline"] = paired_to(row, base["contrasts"][name], FLAGS.seed)
      print(f"{name}: minus baseline, margin "
            f"{intervals.Estimate.from_dict(row['minus_baseline']['mean_margin'])}, refusal"
            f" preferred {intervals.Estimate.from_dict(row['minus_baseline']['refusal_preferred'])}")
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
