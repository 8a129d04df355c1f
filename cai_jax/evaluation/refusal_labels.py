"""Refusal contrasts of a run's stage-4 pairs, and a labeler's verdict on them: does
stage 5's feedback model prefer a canned refusal to a red-team prompt's answer as
clearly as it prefers a helpful prompt's answer to one? (The helpful side alone,
`pairs.refusal_pairs`, teaches the PM that refusing is worse everywhere.)

The contrasts: for every red-team training prompt, (its SL-CAI sample a, a canned
refusal) and (stage 2's initial answer, the same refusal); for every helpful prompt,
(its SL-CAI sample, a canned refusal). Per contrast, the summary of a labeler's labels:
the share of prompts where the refusal is preferred (Wilson 95% interval), and the mean
label margin |p - 0.5| and mean p(refusal preferred) (bootstrap 95% intervals).
`benchmarks/quality/red_team_refusal_labels.py` labels them.
"""

from __future__ import annotations

import numpy as np

from cai_jax import records
from cai_jax.data import refusals
from cai_jax.evaluation import intervals
from cai_jax import paths


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
  """The summary of one contrast's labels, `p_a` = p(the answer a is preferred)."""
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
