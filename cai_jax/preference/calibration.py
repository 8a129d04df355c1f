"""Held-out PM metrics: accuracy against the labels and calibration of sigma(r_a - r_b)."""

from __future__ import annotations

import json
import math
import os

import numpy as np

from cai_jax import distributed
from cai_jax.data.comparisons import TokenizedPairs


def calibration(pred_E: np.ndarray, label_E: np.ndarray, num_bins: int
                ) -> tuple[float, list[dict[str, float]]]:
  """Expected calibration error and its reliability table.

  pred = a predicted P(a preferred); label = the (soft) label p. Bins of
  equal width over [0, 1]:
    ECE = sum_bins n_bin / N * |mean pred_bin - mean label_bin|
  A model whose P(a > b) = q is right a fraction q of the time has ECE ~ 0.
  """
  pred_E, label_E = np.asarray(pred_E, np.float64), np.asarray(label_E, np.float64)
  idx_E = np.minimum((pred_E * num_bins).astype(np.int64), num_bins - 1)
  table, ece = [], 0.0
  for b in range(num_bins):
    sel = idx_E == b
    n = int(sel.sum())
    row = {"lo": b / num_bins, "hi": (b + 1) / num_bins, "count": n,
           "mean_pred": float(pred_E[sel].mean()) if n else float("nan"),
           "mean_label": float(label_E[sel].mean()) if n else float("nan")}
    if n:
      ece += n / len(pred_E) * abs(row["mean_pred"] - row["mean_label"])
    table.append(row)
  return float(ece), table


def eval_metrics(rewards_E2: np.ndarray, data: TokenizedPairs, num_bins: int
                 ) -> tuple[dict[str, float], list[dict[str, float]]]:
  """Held-out scalars and the reliability table, from every pair's two rewards."""
  r = np.asarray(rewards_E2, np.float64)
  d_E, p_E = r[:, 0] - r[:, 1], data.p_a_E.astype(np.float64)
  nll_E = p_E * np.logaddexp(0.0, -d_E) + (1 - p_E) * np.logaddexp(0.0, d_E)
  decided_E = p_E != 0.5
  agree_E = (d_E > 0) == (p_E > 0.5)
  pred_E = 0.5 * (1.0 + np.tanh(0.5 * d_E))  # sigma(d) without overflow
  ece, table = calibration(pred_E, p_E, num_bins)
  out = {"eval_loss": float(nll_E.mean()),
         "eval_accuracy": float(agree_E[decided_E].mean()) if decided_E.any() else float("nan"),
         "eval_ece": ece, "eval_decided": int(decided_E.sum()),
         "eval_correct": int((agree_E & decided_E).sum()), "eval_pairs": int(len(p_E)), "eval_reward_mean": float(r.mean()),
         "eval_reward_std": float(r.std())}
  for name, sel in (("red_team", data.red_team_E), ("helpful", ~data.red_team_E)):
    if (sel & decided_E).any():
      out[f"eval_accuracy_{name}"] = float(agree_E[sel & decided_E].mean())
  return out, table


def write_calibration(directory: str, step: int, metrics: dict[str, float],
                      table: list[dict[str, float]]) -> str:
  """`<directory>/step-NNNNNNN.json` (process 0, atomically); returns its path."""
  path = os.path.join(directory, f"step-{step:07d}.json")
  if distributed.is_leader():
    os.makedirs(directory, exist_ok=True)
    clean = lambda v: v if not isinstance(v, float) or math.isfinite(v) else None
    with open(path + ".tmp", "w") as f:
      json.dump({"step": step, **{k: clean(v) for k, v in metrics.items()},
                 "bins": [{k: clean(v) for k, v in row.items()} for row in table]},
                f, indent=1)
    os.replace(path + ".tmp", path)
  return path
