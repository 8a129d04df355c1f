"""Win rates and Bradley-Terry Elo from (soft) pairwise games."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def win_rates(num_players: int, games: Sequence[tuple[int, int, float]]) -> np.ndarray:
  """[n, n] mean score of row i against column j (NaN where they never met).

  A game (i, j, p) gives i the score p and j the score 1 - p (p may be soft).
  """
  total = np.zeros((num_players, num_players))
  count = np.zeros((num_players, num_players))
  for i, j, p in games:
    total[i, j] += p
    total[j, i] += 1.0 - p
    count[i, j] += 1
    count[j, i] += 1
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def fit_elo(num_players: int, games: Sequence[tuple[int, int, float]], *, prior: float = 0.0,
            scale: float = 400.0, anchor: int = 0, max_iters: int = 100) -> np.ndarray:
  """Maximum-likelihood Bradley-Terry ratings in Elo points, `anchor` at 0.

  Maximises sum_g [p log sigma(s_i - s_j) + (1 - p) log sigma(s_j - s_i)]
  - prior/2 |s|^2 over the log-strengths s (s_anchor = 0) by Newton's method
  with backtracking (the objective is concave, so this is deterministic and
  exact), then returns s * scale / ln 10: a 400-point gap means 10:1 odds.
  A perfect record has no finite MLE; `prior` > 0 keeps it finite.
  """
  if not 0 <= anchor < num_players:
    raise ValueError(f"anchor {anchor} outside {num_players} players")
  free = [k for k in range(num_players) if k != anchor]
  g_i = np.asarray([g[0] for g in games], int)
  g_j = np.asarray([g[1] for g in games], int)
  g_p = np.asarray([g[2] for g in games], float)
  if np.any((g_p < 0) | (g_p > 1)):
    raise ValueError("game scores must lie in [0, 1]")

  def objective(s: np.ndarray) -> float:
    d = s[g_i] - s[g_j]
    return float(-(g_p * np.logaddexp(0, -d) + (1 - g_p) * np.logaddexp(0, d)).sum()
                 - 0.5 * prior * (s ** 2).sum())

  s = np.zeros(num_players)
  for _ in range(max_iters):
    d = s[g_i] - s[g_j]
    q = 0.5 * (1 + np.tanh(0.5 * d))  # sigma(d)
    resid, w = g_p - q, q * (1 - q)
    grad = np.zeros(num_players)
    np.add.at(grad, g_i, resid)
    np.add.at(grad, g_j, -resid)
    grad -= prior * s
    hess = np.zeros((num_players, num_players))
    np.add.at(hess, (g_i, g_i), -w)
    np.add.at(hess, (g_j, g_j), -w)
    np.add.at(hess, (g_i, g_j), w)
    np.add.at(hess, (g_j, g_i), w)
    hess -= prior * np.eye(num_players)
    sub = hess[np.ix_(free, free)]
    step = np.zeros(num_players)
    step[free] = np.linalg.lstsq(-sub, grad[free], rcond=None)[0]
    t, before = 1.0, objective(s)
    while objective(s + t * step) < before - 1e-12 and t > 1e-8:
      t *= 0.5
    s = s + t * step
    if np.max(np.abs(t * step)) < 1e-10:
      break
  return s * scale / math.log(10.0)


def pairwise_summary(names: Sequence[str], games: Sequence[tuple[int, int, float]],
                     prior: float, scale: float) -> dict[str, Any]:
  """Win-rate table, overall win rate and Elo (first model = 0) of one axis and judge."""
  n = len(names)
  wr = win_rates(n, games)
  elo = fit_elo(n, games, prior=prior, scale=scale) if games else np.zeros(n)
  overall = {}
  for k, name in enumerate(names):
    mine = [p if i == k else 1 - p for i, j, p in games if k in (i, j)]
    overall[name] = float(np.mean(mine)) if mine else None
  return {
      "num_games": len(games),
      "win_rate": {a: {b: (None if not np.isfinite(wr[x, y]) else float(wr[x, y]))
                       for y, b in enumerate(names) if y != x} for x, a in enumerate(names)},
      "overall_win_rate": overall,
      "elo": {name: float(e) for name, e in zip(names, elo)},
  }
