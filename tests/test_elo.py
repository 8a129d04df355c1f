"""Bradley-Terry Elo and win rates (evaluation/elo.py)."""

import math

import numpy as np
import pytest

from cai_jax.evaluation import elo as elo_lib
from cai_jax.evaluation import labeler_accuracy


def test_elo_two_players_three_to_one():
  """sigma(s0 - s1) = 3/4 at the optimum: s1 = -ln 3, i.e. -400 log10(3) Elo."""
  games = [(0, 1, 1.0)] * 3 + [(0, 1, 0.0)]
  elo = elo_lib.fit_elo(2, games)
  assert elo[0] == 0.0
  assert elo[1] == pytest.approx(-400 * math.log10(3), abs=1e-6)  # -190.849
  # Soft scores: one game at p = 0.75 has the same optimum.
  assert elo_lib.fit_elo(2, [(0, 1, 0.75)])[1] == pytest.approx(-190.848501, abs=1e-5)


def test_elo_three_players_consistent_record():
  """A beats B 3:1, B beats C 3:1, A beats C 9:1: exactly Bradley-Terry with odds 3, 3, 9."""
  games = ([(0, 1, 1.0)] * 3 + [(1, 0, 1.0)] + [(1, 2, 1.0)] * 3 + [(2, 1, 1.0)]
           + [(0, 2, 1.0)] * 9 + [(2, 0, 1.0)])
  elo = elo_lib.fit_elo(3, games)
  step = 400 * math.log10(3)
  np.testing.assert_allclose(elo, [0.0, -step, -2 * step], atol=1e-6)
  # Another anchor only shifts the ratings.
  np.testing.assert_allclose(elo_lib.fit_elo(3, games, anchor=1), elo + step, atol=1e-6)
  wr = elo_lib.win_rates(3, games)
  np.testing.assert_allclose(wr[0, 1], 0.75)
  np.testing.assert_allclose(wr[1, 0], 0.25)
  np.testing.assert_allclose(wr[0, 2], 0.9)
  assert np.isnan(wr[0, 0])


def test_elo_prior_keeps_a_perfect_record_finite():
  """Without a prior a 2:0 record has no finite MLE; with prior lambda the optimum solves
  1 - sigma(d) times 2 = lambda * d (d = s0 - s1, s0 anchored)."""
  elo = elo_lib.fit_elo(2, [(0, 1, 1.0)] * 2, prior=0.5)
  d = -elo[1] * math.log(10) / 400
  assert 2 * (1 - 1 / (1 + math.exp(-d))) == pytest.approx(0.5 * d, abs=1e-9)
  assert 0 < d < 10


def test_pairwise_summary_and_accuracy_ties():
  s = elo_lib.pairwise_summary(["x", "y"], [(0, 1, 0.75), (0, 1, 0.25), (0, 1, 1.0)], 0.0, 400.0)
  assert s["win_rate"]["x"]["y"] == pytest.approx(2 / 3)
  assert s["win_rate"]["y"]["x"] == pytest.approx(1 / 3)
  assert s["overall_win_rate"] == pytest.approx({"x": 2 / 3, "y": 1 / 3})
  assert s["elo"]["y"] == pytest.approx(-400 * math.log10(2), abs=1e-6)
  # Labeler accuracy: p = 1/2 counts half.
  assert labeler_accuracy.accuracy(np.array([0.9, 0.5, 0.2, 0.4]), np.array([1.0, 1.0, 1.0, 0.0])) == 0.625
