"""PPO with a KL penalty, as pure float32 array functions.

Shapes: B sequences, T response tokens (position t is the t-th sampled
token), D model width. `mask_BT` is 1 on real response tokens (the stop token
included) and 0 on padding after it. Losses return (sum, count) so that
microbatches and devices add up and the mean is taken once (tunix's
`algo_core` convention); per-token estimators return arrays.

Reward per token (Ziegler et al. 2019; Stiennon et al. 2020):

  r_t = -beta * kl_t + [t = last] * score

with kl_t an estimator of log pi(y_t) - log pi_ref(y_t) under the sampled
token, and beta fixed or adapted to a KL target (`adaptive_kl_coef`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def _f32(*xs):
  return tuple(jnp.asarray(x, jnp.float32) for x in xs)


# --- KL estimators (per token, under samples from pi) ----------------------------------


def kl_k1(logp_BT: jax.Array, ref_logp_BT: jax.Array) -> jax.Array:
  """k1 = log pi - log pi_ref: unbiased for KL(pi || pi_ref), high variance, may be < 0."""
  logp_BT, ref_logp_BT = _f32(logp_BT, ref_logp_BT)
  return logp_BT - ref_logp_BT


def kl_k3(logp_BT: jax.Array, ref_logp_BT: jax.Array) -> jax.Array:
  """k3 = (r - 1) - log r, r = pi_ref / pi: unbiased, >= 0, low variance (Schulman 2020)."""
  logp_BT, ref_logp_BT = _f32(logp_BT, ref_logp_BT)
  log_r = ref_logp_BT - logp_BT
  return jnp.expm1(log_r) - log_r


KL_ESTIMATORS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "k1": kl_k1, "k3": kl_k3}


# --- Rewards, whitening, GAE ---------------------------------------------------------------


def token_rewards(scores_B: jax.Array, kl_BT: jax.Array, mask_BT: jax.Array,
                  kl_coef: jax.Array | float) -> jax.Array:
  """r_t = -beta * kl_t on every response token, plus the score on the last one."""
  scores_B, kl_BT, mask_BT = _f32(scores_B, kl_BT, mask_BT)
  T = mask_BT.shape[1]
  last_B = jnp.sum(mask_BT, axis=1).astype(jnp.int32) - 1
  at_last_BT = (jnp.arange(T)[None] == last_B[:, None]).astype(jnp.float32)
  return (-kl_coef * kl_BT + at_last_BT * scores_B[:, None]) * mask_BT


def whiten(x_BT: jax.Array, mask_BT: jax.Array, shift_mean: bool = True,
           eps: float = 1e-8) -> jax.Array:
  """(x - mean) / std over the masked entries (mean kept if not shift_mean); 0 elsewhere."""
  x_BT, mask_BT = _f32(x_BT, mask_BT)
  n = jnp.maximum(jnp.sum(mask_BT), 1.0)
  mean = jnp.sum(x_BT * mask_BT) / n
  var = jnp.sum(jnp.square(x_BT - mean) * mask_BT) / n
  out = (x_BT - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return out * mask_BT


def gae(rewards_BT: jax.Array, values_BT: jax.Array, mask_BT: jax.Array, gamma: float,
        lam: float) -> tuple[jax.Array, jax.Array]:
  """Generalised advantage estimation (Schulman et al. 2016) as a reverse scan.

    delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t
    A_t     = delta_t + gamma * lam * m_{t+1} * A_{t+1}        (A_T = V_T = 0)
    R_t     = A_t + V_t                                         (value targets)

  Masked (padding) positions get A = R = 0; the episode ends after the last
  real token, so nothing flows back from padding.
  """
  rewards_BT, values_BT, mask_BT = _f32(rewards_BT, values_BT, mask_BT)
  B, T = rewards_BT.shape
  next_values_BT = jnp.concatenate([values_BT[:, 1:] * mask_BT[:, 1:],
                                    jnp.zeros((B, 1), jnp.float32)], axis=1)
  next_mask_BT = jnp.concatenate([mask_BT[:, 1:], jnp.zeros((B, 1), jnp.float32)], axis=1)
  deltas_BT = rewards_BT + gamma * next_values_BT - values_BT

  def step(adv_next_B, xs):
    delta_B, next_mask_B = xs
    adv_B = delta_B + gamma * lam * next_mask_B * adv_next_B
    return adv_B, adv_B

  _, adv_TB = jax.lax.scan(step, jnp.zeros((B,), jnp.float32),
                           (deltas_BT.T, next_mask_BT.T), reverse=True)
  adv_BT = adv_TB.T * mask_BT
  return adv_BT, (adv_BT + values_BT) * mask_BT


# --- Losses: (sum, count) ----------------------------------------------------------------


def policy_loss(logp_BT: jax.Array, old_logp_BT: jax.Array, adv_BT: jax.Array,
                mask_BT: jax.Array, clip_eps: float) -> tuple[jax.Array, jax.Array]:
  """Clipped surrogate (Schulman et al. 2017), summed over tokens.

    rho_t = exp(log pi(y_t) - log pi_old(y_t))
    L     = sum_t m_t * max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps, 1 + eps))
  """
  logp_BT, old_logp_BT, adv_BT, mask_BT = _f32(logp_BT, old_logp_BT, adv_BT, mask_BT)
  ratio_BT = jnp.exp(logp_BT - old_logp_BT)
  loss_BT = jnp.maximum(-adv_BT * ratio_BT,
                        -adv_BT * jnp.clip(ratio_BT, 1.0 - clip_eps, 1.0 + clip_eps))
  return jnp.sum(jnp.where(mask_BT > 0, loss_BT, 0.0)), jnp.sum(mask_BT)


def clipped_count(logp_BT: jax.Array, old_logp_BT: jax.Array, adv_BT: jax.Array,
                  mask_BT: jax.Array, clip_eps: float) -> tuple[jax.Array, jax.Array]:
  """(tokens where the clipped branch is active, tokens): the clip fraction's parts."""
  logp_BT, old_logp_BT, adv_BT, mask_BT = _f32(logp_BT, old_logp_BT, adv_BT, mask_BT)
  ratio_BT = jnp.exp(logp_BT - old_logp_BT)
  clipped = jnp.where(adv_BT >= 0, ratio_BT > 1.0 + clip_eps, ratio_BT < 1.0 - clip_eps)
  return jnp.sum(clipped * mask_BT), jnp.sum(mask_BT)


