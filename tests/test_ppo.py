"""PPO's pieces (rl/ppo.py) against hand computations and numpy references: GAE, the KL
estimators, the clipped losses, token log-probs, whitening, the adaptive KL coefficient.
RLOO / GRPO: test_critic_free.py; the stage: e2e/test_p7_ppo.py."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax.rl import ppo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- Pure pieces ---------------------------------------------------------------------------


def gae_reference(rewards, values, mask, gamma, lam):
  """The textbook backwards loop, one sequence at a time."""
  B, T = rewards.shape
  adv = np.zeros((B, T))
  for b in range(B):
    n = int(mask[b].sum())
    last = 0.0
    for t in reversed(range(n)):
      next_v = values[b, t + 1] if t + 1 < n else 0.0
      delta = rewards[b, t] + gamma * next_v - values[b, t]
      last = delta + gamma * lam * last
      adv[b, t] = last
  return adv, (adv + values) * mask


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (0.99, 1.0)])
def test_gae_matches_a_numpy_loop(gamma, lam):
  rng = np.random.default_rng(0)
  B, T = 4, 9
  rewards, values = rng.normal(size=(B, T)), rng.normal(size=(B, T))
  lengths = np.array([9, 5, 1, 7])
  mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
  rewards = rewards * mask  # padding carries garbage values but no reward
  adv, ret = jax.jit(ppo.gae, static_argnums=(3, 4))(rewards, values, mask, gamma, lam)
  ref_adv, ref_ret = gae_reference(rewards, values, mask, gamma, lam)
  np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-5)


def test_kl_estimators():
  rng = np.random.default_rng(1)
  logp = np.log(rng.uniform(0.05, 1, size=(3, 5))).astype(np.float32)
  ref = np.log(rng.uniform(0.05, 1, size=(3, 5))).astype(np.float32)
  np.testing.assert_allclose(ppo.kl_k1(logp, ref), logp - ref, rtol=1e-6)
  r = np.exp(ref - logp)
  np.testing.assert_allclose(ppo.kl_k3(logp, ref), (r - 1) - np.log(r), rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(ppo.kl_k3(logp, ref)) >= 0)
  for est in (ppo.kl_k1, ppo.kl_k3):
    assert np.all(np.asarray(est(logp, logp)) == 0.0)


def test_clipped_losses_match_a_hand_computation():
  logp = np.log([[0.5, 0.5, 0.2, 0.9]])
  old = np.log([[0.25, 0.5, 0.4, 0.1]])  # ratios 2, 1, 0.5, 9
  adv = np.array([[1.0, -2.0, -1.0, 3.0]])
  mask = np.array([[1.0, 1.0, 1.0, 0.0]])  # the last token is padding
  total, count = ppo.policy_loss(logp, old, adv, mask, 0.2)
  # max(-A r, -A clip(r)): t0 max(-2, -1.2) = -1.2; t1 max(2, 2) = 2; t2 max(0.5, 0.8) = 0.8.
  assert float(count) == 3.0
  np.testing.assert_allclose(float(total), -1.2 + 2.0 + 0.8, rtol=1e-6)
  clipped, _ = ppo.clipped_count(logp, old, adv, mask, 0.2)
  assert float(clipped) == 2.0  # t0 (r > 1.2, A > 0) and t2 (r < 0.8, A < 0)

  values, old_v, ret = np.array([[1.0, 0.0, 2.0]]), np.array([[0.5, 0.0, 2.5]]), np.array(
      [[0.0, 1.0, 3.0]])
  vl, vc = ppo.value_loss(values, old_v, ret, np.ones((1, 3)), 0.2)
  # t0: max(1, 0.7^2); t1: max(1, 1); t2: max(1, 0.7^2 vs clip 2.3 -> 0.49) -> 1.
  np.testing.assert_allclose(float(vl), 0.5 * (1.0 + 1.0 + 1.0), rtol=1e-6)
  assert float(vc) == 3.0


def test_token_logprobs_equal_full_log_softmax():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 7, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(4, 11)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 11, size=(2, 7)), jnp.int32)
  logp, ent = ppo.token_logprobs(x, lambda h: h @ w, y, temperature=0.7, chunk_size=3)
  full = jax.nn.log_softmax((x @ w) / 0.7, axis=-1)
  np.testing.assert_allclose(logp, np.take_along_axis(full, y[..., None], -1)[..., 0],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ent, -np.sum(np.exp(full) * full, -1), rtol=1e-5, atol=1e-5)


def test_whiten_and_token_rewards():
  x = np.array([[1.0, 2.0, 3.0, 100.0]])
  mask = np.array([[1.0, 1.0, 1.0, 0.0]])
  w = np.asarray(ppo.whiten(x, mask))
  np.testing.assert_allclose(w[0, :3], (x[0, :3] - 2.0) / np.std(x[0, :3]), rtol=1e-4)
  assert w[0, 3] == 0.0
  r = ppo.token_rewards(np.array([5.0]), np.array([[0.1, 0.2, 0.3, 9.0]]), mask, 0.5)
  np.testing.assert_allclose(r, [[-0.05, -0.1, -0.15 + 5.0, 0.0]], rtol=1e-6)


def test_adaptive_kl_controller_moves_beta_towards_the_target():
  assert ppo.adaptive_kl_coef(0.1, kl=12.0, target=6.0, horizon=100, n_steps=10) == \
      pytest.approx(0.1 * (1 + 0.2 * 0.1))  # too much KL: beta up (error clipped to 0.2)
  assert ppo.adaptive_kl_coef(0.1, kl=5.7, target=6.0, horizon=100, n_steps=10) == \
      pytest.approx(0.1 * (1 - 0.05 * 0.1))  # too little: beta down
  assert ppo.adaptive_kl_coef(0.1, kl=6.0, target=6.0, horizon=100, n_steps=10) == 0.1
