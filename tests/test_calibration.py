"""The PM's calibration (preference/calibration.py): the expected calibration error."""

import numpy as np

from cai_jax.preference import calibration


def test_ece_of_calibrated_predictions_is_near_zero():
  rng = np.random.default_rng(0)
  q = rng.uniform(size=200_000)
  ece, table = calibration.calibration(q, q, 10)  # soft labels equal to the prediction
  assert ece < 1e-9
  assert sum(row["count"] for row in table) == len(q)
  outcomes = (rng.uniform(size=q.size) < q).astype(np.float64)  # right q of the time
  ece, table = calibration.calibration(q, outcomes, 10)
  assert ece < 0.01
  for row in table:
    assert abs(row["mean_pred"] - row["mean_label"]) < 0.02
  # Overconfident: says 0.95 where it is right 60% of the time.
  over = np.full(10_000, 0.95)
  ece, _ = calibration.calibration(over, (rng.uniform(size=10_000) < 0.6).astype(float), 10)
  assert abs(ece - 0.35) < 0.02