def value_loss(values_BT: jax.Array, old_values_BT: jax.Array, returns_BT: jax.Array,
               mask_BT: jax.Array, clip_eps: float) -> tuple[jax.Array, jax.Array]:
  """Clipped value loss, summed over tokens.

    V^clip = V_old + clip(V - V_old, -eps, eps)
    L      = sum_t m_t * 0.5 * max((V_t - R_t)^2, (V^clip_t - R_t)^2)
  """
  values_BT, old_values_BT, returns_BT, mask_BT = _f32(values_BT, old_values_BT,
                                                      returns_BT, mask_BT)
  clipped_BT = old_values_BT + jnp.clip(values_BT - old_values_BT, -clip_eps, clip_eps)
  loss_BT = 0.5 * jnp.maximum(jnp.square(values_BT - returns_BT),
                              jnp.square(clipped_BT - returns_BT))
  return jnp.sum(jnp.where(mask_BT > 0, loss_BT, 0.0)), jnp.sum(mask_BT)


def entropy_sum(entropy_BT: jax.Array, mask_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of per-token entropies over the mask, count): the bonus is -coef * sum."""
  entropy_BT, mask_BT = _f32(entropy_BT, mask_BT)
  return jnp.sum(jnp.where(mask_BT > 0, entropy_BT, 0.0)), jnp.sum(mask_BT)


# --- Log-probs of the sampled tokens without [B, T, V] logits -----------------------------


def token_logprobs(x_BTD: jax.Array, unembed: Callable[[jax.Array], jax.Array],
                   targets_BT: jax.Array, temperature: float, chunk_size: int,
                   with_entropy: bool = True) -> tuple[jax.Array, jax.Array]:
  """log softmax(z / tau)[y] and the entropy of softmax(z / tau), [B, T] float32 each.

    log p_t = z_t[y_t] / tau - logsumexp_v z_tv / tau
    H_t     = logsumexp_v (z_tv / tau) - sum_v p_tv z_tv / tau

  T is cut into chunks; each chunk's float32 logits are made, reduced to two
  numbers per token and dropped. The chunk body is rematerialised, so the
  backward pass also holds one chunk of logits at a time.
  """
  B, T, D = x_BTD.shape
  chunk_size = min(chunk_size or T, T)
  n = -(-T // chunk_size)
  pad = n * chunk_size - T
  if pad:
    x_BTD = jnp.pad(x_BTD, ((0, 0), (0, pad), (0, 0)))
    targets_BT = jnp.pad(targets_BT, ((0, 0), (0, pad)))

  def to_chunks(a):  # [B, T, ...] -> [n, B, c, ...]
    return a.reshape(B, n, chunk_size, *a.shape[2:]).swapaxes(0, 1)

  @jax.checkpoint
  def chunk(xs):
    x_BcD, y_Bc = xs
    z_BcV = unembed(x_BcD).astype(jnp.float32) / temperature
    lse_Bc = jax.nn.logsumexp(z_BcV, axis=-1)
    logp_Bc = jnp.take_along_axis(z_BcV, y_Bc[..., None], axis=-1)[..., 0] - lse_Bc
    if not with_entropy:
      return logp_Bc, jnp.zeros_like(logp_Bc)
    p_BcV = jnp.exp(z_BcV - lse_Bc[..., None])
    return logp_Bc, lse_Bc - jnp.sum(p_BcV * z_BcV, axis=-1)

  logp_nBc, ent_nBc = jax.lax.map(chunk, (to_chunks(x_BTD), to_chunks(targets_BT)))
  unchunk = lambda a: a.swapaxes(0, 1).reshape(B, n * chunk_size)[:, :T]
  return unchunk(logp_nBc), unchunk(ent_nBc)


# --- The adaptive KL controller -------------------------------------------------------------


def adaptive_kl_coef(kl_coef: float, kl: float, target: float, horizon: float,
                     n_steps: int) -> float:
  """Ziegler et al. (2019): beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon).

  `kl` is the measured KL per sequence, `n_steps` the sequences it was
  measured on. Host-side Python floats, so the coefficient is saved exactly.
  """
  error = min(max(kl / target - 1.0, -0.2), 0.2)
  return float(kl_coef * (1.0 + error * n_steps / horizon))
