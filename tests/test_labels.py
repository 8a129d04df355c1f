"""The label math (feedback/labels.py): option probabilities, order debiasing, CoT
clamping, ensembles, pointwise labels."""

import numpy as np
import pytest

from cai_jax.feedback import labels, model_label

from test_labeler import _sigmoid


def test_choice_prob_normalises_over_the_two_options():
  # P(A) = 0.6, P(B) = 0.2 (the rest of the vocabulary has 0.2): renormalised 0.75.
  logp_A = np.log([0.6, 0.1, 0.3])
  logp_B = np.log([0.2, 0.1, 0.6])
  np.testing.assert_allclose(labels.choice_prob(logp_A, logp_B), [0.75, 0.5, 1 / 3])
  # Extreme margins saturate without NaNs.
  assert labels.choice_prob(0.0, -1e4) == 1.0 and labels.choice_prob(-1e4, 0.0) == 0.0


def test_order_swap_removes_a_constant_position_bias_exactly():
  rng = np.random.default_rng(0)
  true_margin = rng.normal(size=50) * 3  # log-odds that a is better
  base = rng.normal(size=50)
  for bias in (0.0, 1.5, -4.0, 9.0):  # extra log-odds for whatever is shown as (A)
    # Order 0 shows a as (A); order 1 shows b as (A), a as (B).
    order0 = np.stack([base + true_margin + bias, base], axis=-1)
    order1 = np.stack([base + bias, base + true_margin], axis=-1)
    logp_NO2 = np.stack([order0, order1], axis=1)
    margins = labels.a_margins(logp_NO2)
    np.testing.assert_allclose(labels.combine_orders(margins, "logit"),
                               labels.sigmoid(true_margin), rtol=1e-12, atol=1e-15)
    # Averaging probabilities keeps the sign of the true margin (accuracy is debiased)
    # but not its size.
    p_prob = labels.combine_orders(margins, "prob")
    assert np.all((p_prob > 0.5) == (true_margin > 0))
  # A single order keeps the bias.
  assert not np.allclose(labels.combine_orders(margins[:, :1]), labels.sigmoid(true_margin))


def test_cot_clamp_keeps_probabilities_in_range():
  margins = np.array([-50.0, -1.0, -0.1, 0.0, 0.3, 2.0, 80.0])
  p = labels.sigmoid(labels.clamp_margins(margins, 0.4, 0.6))
  assert np.all(p >= 0.4 - 1e-12) and np.all(p <= 0.6 + 1e-12)
  np.testing.assert_allclose(p[[0, 1, -1]], [0.4, 0.4, 0.6])
  np.testing.assert_allclose(p[2:5], labels.sigmoid(margins[2:5]))  # inside: unchanged
  # Through model_label: a confident CoT answer in both orders lands on the bound.
  logp = np.log([[[0.99, 0.01], [0.01, 0.99]]])  # [principle, order, (A, B)]: a twice
  assert model_label(logp, mode="multiple_choice", clamp=(0.4, 0.6)) == pytest.approx(0.6)
  assert model_label(logp, mode="multiple_choice") > 0.98
  with pytest.raises(ValueError, match="clamp range"):
    labels.clamp_margins(margins, 0.6, 0.4)


def test_principle_ensemble_is_the_mean():
  p_K = np.array([[0.9, 0.2, 0.7], [0.5, 0.5, 0.2]])
  np.testing.assert_allclose(labels.ensemble_principles(p_K), [0.6, 0.4])
  # Per principle a margin m_k (both orders agree): the label is mean_k sigmoid(m_k).
  m_K = np.array([2.0, -1.0, 0.5, 0.0])
  logp_KS2 = np.stack([np.stack([[m, 0.0], [0.0, m]]) for m in m_K])
  expected = np.mean([_sigmoid(m) for m in m_K])
  assert model_label(logp_KS2, mode="multiple_choice") == pytest.approx(expected)


def test_model_ensemble_mean_and_majority():
  p_M = np.array([0.9, 0.6, 0.2])
  assert labels.ensemble_models(p_M, "mean") == pytest.approx(1.7 / 3)
  assert labels.ensemble_models(p_M, "majority") == pytest.approx(2 / 3)
  assert labels.ensemble_models(np.array([0.5, 0.1]), "majority") == pytest.approx(0.25)
  with pytest.raises(ValueError, match="model ensemble"):
    labels.ensemble_models(p_M, "median")


def test_pointwise_label_is_monotone_in_the_score_difference():
  diffs = np.linspace(-10, 10, 41)
  for good in ("Yes", "No"):
    # Response a's log-odds of the good answer rises with `diffs`; b's is fixed at 0.
    sign = 1.0 if good == "Yes" else -1.0
    good_a = labels.pointwise_good_score(sign * diffs, 0.0, good)
    good_b = labels.pointwise_good_score(0.0, 0.0, good)
    for temperature in (0.5, 1.0, 4.0):
      p = labels.pointwise_prob(good_a, good_b, temperature)
      assert np.all(np.diff(p) > 0)
      assert p[20] == pytest.approx(0.5)
  # "Is it harmful?" (good answer "No"): a less harmful response a gets p > 1/2.
  logp = np.log([[[0.1, 0.9], [0.8, 0.2]]])  # [principle, (a, b), (Yes, No)]
  assert model_label(logp, mode="pointwise", good_answers=["No"]) > 0.5
  assert model_label(logp, mode="pointwise", good_answers=["Yes"]) < 0.5
