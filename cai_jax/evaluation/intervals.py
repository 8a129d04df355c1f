"""95% intervals for the numbers a claim rests on.

- `wilson`: a binomial rate (refusal rate, accuracy at a threshold). Closed
  form, keeps its coverage near 0 and 1 where the normal interval does not.
- `bootstrap`: any statistic of per-prompt values, resampling prompts with
  replacement (percentile interval). `paired` resamples the same prompts for
  two models, so the interval is of the difference on shared prompts: the
  prompts' own difficulty cancels.
- `bootstrap_games`: a statistic of pairwise games (win rate, Elo),
  resampling prompts as clusters (every game played on a prompt goes in or out
  together), since games on one prompt are not independent.
- `roc_auc` with a bootstrap interval, for judges scored against human labels.

Every result is an `Estimate(estimate, lo, hi, n)`; `as_dict` is the form
written to results and the evidence file. Seeds are explicit, so reruns give
the same intervals.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np
import scipy.stats

Z95 = 1.959963984540054
DEFAULT_RESAMPLES = 2000


@dataclasses.dataclass(frozen=True)
class Estimate:
  estimate: float
  lo: float
  hi: float
  n: int

  def as_dict(self) -> dict[str, Any]:
    def num(x):
      return None if x is None or not math.isfinite(x) else float(x)
    return {"estimate": num(self.estimate), "ci95": [num(self.lo), num(self.hi)], "n": self.n}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "Estimate":
    """The inverse of `as_dict` (None, a non-finite value written out, reads back as nan)."""
    f = lambda x: NAN if x is None else float(x)
    return cls(f(d["estimate"]), f(d["ci95"][0]), f(d["ci95"][1]), int(d["n"]))

  def excludes(self, value: float) -> bool:
    return math.isfinite(self.lo) and math.isfinite(self.hi) and not self.lo <= value <= self.hi

  def __str__(self) -> str:
    if not math.isfinite(self.estimate):
      return f"n/a (n={self.n})"
    return f"{self.estimate:.3f} [{self.lo:.3f}, {self.hi:.3f}] (n={self.n})"


NAN = float("nan")


def wilson(successes: int, n: int) -> Estimate:
  """Rate successes / n with the Wilson score 95% interval."""
  if n <= 0:
    return Estimate(NAN, NAN, NAN, 0)
  if not 0 <= successes <= n:
    raise ValueError(f"successes {successes} outside [0, {n}]")
  p = successes / n
  z2 = Z95 * Z95
  center = (p + z2 / (2 * n)) / (1 + z2 / n)
  half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
  return Estimate(p, max(0.0, center - half), min(1.0, center + half), n)


def rate(flags: Sequence[bool]) -> Estimate:
  flags = [bool(f) for f in flags]
  return wilson(sum(flags), len(flags))


def _resampled(n: int, statistic: Callable[[np.ndarray], float], seed: int,
               resamples: int) -> tuple[float, float]:
  """Percentile 95% interval of statistic(indices) over `resamples` draws of n indices."""
  rng = np.random.default_rng(seed)
  return _percentile(np.asarray([statistic(rng.integers(0, n, size=n))
                                 for _ in range(resamples)], float))


def _percentile(values: np.ndarray) -> tuple[float, float]:
  values = values[np.isfinite(values)]
  if values.size == 0:
    return NAN, NAN
  lo, hi = np.percentile(values, [2.5, 97.5])
  return float(lo), float(hi)


def bootstrap(values: Sequence[float] | np.ndarray, statistic: Callable[[np.ndarray], float] = np.mean,
              *, seed: int = 0, resamples: int = DEFAULT_RESAMPLES) -> Estimate:
  """statistic(values) with a percentile interval over resampled prompts."""
  x = np.asarray(values, float)
  if len(x) == 0:
    return Estimate(NAN, NAN, NAN, 0)
  lo, hi = _resampled(len(x), lambda i: statistic(x[i]), seed, resamples)
  return Estimate(float(statistic(x)), lo, hi, len(x))


def paired(a: Sequence[float], b: Sequence[float], *, seed: int = 0,
           resamples: int = DEFAULT_RESAMPLES) -> Estimate:
  """mean(a - b) over the same prompts (a[i], b[i] on prompt i), bootstrap interval."""
  a, b = np.asarray(a, float), np.asarray(b, float)
  if a.shape != b.shape:
    raise ValueError(f"paired values need the same prompts: {a.shape} vs {b.shape}")
  return bootstrap(a - b, seed=seed, resamples=resamples)


def difference(a: Sequence[float], b: Sequence[float], *, seed: int = 0,
               resamples: int = DEFAULT_RESAMPLES) -> Estimate:
  """mean(a) - mean(b) for independent samples (each resampled on its own); n = both."""
  a, b = np.asarray(a, float), np.asarray(b, float)
  if len(a) == 0 or len(b) == 0:
    return Estimate(NAN, NAN, NAN, len(a) + len(b))
  rng = np.random.default_rng(seed)
  da = a[rng.integers(0, len(a), size=(resamples, len(a)))].mean(1)
  db = b[rng.integers(0, len(b), size=(resamples, len(b)))].mean(1)
  lo, hi = _percentile(da - db)
  return Estimate(float(a.mean() - b.mean()), lo, hi, len(a) + len(b))


def win_rate(a: Sequence[float], b: Sequence[float], *, seed: int = 0,
             resamples: int = DEFAULT_RESAMPLES) -> Estimate:
  """P(a[i] > b[i]) over shared prompts, ties counting half, bootstrap interval."""
  a, b = np.asarray(a, float), np.asarray(b, float)
  if a.shape != b.shape:
    raise ValueError(f"paired values need the same prompts: {a.shape} vs {b.shape}")
  return bootstrap((a > b) + 0.5 * (a == b), seed=seed, resamples=resamples)


def bootstrap_games(games: Sequence[tuple[Hashable, Any]],
                    statistic: Callable[[list[Any]], float], *, seed: int = 0,
                    resamples: int = DEFAULT_RESAMPLES) -> Estimate:
  """statistic(games) where each game is (prompt id, game); prompts are resampled
  as clusters. n is the number of prompts."""
  by_prompt: dict[Hashable, list[Any]] = {}
  for pid, g in games:
    by_prompt.setdefault(pid, []).append(g)
  clusters = list(by_prompt.values())
  if not clusters:
    return Estimate(NAN, NAN, NAN, 0)
  pooled = lambda ks: statistic([g for k in ks for g in clusters[k]])
  lo, hi = _resampled(len(clusters), pooled, seed, resamples)
  return Estimate(float(pooled(range(len(clusters)))), lo, hi, len(clusters))


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
  """P(score of a positive > score of a negative), ties counting half (Mann-Whitney U)."""
  s, y = np.asarray(scores, float), np.asarray(labels, bool)
  n_pos, n_neg = int(y.sum()), int((~y).sum())
  if n_pos == 0 or n_neg == 0:
    return NAN
  ranks = scipy.stats.rankdata(s)  # ties get their average rank
  return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auc_interval(scores: Sequence[float], labels: Sequence[int], *, seed: int = 0,
                 resamples: int = DEFAULT_RESAMPLES) -> Estimate:
  """ROC-AUC with a bootstrap interval over rows."""
  s, y = np.asarray(scores, float), np.asarray(labels, int)
  if len(s) == 0:
    return Estimate(NAN, NAN, NAN, 0)
  lo, hi = _resampled(len(s), lambda i: roc_auc(s[i], y[i]), seed, resamples)
  return Estimate(roc_auc(s, y), lo, hi, len(s))
