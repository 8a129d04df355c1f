"""The losses (training/losses.py) against closed forms: SFT cross entropy, Bradley-Terry,
soft DPO and IPO."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax.training import losses


def test_sft_loss_is_cross_entropy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  targets = rng.integers(0, 7, (2, 5))
  mask = rng.integers(0, 2, (2, 5)).astype(bool)
  s, c = losses.sft_loss(logits, targets, mask)
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  nll = -np.log(np.take_along_axis(p, targets[..., None], -1)[..., 0])
  np.testing.assert_allclose(s, (nll * mask).sum(), rtol=1e-5)
  assert c == mask.sum()


def test_bradley_terry_matches_closed_form_and_gradient():
  rng = np.random.default_rng(0)
  r_a, r_b = rng.normal(size=(2, 64)).astype(np.float32) * 3
  p = rng.uniform(size=64).astype(np.float32)
  total, count = losses.bradley_terry_loss(r_a, r_b, p)
  sig = lambda x: 1 / (1 + np.exp(-x.astype(np.float64)))
  d = r_a - r_b
  expect = -(p * np.log(sig(d)) + (1 - p) * np.log(sig(-d)))
  np.testing.assert_allclose(total, expect.sum(), rtol=1e-5)
  assert count == 64
  grad_a, grad_b = jax.grad(lambda a, b: losses.bradley_terry_loss(a, b, p)[0],
                            argnums=(0, 1))(r_a, r_b)
  np.testing.assert_allclose(grad_a, sig(d) - p, rtol=1e-5, atol=1e-6)  # sigma(d) - p
  np.testing.assert_allclose(grad_b, -(sig(d) - p), rtol=1e-5, atol=1e-6)
  # The same derivative by central differences (float64 reference).
  f = lambda a: np.sum(p * np.logaddexp(0, -(a - r_b)) + (1 - p) * np.logaddexp(0, a - r_b))
  eps = 1e-4
  e0 = np.zeros(64)
  e0[0] = eps
  fd = (f(r_a.astype(np.float64) + e0) - f(r_a.astype(np.float64) - e0)) / (2 * eps)
  np.testing.assert_allclose(grad_a[0], fd, rtol=1e-3)


def test_bradley_terry_mask_extremes_and_optimum():
  r_a = jnp.asarray([200.0, -200.0, 1.0, 5.0])
  r_b = jnp.asarray([-200.0, 200.0, 0.0, jnp.nan])
  p = jnp.asarray([0.0, 1.0, 0.7, 0.5])
  mask = jnp.asarray([True, True, True, False])
  fn = lambda a: losses.bradley_terry_loss(a, r_b, p, mask)[0]
  total, count = losses.bradley_terry_loss(r_a, r_b, p, mask)
  assert count == 3 and np.isfinite(total)
  np.testing.assert_allclose(total, 400 + 400 + 0.7 * np.log1p(np.exp(-1)) +
                             0.3 * np.log1p(np.exp(1)), rtol=1e-5)
  g = jax.grad(fn)(r_a)
  assert np.all(np.isfinite(g)) and g[3] == 0.0  # the masked NaN pair leaks nothing
  # Soft label p: the gradient vanishes exactly at sigma(d) = p.
  for label in (0.1, 0.5, 0.9):
    d_star = np.log(label / (1 - label))
    g = jax.grad(lambda a: losses.bradley_terry_loss(a, jnp.zeros(1), jnp.full(1, label))[0])(
        jnp.full(1, d_star, jnp.float32))
    assert abs(float(g[0])) < 1e-6


def test_half_label_is_symmetric():
  rng = np.random.default_rng(1)
  r_a, r_b = rng.normal(size=(2, 32)).astype(np.float32)
  half = np.full(32, 0.5, np.float32)
  ab = losses.bradley_terry_loss(r_a, r_b, half)[0]
  ba = losses.bradley_terry_loss(r_b, r_a, half)[0]
  np.testing.assert_allclose(ab, ba, rtol=1e-6)
  # ...and swapping a/b with p -> 1 - p is the same comparison for any p.
  p = rng.uniform(size=32).astype(np.float32)
  np.testing.assert_allclose(losses.bradley_terry_loss(r_a, r_b, p)[0],
                             losses.bradley_terry_loss(r_b, r_a, 1 - p)[0], rtol=1e-5)
  # p = 0.5 penalises confidence either way: minimum at r_a = r_b.
  assert float(losses.bradley_terry_loss(r_a, r_a, half)[0]) < float(ab)


def softplus(x):
  return np.logaddexp(0.0, x)


def test_soft_sigmoid_loss_matches_closed_form_and_gradient():
  rng = np.random.default_rng(0)
  la, lb = rng.normal(0, 3, 64), rng.normal(0, 3, 64)
  p = rng.uniform(0, 1, 64)
  p[:8] = 1.0
  p[8:16] = 0.0
  beta = 0.3
  total, count = losses.dpo_loss(jnp.asarray(la), jnp.asarray(lb), jnp.asarray(p), beta)
  m = beta * (la - lb)
  want = p * softplus(-m) + (1 - p) * softplus(m)
  np.testing.assert_allclose(float(total), want.sum(), rtol=1e-5)
  assert float(count) == 64
  # p = 1: standard DPO, -log sigma(m)
  np.testing.assert_allclose(want[:8], -np.log(1 / (1 + np.exp(-m[:8]))), rtol=1e-5)
  grad_a = jax.grad(lambda x: losses.dpo_loss(x, jnp.asarray(lb), jnp.asarray(p), beta)[0])(
      jnp.asarray(la, jnp.float32))
  np.testing.assert_allclose(np.asarray(grad_a), beta * (1 / (1 + np.exp(-m)) - p),
                             rtol=1e-4, atol=1e-6)
  # masked pairs add nothing
  mask = np.arange(64) < 40
  t2, c2 = losses.dpo_loss(jnp.asarray(la), jnp.asarray(lb), jnp.asarray(p), beta,
                           mask_B=jnp.asarray(mask))
  np.testing.assert_allclose(float(t2), want[:40].sum(), rtol=1e-5)
  assert float(c2) == 40


def test_soft_ipo_matches_closed_form():
  rng = np.random.default_rng(1)
  la, lb = rng.normal(0, 3, 32), rng.normal(0, 3, 32)
  na, nb = rng.integers(1, 30, 32), rng.integers(1, 30, 32)
  p = rng.uniform(0, 1, 32)
  p[:4] = 1.0
  beta = 0.2
  total, _ = losses.dpo_loss(*(jnp.asarray(x) for x in (la, lb, p)), beta, "ipo",
                             response_len_a_B=jnp.asarray(na), response_len_b_B=jnp.asarray(nb))
  h = la / na - lb / nb
  want = (h - (2 * p - 1) / (2 * beta)) ** 2
  np.testing.assert_allclose(float(total), want.sum(), rtol=1e-5)
  # p = 1 is TRL's IPO, (h - 1 / (2 beta))^2; the soft loss is the p-mixture of the
  # two hard losses up to a constant in h.
  np.testing.assert_allclose(want[:4], (h[:4] - 1 / (2 * beta)) ** 2, rtol=1e-5)
  mix = p * (h - 1 / (2 * beta)) ** 2 + (1 - p) * (-h - 1 / (2 * beta)) ** 2
  const = mix - want
  np.testing.assert_allclose(const, 1 / (4 * beta ** 2) - ((2 * p - 1) / (2 * beta)) ** 2,
                             rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="loss_type"):
    losses.dpo_loss(jnp.zeros(2), jnp.zeros(2), jnp.zeros(2), 0.1, "kto")
