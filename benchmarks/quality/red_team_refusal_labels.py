"""Would stage 5's feedback model label a red-team contrast that favours refusing?

The contrasts of a workdir's stage-4 pairs (`cai_jax.evaluation.refusal_labels`: for
every red-team training prompt, its SL-CAI sample and stage 2's initial answer, each
against a canned refusal; for every helpful prompt, its SL-CAI sample against one),
labelled by the stage-5 labeler of the pipeline config (red-team pairs' principles, its
feedback models and settings; the helpful contrast under the helpful question).
`--feedback_models` labels with other models (e.g. the bundled
qwen2.5-coder-1.5b-instruct) to ask whether a larger one would supply the contrast.

  python -m benchmarks.quality.red_team_refusal_labels --workdir=runs/cai7
  # -> benchmarks/results/cpu/red_team_refusal_labels.json
"""

from __future__ import annotations

import json
import time

import numpy as np
from absl import app, flags

from benchmarks.common import outputs
from cai_jax.evaluation import intervals, refusal_labels
from cai_jax.feedback import Labeler

_WORKDIR = flags.DEFINE_string("workdir", "runs/cai", "A pipeline workdir whose stage 4 has run.")
_CONFIG = flags.DEFINE_string("config", "cpu", "configs/pipeline.py variant whose ai_labels label.")
_OUT = flags.DEFINE_string("out", "", "Write the result as JSON here (default:"
                           " benchmarks/results/<machine>/red_team_refusal_labels.json).")
_SEED = flags.DEFINE_integer("seed", 0, "Bootstrap seed.")
_FEEDBACK_MODELS = flags.DEFINE_list("feedback_models", [], "Label with these load_model specs"
                                     " instead of the config's ai_labels.feedback_models.")
_BASELINE = flags.DEFINE_string("baseline", "", "An earlier --out of this script on the same"
                                " workdir: add the paired differences (this run minus it) per"
                                " contrast.")


def main(argv):
  del argv
  from cai_jax.configs import pipeline
  config = pipeline.get_config(_CONFIG.value).ai_labels
  if _FEEDBACK_MODELS.value:
    config.feedback_models = tuple(_FEEDBACK_MODELS.value)
  out = outputs.path("red_team_refusal_labels", _OUT.value)
  labelers = Labeler.by_kind_from_config(config)
  result = {"workdir": _WORKDIR.value, "feedback_models": list(config.feedback_models),
            "mode": config.mode, "contrasts": {}}
  for name, pairs in refusal_labels.contrasts(_WORKDIR.value).items():
    t0 = time.perf_counter()
    labels = labelers["helpful" if name == "helpful" else "red_team"].label(pairs)
    row = refusal_labels.summarise(np.array([r.p_a for r in labels], float), _SEED.value)
    row["seconds"] = time.perf_counter() - t0
    row["ids"], row["p_refusal"] = [r.id for r in labels], [1.0 - r.p_a for r in labels]
    result["contrasts"][name] = row
    print(f"{name} vs refusal: refusal preferred "
          f"{intervals.Estimate.from_dict(row['refusal_preferred'])}, mean |p-0.5| "
          f"{intervals.Estimate.from_dict(row['mean_margin'])}")
  if _BASELINE.value:
    with open(_BASELINE.value) as f:
      base = json.load(f)
    result["baseline"] = {"file": _BASELINE.value, "feedback_models": base["feedback_models"]}
    for name, row in result["contrasts"].items():
      row["minus_baseline"] = refusal_labels.paired_to(row, base["contrasts"][name], _SEED.value)
      print(f"{name}: minus baseline, margin "
            f"{intervals.Estimate.from_dict(row['minus_baseline']['mean_margin'])}, refusal"
            f" preferred {intervals.Estimate.from_dict(row['minus_baseline']['refusal_preferred'])}")
  print(outputs.write(out, result))


if __name__ == "__main__":
  app.run(main)
