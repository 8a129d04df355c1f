"""The learner's advantages (`rl.learner`): what PPO, RLOO and GRPO feed their loss, against
hand computations of the KL-penalised rewards, whitening, GAE and the group baselines."""

import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax.rl import learner
from test_critic_free import grpo_reference, rloo_reference
from test_ppo import gae_reference


def whiten_reference(x, mask, shift_mean=True, eps=1e-8):
  """(x - mean) / sqrt(var + eps) over the real tokens (mean added back if not
  shift_mean), 0 on padding."""
  real = mask > 0
  mean = x[real].mean()
  out = (x - mean) / np.sqrt(((x[real] - mean) ** 2).mean() + eps)
  return (out + (0.0 if shift_mean else mean)) * mask


def kl_reference(logp, ref, estimator):
  """Per-token KL estimates under samples from pi (Schulman 2020): k1 = log pi/pi_ref,
  k3 = (r - 1) - log r with r = pi_ref / pi."""
  log_r = ref - logp
  return -log_r if estimator == "k1" else np.expm1(log_r) - log_r


def _rollout_arrays(seed, B, M):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, M + 1, size=B)
  mask = (np.arange(M)[None] < lengths[:, None]).astype(np.float32)
  logp = -rng.uniform(0.1, 3.0, size=(B, M)).astype(np.float32)
  ref = (logp + rng.normal(0, 0.5, size=(B, M))).astype(np.float32)
  return rng.normal(size=B).astype(np.float32), logp, ref, mask, rng


@pytest.mark.parametrize("estimator", ["k1", "k3"])
@pytest.mark.parametrize("whiten_rewards", [False, True])
def test_learner_advantages_match_a_hand_computation(estimator, whiten_rewards):
  """What the PPO learner feeds its loss: r_t = -beta kl_t (+ the score on the last
  token), [whitened, mean kept], GAE, whitened; beta = 0.3, so a learner that dropped the
  KL penalty fails."""
  B, M, beta, gamma, lam = 6, 9, 0.3, 0.97, 0.9
  scores, logp, ref, mask, rng = _rollout_arrays(0, B, M)
  values = (rng.normal(size=(B, M)) * mask).astype(np.float32)
  kl = kl_reference(logp.astype(np.float64), ref, estimator) * mask
  rewards = -beta * kl
  last = mask.sum(1).astype(int) - 1
  rewards[np.arange(B), last] += scores
  if whiten_rewards:
    rewards = whiten_reference(rewards, mask, shift_mean=False)
  adv, returns = gae_reference(rewards, values, mask, gamma, lam)
  out = learner.advantages(scores, logp, ref, values, mask, jnp.float32(beta),
                           estimator=estimator, gamma=gamma, lam=lam,
                           whiten_rewards=whiten_rewards)
  np.testing.assert_allclose(out["adv"], whiten_reference(adv, mask), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out["returns"], returns, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out["kl_B"], kl.sum(1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["k1_B"], ((logp - ref) * mask).sum(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("algorithm,reference", [("rloo", rloo_reference),
                                                 ("grpo", grpo_reference)])
@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_learner_group_advantages_match_a_hand_computation(algorithm, reference, estimator):
  """RLOO / GRPO: R = score - beta * sum_t kl_t, the group's advantage on every token."""
  k, beta = 4, 0.3
  B, M = 3 * k, 7
  scores, logp, ref, mask, _ = _rollout_arrays(1, B, M)
  kl = kl_reference(logp.astype(np.float64), ref, estimator) * mask
  R = scores - beta * kl.sum(1)
  out = learner.group_advantages(scores, logp, ref, mask, jnp.float32(beta),
                                 algorithm=algorithm, estimator=estimator,
                                 samples_per_prompt=k)
  np.testing.assert_allclose(out["adv"], reference(R, k)[:, None] * mask, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out["group_std_Q"], R.reshape(-1, k).std(axis=1, ddof=1),
                             rtol=1e-4)
