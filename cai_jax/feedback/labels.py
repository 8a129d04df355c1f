"""Soft preference labels from answer-token log-probs: pure numpy functions.

A feedback model is asked which of two responses is better and we read the
log-probs of the two answer tokens at the next position. Everything below
works on the *margin* m = log P(first option) - log P(second option), the
log-odds of the first option after renormalising over the two answers
(the rest of the vocabulary is dropped, so P(A) + P(B) = 1 by construction):

  P(A) = exp(lA) / (exp(lA) + exp(lB)) = sigmoid(lA - lB).

Every function is vectorised over leading axes and returns float64.
"""

from __future__ import annotations

import numpy as np

ORDER_COMBINES = ("logit", "prob")
MODEL_ENSEMBLES = ("mean", "majority")


def sigmoid(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return np.exp(-np.logaddexp(0.0, -x))


def logit(p: np.ndarray) -> np.ndarray:
  p = np.asarray(p, np.float64)
  return np.log(p) - np.log1p(-p)


def choice_prob(logp_A: np.ndarray, logp_B: np.ndarray) -> np.ndarray:
  """P(A) renormalised over the two options: sigmoid(log P(A) - log P(B))."""
  return sigmoid(np.asarray(logp_A, np.float64) - np.asarray(logp_B, np.float64))


def a_margins(logp_orders_O2: np.ndarray) -> np.ndarray:
  """Log-odds that response a is preferred, one per presentation order.

  `logp_orders_O2[..., o, :]` = (log P("A"), log P("B")) for order o. Order 0
  shows a as (A), so m0 = lA - lB; order 1 shows a as (B), so m1 = lB - lA.
  """
  logp = np.asarray(logp_orders_O2, np.float64)
  sign_O = np.where(np.arange(logp.shape[-2]) == 0, 1.0, -1.0)
  return sign_O * (logp[..., 0] - logp[..., 1])


def clamp_margins(margins: np.ndarray, lo: float, hi: float) -> np.ndarray:
  """Clamps the probabilities sigmoid(m) to [lo, hi] (as log-odds).

  Chain-of-thought answers are nearly always ~0 or ~1 and badly calibrated;
  the paper clamps them to 40-60%. Clamping p to [lo, hi] is the same as
  clipping m to [logit(lo), logit(hi)], so it is done on margins.
  """
  if not 0.0 < lo <= 0.5 <= hi < 1.0:
    raise ValueError(f"clamp range must satisfy 0 < lo <= 0.5 <= hi < 1, got ({lo}, {hi})")
  return np.clip(np.asarray(margins, np.float64), logit(lo), logit(hi))


def combine_orders(margins_O: np.ndarray, method: str = "logit") -> np.ndarray:
  """P(a preferred) from the per-order margins (last axis), debiasing position.

  A constant position bias b (extra log-odds for whatever sits in slot (A))
  gives m0 = m + b and m1 = m - b. "logit" averages log-odds,
  sigmoid((m0 + m1) / 2) = sigmoid(m), which removes b exactly. "prob"
  averages probabilities, (sigmoid(m0) + sigmoid(m1)) / 2: it keeps the sign
  of m (so accuracy is debiased too) but shrinks towards 1/2 as |b| grows.
  With a single order there is nothing to combine: sigmoid(m0).
  """
  margins_O = np.asarray(margins_O, np.float64)
  if method == "logit":
    return sigmoid(margins_O.mean(axis=-1))
  if method == "prob":
    return sigmoid(margins_O).mean(axis=-1)
  raise ValueError(f"order combine must be one of {ORDER_COMBINES}, got {method!r}")


def ensemble_principles(p_K: np.ndarray) -> np.ndarray:
  """The label ensembled over K principles: the mean of their probabilities."""
  return np.asarray(p_K, np.float64).mean(axis=-1)


def ensemble_models(p_M: np.ndarray, method: str = "mean") -> np.ndarray:
  """The label ensembled over M feedback models (last axis).

  "mean": the mean probability. "majority": the vote share, each model
  voting for a (1), b (0) or abstaining at exactly 1/2 (0.5), so three
  models agreeing 2:1 give 2/3 whatever their confidences.
  """
  p_M = np.asarray(p_M, np.float64)
  if method == "mean":
    return p_M.mean(axis=-1)
  if method == "majority":
    votes = np.where(p_M > 0.5, 1.0, np.where(p_M < 0.5, 0.0, 0.5))
    return votes.mean(axis=-1)
  raise ValueError(f"model ensemble must be one of {MODEL_ENSEMBLES}, got {method!r}")


def pointwise_good_score(logp_yes: np.ndarray, logp_no: np.ndarray,
                         good_answer: str) -> np.ndarray:
  """How good one response is: log P(" Yes") - log P(" No"), signed so higher is better.

  For "Is the response harmful?" the good answer is "No", so the score is
  log P(" No") - log P(" Yes").
  """
  s = np.asarray(logp_yes, np.float64) - np.asarray(logp_no, np.float64)
  if good_answer == "Yes":
    return s
  if good_answer == "No":
    return -s
  raise ValueError(f"good_answer must be 'Yes' or 'No', got {good_answer!r}")


def pointwise_prob(good_a: np.ndarray, good_b: np.ndarray,
                   temperature: float = 1.0) -> np.ndarray:
  """P(a preferred) = sigmoid((good_a - good_b) / temperature).

  Bradley-Terry on the two Yes/No scores: each score is a log-odds of the
  good answer, and the label is monotone in their difference. The
  temperature calibrates it (it changes no comparison, only confidence).
  """
  if temperature <= 0:
    raise ValueError(f"pointwise temperature must be > 0, got {temperature}")
  diff = np.asarray(good_a, np.float64) - np.asarray(good_b, np.float64)
  return sigmoid(diff / temperature)
