"""What stage 3's revision filter would keep of a run's red-team revisions, and how harmful
and how refusing the kept and dropped ones are (issue 37, SL-CAI's targets).

Reads the workdir's stage-2 records and, where stage 8 has run, its judge's harm
log-odds of each record's initial answer and last revision (results.json
`judge_rounds`, the Fig. 5 measure) and harm threshold. For the filter as configured
(the flags mirror `sft.data.revision_filter`) and for each drop reason: the count, the
refusal-measure category shares, the share of revisions the judge rates less harmful
than the answer they revise, and the judge's harmful rate of the revisions at its
threshold, each with a 95% interval. Nothing is trained; no model is loaded.

  python -m benchmarks.quality.revision_filter --workdir=runs/cai
  # -> benchmarks/results/cpu/revision_filter.json
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from benchmarks.common import outputs
from cai_jax import paths, records
from cai_jax.constitution import load_constitution
from cai_jax.evaluation import intervals, refusal
from cai_jax.evaluation import revision_filter as rf

_WORKDIR = flags.DEFINE_string("workdir", "runs/cai", "A pipeline workdir whose stage 2 ran.")
_OUT = flags.DEFINE_string("out", "", "Write the result as JSON here (default:"
                           " benchmarks/results/<machine>/revision_filter.json).")
_CATEGORIES = flags.DEFINE_list("categories", ["complies", "refuses", "refuses_explains"],
                                "Refusal-measure categories kept.")
_ECHO_WORDS = flags.DEFINE_integer("echo_words", 6, "sft.data.revision_filter.echo_words")
_MIN_COMPRESSION = flags.DEFINE_float("min_compression", 0.2,
                                      "sft.data.revision_filter.min_compression")
_CONSTITUTION = flags.DEFINE_string("constitution", "harmless", "Whose revision requests.")


def measure(workdir: str, config: rf.FilterConfig, constitution: str) -> dict:
  recs = [r for r in records.read_records(paths.stage_dir(workdir, paths.CRITIQUE_REVISION),
                                          records.CritiqueRevisionRecord)
          if r.kind == "red_team" and r.rounds]
  flt = rf.RevisionFilter(config, [p.revision for p in
                                   load_constitution(constitution).critique_revision])
  reviewed = rf.review(flt, recs)
  why = {r.id: reviewed["dropped"].get(r.id) for r in recs}
  out = {"workdir": workdir, "config": {"categories": list(config.categories),
                                        "echo_words": config.echo_words,
                                        "min_compression": config.min_compression,
                                        "constitution": constitution},
         **{k: v for k, v in reviewed.items() if k != "dropped"}}
  out["initial_categories"] = rf.summary(
      [(None, refusal.classify(r.prompt, r.initial_response).category) for r in recs]
  )["kept_categories"]
  judged: dict[str, tuple[float, float]] = {}
  cut = None
  results = paths.results_file(workdir)
  if os.path.exists(results):
    with open(results) as f:
      res = json.load(f)
    jr = res.get("judge_rounds", {})
    judged = {i: (a, b) for i, a, b in zip(jr.get("ids", []), jr.get("first", []),
                                           jr.get("last", []))}
    cut = res.get("judge_validation", {}).get("threshold")
  groups = {"all": [r.id for r in recs], "kept": [r.id for r in recs if why[r.id] is None],
            "dropped": [r.id for r in recs if why[r.id] is not None],
            **{f"dropped:{k}": [r.id for r in recs if why[r.id] == k] for k in rf.REASONS}}
  out["judge"] = ({"missing": f"{results}: no judge_rounds (stage 8 has not run with a judge)"}
                  if not judged else {"threshold": cut, "groups": {}})
  for name, ids in groups.items():
    ids = [i for i in ids if i in judged]
    if not judged or not ids:
      continue
    g = {"n": len(ids),
         "less_harmful_than_initial": intervals.rate(
             [judged[i][1] < judged[i][0] for i in ids]).as_dict()}
    if cut is not None:
      g["harmful_rate"] = intervals.rate([judged[i][1] > cut for i in ids]).as_dict()
      g["initial_harmful_rate"] = intervals.rate([judged[i][0] > cut for i in ids]).as_dict()
    out["judge"]["groups"][name] = g
  return out


def main(argv) -> None:
  del argv
  config = rf.FilterConfig(True, tuple(_CATEGORIES.value), _ECHO_WORDS.value,
                           _MIN_COMPRESSION.value)
  result = measure(_WORKDIR.value, config, _CONSTITUTION.value)
  path = outputs.write(outputs.path("revision_filter", _OUT.value, device_kind="cpu"), result)
  print(json.dumps({k: result[k] for k in ("revisions", "kept", "kept_share",
                                           "dropped_by_reason")}))
  print(path)


if __name__ == "__main__":
  app.run(main)
