"""A harm judge with a measured accuracy: a model's Yes/No harm log-odds per response,
a threshold chosen on human-labelled rows, and its accuracy on other human-labelled rows.

Rows are PyRIT's human-scored (objective, response) CSVs
(`scorer_evals/objective/*.csv`: 1 = the response achieved the harmful
objective; `harm/*.csv`: 0-1 harm ratings, averaged over raters). A row is
harmful when its score is >= 0.5. Rows are split by a hash of the objective
(all responses to one objective on one side): "tune" picks the threshold that
maximises accuracy there; "held_out" reports ROC-AUC (bootstrap interval) and
accuracy at that threshold (Wilson interval). Nothing else is fitted, so the
held-out figures are the judge's accuracy on text it was not tuned on.

Caveat (as for `feedback.eval_data`): many harmless rows are refusals, so
part of what the AUC measures is refusal detection.
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Callable, Sequence

import numpy as np

from cai_jax.evaluation.intervals import auc_interval, roc_auc, wilson
from cai_jax.feedback.eval_data import pyrit_dir, read_scored_rows

SUBDIRS = ("objective", "harm")
TUNE_FRACTION = 0.3


def _side(objective: str) -> str:
  u = int.from_bytes(hashlib.sha256(objective.encode("utf-8")).digest()[:8], "big") / 2.0**64
  return "tune" if u < TUNE_FRACTION else "held_out"


def pyrit_harm_rows(split: str, n: int | None = None, seed: int = 0
                    ) -> list[tuple[str, str, int]]:
  """Up to `n` seeded (objective, response, harmful 0/1) rows of one split, half harmful
  where the split allows (so accuracy is not just the base rate)."""
  if split not in ("tune", "held_out"):
    raise ValueError(f"split must be 'tune' or 'held_out', got {split!r}")
  root = pyrit_dir()
  rows = []
  for sub in SUBDIRS:
    for path in sorted(glob.glob(os.path.join(root, sub, "*.csv"))):
      for objective, response, score in read_scored_rows(path):
        if _side(objective) == split:
          rows.append((objective, response, int(score >= 0.5)))
  rows = sorted(set(rows))
  rng = np.random.default_rng(seed)
  harmful = [r for r in rows if r[2]]
  harmless = [r for r in rows if not r[2]]
  rng.shuffle(harmful)
  rng.shuffle(harmless)
  if n is None:
    return harmful + harmless
  k = min(len(harmful), n // 2)
  chosen = harmful[:k] + harmless[:n - k]
  rng.shuffle(chosen)
  return chosen


def best_threshold(harm: np.ndarray, labels: np.ndarray) -> float:
  """The cut on harm scores (harmful when score > cut) with the highest accuracy;
  the midpoint between neighbouring scores, lowest cut on ties."""
  s = np.sort(np.unique(harm))
  cuts = np.concatenate([[s[0] - 1.0], (s[:-1] + s[1:]) / 2, [s[-1] + 1.0]])
  acc = [np.mean((harm > c) == labels.astype(bool)) for c in cuts]
  return float(cuts[int(np.argmax(acc))])


def validate(harm_score: Callable[[Sequence[str], Sequence[str]], np.ndarray],
             tune: Sequence[tuple[str, str, int]], held_out: Sequence[tuple[str, str, int]],
             *, seed: int = 0) -> dict:
  """Threshold on `tune`, then held-out ROC-AUC and accuracy; `harm_score` is higher
  for more harmful."""
  def scores(rows):
    return np.asarray(harm_score([r[0] for r in rows], [r[1] for r in rows]), float)

  tune_s, held_s = scores(tune), scores(held_out)
  tune_y = np.asarray([r[2] for r in tune])
  held_y = np.asarray([r[2] for r in held_out])
  cut = best_threshold(tune_s, tune_y)
  correct = int(np.sum((held_s > cut) == held_y.astype(bool)))
  return {"threshold": cut,
          "tune": {"n": len(tune), "auc": roc_auc(tune_s, tune_y),
                   "accuracy": float(np.mean((tune_s > cut) == tune_y.astype(bool)))},
          "held_out": {"auc": auc_interval(held_s, held_y, seed=seed).as_dict(),
                       "accuracy": wilson(correct, len(held_out)).as_dict(),
                       "harmful": int(held_y.sum())}}
