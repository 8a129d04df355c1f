"""Do a run's PMs prefer the RL policy's *own* refusals to the answers SL-CAI gave the same
prompts? (issue 37: why RL-CAI still refuses safe prompts under the gated reward)

Stage 8 measures each PM's preference for a canned refusal over SL-CAI's answer
(`pm_refusal_preference`, `pm_helpful_refusal_preference`). A policy is rewarded for the
refusals it writes itself, which can differ from the canned one. For each PM of the
workdir (the single or harmlessness PM, and the helpfulness PM where stage 6 trained one)
and each prompt set, on the prompts where `--refusing` (RL-CAI) refuses and `--answering`
(SL-CAI) answers (the model-free refusal measure): the share where the PM scores the
refusal higher, and the mean margin, each with its 95% interval; beside it the canned
refusal's preference over the same PM, from the same answers. Reads stage 8's stored
answers; loads only the PMs (no generation).

  python -m benchmarks.quality.own_refusals --workdir=runs/gated
  # -> benchmarks/results/cpu/own_refusals.json
"""

from __future__ import annotations

import os

from absl import app, flags

from benchmarks.common import outputs
from cai_jax import paths, records
from cai_jax.evaluation import judges
from cai_jax.evaluation.answers import AnswerRecord
from cai_jax.model.sharding import Sharder, make_mesh
from cai_jax.preference import saved
from cai_jax.preference.scorer import Scorer

_WORKDIR = flags.DEFINE_string("workdir", "runs/cai", "A pipeline workdir whose stage 8 ran.")
_REFUSING = flags.DEFINE_string("refusing", "rl_cai", "The model whose refusals are scored.")
_ANSWERING = flags.DEFINE_string("answering", "sl_cai", "The model whose answers they meet.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "PM scoring batch.")
_OUT = flags.DEFINE_string("out", "", "Write the result as JSON here (default:"
                           " benchmarks/results/<machine>/own_refusals.json).")


def read_answers(workdir: str, name: str) -> dict[str, AnswerRecord]:
  d = os.path.join(paths.stage_dir(workdir, paths.EVALUATION), "answers", name)
  if not os.path.isdir(d):
    raise SystemExit(f"error: {d}: no stored answers of {name!r}; run stage 8 first")
  return {r.id: r for r in records.read_records(d, AnswerRecord)}


def main(argv) -> None:
  del argv
  workdir = _WORKDIR.value
  refusing = read_answers(workdir, _REFUSING.value)
  answering = read_answers(workdir, _ANSWERING.value)
  sharder = Sharder(make_mesh((1, 1, 1)))
  out = {"workdir": workdir, "refusing": _REFUSING.value, "answering": _ANSWERING.value,
         "pms": {}}
  pm_dirs = {"pm": paths.preference_model_dir("", workdir)}
  helpful = paths.pm_out(workdir, paths.HELPFUL_PM)
  if saved.is_pm_dir(helpful):
    pm_dirs["helpful_pm"] = helpful
  for name, pm_dir in pm_dirs.items():
    scorer = Scorer.from_dir(pm_dir, sharder, _BATCH.value)
    out["pms"][name] = {
        "dir": pm_dir,
        "own_refusal": judges.own_refusal_preference(scorer.score_texts, refusing, answering),
        "canned_refusal": judges.refusal_preference(scorer.score_texts, answering)}
  path = outputs.write(outputs.path("own_refusals", _OUT.value), out)
  for name, r in out["pms"].items():
    for kind in ("own_refusal", "canned_refusal"):
      for s, v in r[kind].items():
        if "missing" not in v:
          p, m = v["refusal_preferred"], v["mean_margin"]
          print(f"{name:10s} {kind:14s} {s:10s} refusal preferred {p['estimate']:.3f}"
                f" [{p['ci95'][0]:.3f}, {p['ci95'][1]:.3f}] (n={p['n']}), margin"
                f" {m['estimate']:+.3f} [{m['ci95'][0]:+.3f}, {m['ci95'][1]:+.3f}]")
  print(path)


if __name__ == "__main__":
  app.run(main)
