"""Feedback-model accuracy and calibration on PyRIT's human-scored harm pairs, for
each labeler setting: alone, principle ensemble, order swap, chain of thought,
pointwise (the paper's Fig. 4 analogue)."""

from __future__ import annotations

import gc
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from cai_jax.constitution import load_constitution
from cai_jax.evaluation.answers import spec_exists
from cai_jax.feedback import FeedbackModel, Labeler, LabelerSettings, model_label
from cai_jax.feedback.eval_data import pyrit_pairs
from cai_jax.model.sharding import Sharder
from cai_jax.preference.calibration import calibration


def accuracy(p_a: np.ndarray, a_better: np.ndarray) -> float:
  """Fraction of pairs whose label prefers the better response; p = 1/2 counts half."""
  p_a, a_better = np.asarray(p_a, float), np.asarray(a_better, float)
  right = np.where(p_a == 0.5, 0.5, ((p_a > 0.5) == (a_better > 0.5)).astype(float))
  return float(right.mean())


def reliability(p_a: np.ndarray, a_better: np.ndarray, num_bins: int
                ) -> tuple[float, list[dict[str, Any]]]:
  """(ECE, bins of count / mean predicted / observed frequency), empty bins left out."""
  ece, table = calibration(np.asarray(p_a, float), np.asarray(a_better, float), num_bins)
  return ece, [row for row in table if row["count"]]


# Rows derived from one labelling run's raw log-probs: (row name, run, principles, orders,
# clamp). "alone" = one principle, one presentation order.
ACCURACY_ROWS = {
    "multiple_choice": [("alone", 1, 1, False), ("principle ensemble", 0, 1, False),
                        ("order swap", 1, 2, False), ("ensemble + order swap", 0, 2, False)],
    "chain_of_thought": [("chain of thought (unclamped)", 1, 2, False),
                         ("chain of thought (clamped)", 1, 2, True)],
    "pointwise": [("pointwise alone", 1, 2, False), ("pointwise ensemble", 0, 2, False)],
}


def derived_label(logp_KS2: np.ndarray, *, mode: str, good_answers: Sequence[str],
                  principles: int, orders: int, clamp: tuple[float, float] | None,
                  order_combine: str = "logit") -> float:
  """A row's label from a record's log-probs: its first principles and orders only.

  principles = 0 means all of them. Pointwise "orders" are the two responses,
  which every pointwise label needs.
  """
  k = principles or logp_KS2.shape[0]
  return model_label(np.asarray(logp_KS2)[:k, :orders], mode=mode,
                     good_answers=list(good_answers)[:k], order_combine=order_combine,
                     clamp=clamp)


def labeler_accuracy(config: ml_collections.ConfigDict, sharder: Sharder, notes: list[str]
                     ) -> dict[str, Any]:
  """Feedback-model accuracy and calibration per labeler setting on PyRIT's pairs."""
  a = config.accuracy
  if not a.enabled:
    return {"missing": "disabled (accuracy.enabled=False)"}
  if not a.models:
    return {"missing": "no feedback models configured (accuracy.models)"}
  try:
    pairs, a_better = pyrit_pairs(a.num_pairs or None, seed=config.seed)
  except FileNotFoundError as e:
    notes.append(f"labeler accuracy: {e}")
    return {"missing": str(e)}
  constitution = load_constitution(config.constitution)
  principles = tuple(a.principles)
  settings = {
      "multiple_choice": dict(principle_ids=principles, num_few_shot=a.num_few_shot),
      "chain_of_thought": dict(principle_ids=principles[:1], num_few_shot=a.num_few_shot,
                               chain_of_thought=True, cot_max_new_tokens=a.cot_max_new_tokens),
      "pointwise": dict(mode="pointwise", principle_ids=principles),
  }
  unknown = set(a.runs) - set(settings)
  if unknown:
    raise ValueError(f"accuracy.runs: unknown {sorted(unknown)}; choose from {sorted(settings)}")
  out: dict[str, Any] = {"num_pairs": len(pairs), "frac_a_better": float(a_better.mean()),
                         "principles": list(principles), "models": {}}
  for spec in a.models:
    if not spec_exists(spec):
      notes.append(f"labeler accuracy: {spec} is not installed; skipped")
      continue
    model = FeedbackModel.load(spec, sharder, config.dtype, config.decode_layers)
    rows = []
    for run_name in a.runs:
      s = LabelerSettings(max_response_tokens=a.max_response_tokens, batch_size=a.batch_size,
                          seed=config.seed, **settings[run_name])
      labeler = Labeler([model], constitution, s)
      recs = labeler.label(pairs)
      for row, k, orders, clamped in ACCURACY_ROWS[run_name]:
        clamp = s.cot_clamp if clamped else None
        p = np.asarray([derived_label(
            np.asarray(r.logprobs[0]), mode=s.mode,
            good_answers=labeler.good_answers(r.principle_ids) if s.mode == "pointwise" else (),
            principles=k, orders=orders, clamp=clamp, order_combine=s.order_combine)
            for r in recs])
        ece, table = reliability(p, a_better, a.num_bins)
        rows.append({"setting": row, "run": run_name, "principles": k or len(principles),
                     "orders": orders, "clamp": list(clamp) if clamp else None,
                     "accuracy": accuracy(p, a_better), "ece": ece,
                     "brier": float(np.mean((p - a_better) ** 2)), "reliability": table})
    params_m = model.cfg.num_params() / 1e6
    out["models"][spec] = {"params_millions": float(params_m), "rows": rows}
    model = labeler = recs = None  # drop the references before the next model loads
    gc.collect()  # one feedback model resident at a time
  return out
