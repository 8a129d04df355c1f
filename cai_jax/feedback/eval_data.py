"""Human-labelled response pairs for measuring a labeler (or a preference model).

PyRIT (`pip install pyrit`, MIT) ships scorer-evaluation CSVs in its wheel:
`pyrit/datasets/scorer_evals/{harm,objective}/*.csv`, rows of (objective,
assistant_response, human score(s)). harm/ scores are 0-1 Likert harm
ratings (some files have three raters: we average them); objective/ scores
are 1 when the response achieved the harmful objective, else 0. Lines
starting with "#" are comments.

A pair is two responses to the same objective whose harm scores differ by at
least `min_gap`: the most and the least harmful one. The correct label
prefers the less harmful. Which of the two is response a is a seeded coin
flip, so a labeler with a position bias is not rewarded for it.
Caveat: many low-harm responses are refusals, so part of what this measures
is refusal detection.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import importlib.util
import io
import os

import numpy as np

from cai_jax.records import ResponsePair

SUBDIRS = ("harm", "objective")


def pyrit_dir() -> str:
  spec = importlib.util.find_spec("pyrit")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("the pyrit wheel is not installed: pip install --no-deps pyrit==1.1.0")
  path = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "scorer_evals")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: missing from the installed pyrit")
  return path


def read_scored_rows(path: str) -> list[tuple[str, str, float]]:
  """(objective, response, mean human score) of one CSV, skipping "#" lines."""
  with open(path, encoding="utf-8") as f:
    text = "".join(line for line in f if not line.startswith("#"))
  rows = []
  for row in csv.DictReader(io.StringIO(text)):
    scores = [float(v) for k, v in row.items() if k and k.startswith("human_score") and v]
    objective, response = (row.get("objective") or "").strip(), (
        row.get("assistant_response") or "").strip()
    if scores and objective and response:
      rows.append((objective, response, float(np.mean(scores))))
  return rows


def pyrit_pairs(n: int | None = None, seed: int = 0, min_gap: float = 0.5
                ) -> tuple[list[ResponsePair], np.ndarray]:
  """(pairs, a_is_better [N] float 0/1): up to `n` seeded (harmful, harmless) pairs."""
  root = pyrit_dir()
  by_objective: dict[str, list[tuple[str, float, str]]] = {}
  for sub in SUBDIRS:
    for path in sorted(glob.glob(os.path.join(root, sub, "*.csv"))):
      source = f"{sub}/{os.path.basename(path)[:-4]}"
      for objective, response, score in read_scored_rows(path):
        by_objective.setdefault(objective, []).append((response, score, source))
  candidates = []
  for objective, rows in by_objective.items():
    worst = max(rows, key=lambda r: r[1])
    best = min(rows, key=lambda r: r[1])
    if worst[1] - best[1] >= min_gap:
      candidates.append((objective, worst, best))
  if not candidates:
    raise FileNotFoundError(f"{root}: no objective has responses {min_gap} apart in harm")
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(candidates))
  if n is not None:
    order = order[:n]
  pairs, a_better = [], []
  for idx in order:
    objective, worst, best = candidates[int(idx)]
    digest = hashlib.sha256(objective.encode()).hexdigest()[:10]
    harmless_first = bool(rng.integers(2))
    a, b = (best, worst) if harmless_first else (worst, best)
    pairs.append(ResponsePair(id=f"pyrit/{worst[2]}/{digest}", prompt=objective,
                              kind="red_team", response_a=a[0], response_b=b[0]))
    a_better.append(1.0 if harmless_first else 0.0)
  return pairs, np.asarray(a_better)
