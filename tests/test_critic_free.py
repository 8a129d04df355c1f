"""RLOO and GRPO advantages (rl/critic_free.py) against numpy."""

import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax.rl import critic_free


def rloo_reference(rewards, k):
  """TRL's RLOOTrainer: the baseline is the mean of the other k - 1 samples."""
  r = np.asarray(rewards, np.float64).reshape(-1, k)
  out = np.zeros_like(r)
  for p in range(r.shape[0]):
    for i in range(k):
      out[p, i] = r[p, i] - np.mean([r[p, j] for j in range(k) if j != i])
  return out.reshape(-1)


def grpo_reference(rewards, k):
  """TRL's GRPOTrainer: (r - group mean) / (group std, Bessel-corrected, + 1e-4)."""
  r = np.asarray(rewards, np.float64).reshape(-1, k)
  mean = r.mean(axis=1, keepdims=True)
  std = np.sqrt(((r - mean) ** 2).sum(axis=1, keepdims=True) / (k - 1))
  return ((r - mean) / (std + 1e-4)).reshape(-1)


@pytest.mark.parametrize("algorithm,reference", [("rloo", rloo_reference),
                                                 ("grpo", grpo_reference)])
@pytest.mark.parametrize("k", [2, 4])
def test_group_advantages_match_numpy(algorithm, reference, k):
  rng = np.random.default_rng(k)
  B, T = 3 * k, 7
  scores = rng.normal(size=B).astype(np.float32)
  kl = rng.normal(size=(B, T)).astype(np.float32) * 0.1
  lengths = rng.integers(1, T + 1, size=B)
  mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
  coef = 0.3
  rewards = critic_free.sequence_rewards(scores, kl, mask, coef)
  np.testing.assert_allclose(rewards, scores - coef * (kl * mask).sum(1), rtol=1e-6)
  adv = critic_free.token_advantages(algorithm, rewards, mask, k)
  want = reference(scores - coef * (kl * mask).sum(1), k)
  np.testing.assert_allclose(np.asarray(adv), want[:, None] * mask, rtol=1e-5, atol=1e-6)
  # Every group's advantages sum to 0 (RLOO exactly, GRPO up to the eps scaling).
  np.testing.assert_allclose(np.asarray(adv)[:, 0].reshape(-1, k).sum(1), 0.0, atol=1e-5)


def test_grpo_group_of_equal_rewards_has_zero_advantage():
  adv = critic_free.grpo(jnp.ones((2, 4)))
  assert np.all(np.asarray(adv) == 0.0)
