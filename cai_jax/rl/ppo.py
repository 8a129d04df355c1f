"""PPO with a KL penalty, as pure float32 array functions.

Shapes: B sequences, M response tokens (position t is the t-th sampled
token), D model width. `mask_BM` is 1 on real response tokens (the stop token
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


def kl_k1(logp_BM: jax.Array, ref_logp_BM: jax.Array) -> jax.Array:
  """k1 = log pi - log pi_ref: unbiased for KL(pi || pi_ref), high variance, may be < 0."""
  logp_BM, ref_logp_BM = _f32(logp_BM, ref_logp_BM)
  return logp_BM - ref_logp_BM


def kl_k3(logp_BM: jax.Array, ref_logp_BM: jax.Array) -> jax.Array:
  """k3 = (r - 1) - log r, r = pi_ref / pi: unbiased, >= 0, low variance (Schulman 2020)."""
  logp_BM, ref_logp_BM = _f32(logp_BM, ref_logp_BM)
  log_r = ref_logp_BM - logp_BM
  return jnp.expm1(log_r) - log_r


KL_ESTIMATORS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "k1": kl_k1, "k3": kl_k3}


# --- Rewards, whitening, GAE ---------------------------------------------------------------


def token_rewards(scores_B: jax.Array, kl_BM: jax.Array, mask_BM: jax.Array,
                  kl_coef: jax.Array | float) -> jax.Array:
  """r_t = -beta * kl_t on every response token, plus the score on the last one."""
  scores_B, kl_BM, mask_BM = _f32(scores_B, kl_BM, mask_BM)
  M = mask_BM.shape[1]
  last_B = jnp.sum(mask_BM, axis=1).astype(jnp.int32) - 1
  at_last_BM = (jnp.arange(M)[None] == last_B[:, None]).astype(jnp.float32)
  return (-kl_coef * kl_BM + at_last_BM * scores_B[:, None]) * mask_BM


def whiten(x_BM: jax.Array, mask_BM: jax.Array, shift_mean: bool = True,
           eps: float = 1e-8) -> jax.Array:
  """(x - mean) / std over the masked entries (mean kept if not shift_mean); 0 elsewhere."""
  x_BM, mask_BM = _f32(x_BM, mask_BM)
  n = jnp.maximum(jnp.sum(mask_BM), 1.0)
  mean = jnp.sum(x_BM * mask_BM) / n
  var = jnp.sum(jnp.square(x_BM - mean) * mask_BM) / n
  out = (x_BM - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return out * mask_BM


def gae(rewards_BM: jax.Array, values_BM: jax.Array, mask_BM: jax.Array, gamma: float,
        lam: float) -> tuple[jax.Array, jax.Array]:
  """Generalised advantage estimation (Schulman et al. 2016) as a reverse scan.

    delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t
    A_t     = delta_t + gamma * lam * m_{t+1} * A_{t+1}        (A_T = V_T = 0)
    R_t     = A_t + V_t                                         (value targets)

  Masked (padding) positions get A = R = 0; the episode ends after the last
  real token, so nothing flows back from padding.
  """
  rewards_BM, values_BM, mask_BM = _f32(rewards_BM, values_BM, mask_BM)
  B, M = rewards_BM.shape
  next_values_BM = jnp.concatenate([values_BM[:, 1:] * mask_BM[:, 1:],
                                    jnp.zeros((B, 1), jnp.float32)], axis=1)
  next_mask_BM = jnp.concatenate([mask_BM[:, 1:], jnp.zeros((B, 1), jnp.float32)], axis=1)
  deltas_BM = rewards_BM + gamma * next_values_BM - values_BM

  def step(adv_next_B, xs):
    delta_B, next_mask_B = xs
    adv_B = delta_B + gamma * lam * next_mask_B * adv_next_B
    return adv_B, adv_B

  _, adv_MB = jax.lax.scan(step, jnp.zeros((B,), jnp.float32),
                           (deltas_BM.T, next_mask_BM.T), reverse=True)
  adv_BM = adv_MB.T * mask_BM
  return adv_BM, (adv_BM + values_BM) * mask_BM


# --- Losses: (sum, count) ----------------------------------------------------------------


def policy_loss(logp_BM: jax.Array, old_logp_BM: jax.Array, adv_BM: jax.Array,
                mask_BM: jax.Array, clip_eps: float) -> tuple[jax.Array, jax.Array]:
  """Clipped surrogate (Schulman et al. 2017), summed over tokens.

    rho_t = exp(log pi(y_t) - log pi_old(y_t))
    L     = sum_t m_t * max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps, 1 + eps))
  """
  logp_BM, old_logp_BM, adv_BM, mask_BM = _f32(logp_BM, old_logp_BM, adv_BM, mask_BM)
  ratio_BM = jnp.exp(logp_BM - old_logp_BM)
  loss_BM = jnp.maximum(-adv_BM * ratio_BM,
                        -adv_BM * jnp.clip(ratio_BM, 1.0 - clip_eps, 1.0 + clip_eps))
  return jnp.sum(jnp.where(mask_BM > 0, loss_BM, 0.0)), jnp.sum(mask_BM)


def clipped_count(logp_BM: jax.Array, old_logp_BM: jax.Array, adv_BM: jax.Array,
                  mask_BM: jax.Array, clip_eps: float) -> tuple[jax.Array, jax.Array]:
  """(tokens where the clipped branch is active, tokens): the clip fraction's parts."""
  logp_BM, old_logp_BM, adv_BM, mask_BM = _f32(logp_BM, old_logp_BM, adv_BM, mask_BM)
  ratio_BM = jnp.exp(logp_BM - old_logp_BM)
  clipped = jnp.where(adv_BM >= 0, ratio_BM > 1.0 + clip_eps, ratio_BM < 1.0 - clip_eps)
  return jnp.sum(clipped * mask_BM), jnp.sum(mask_BM)


def value_loss(values_BM: jax.Array, old_values_BM: jax.Array, returns_BM: jax.Array,
               mask_BM: jax.Array, clip_eps: float) -> tuple[jax.Array, jax.Array]:
  """Clipped value loss, summed over tokens.

    V^clip = V_old + clip(V - V_old, -eps, eps)
    L      = sum_t m_t * 0.5 * max((V_t - R_t)^2, (V^clip_t - R_t)^2)
  """
  values_BM, old_values_BM, returns_BM, mask_BM = _f32(values_BM, old_values_BM,
                                                      returns_BM, mask_BM)
  clipped_BM = old_values_BM + jnp.clip(values_BM - old_values_BM, -clip_eps, clip_eps)
  loss_BM = 0.5 * jnp.maximum(jnp.square(values_BM - returns_BM),
                              jnp.square(clipped_BM - returns_BM))
  return jnp.sum(jnp.where(mask_BM > 0, loss_BM, 0.0)), jnp.sum(mask_BM)


def entropy_sum(entropy_BM: jax.Array, mask_BM: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of per-token entropies over the mask, count): the bonus is -coef * sum."""
  entropy_BM, mask_BM = _f32(entropy_BM, mask_BM)
  return jnp.sum(jnp.where(mask_BM > 0, entropy_BM, 0.0)), jnp.sum(mask_BM)


# --- Log-probs of the sampled tokens without [B, M, V] logits -----------------------------


def token_logprobs(x_BMD: jax.Array, unembed: Callable[[jax.Array], jax.Array],
                   targets_BM: jax.Array, temperature: float, chunk_size: int,
                   with_entropy: bool = True) -> tuple[jax.Array, jax.Array]:
  """log softmax(z / tau)[y] and the entropy of softmax(z / tau), [B, M] float32 each.

    log p_t = z_t[y_t] / tau - logsumexp_v z_tv / tau
    H_t     = logsumexp_v (z_tv / tau) - sum_v p_tv z_tv / tau

  M is cut into chunks; each chunk's float32 logits are made, reduced to two
  numbers per token and dropped. The chunk body is rematerialised, so the
  backward pass also holds one chunk of logits at a time.
  """
  B, M, D = x_BMD.shape
  chunk_size = min(chunk_size or M, M)
  n = -(-M // chunk_size)
  pad = n * chunk_size - M
  if pad:
    x_BMD = jnp.pad(x_BMD, ((0, 0), (0, pad), (0, 0)))
    targets_BM = jnp.pad(targets_BM, ((0, 0), (0, pad)))

  def to_chunks(a):  # [B, M, ...] -> [n, B, c, ...]
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

  logp_nBc, ent_nBc = jax.lax.map(chunk, (to_chunks(x_BMD), to_chunks(targets_BM)))
  unchunk = lambda a: a.swapaxes(0, 1).reshape(B, n * chunk_size)[:, :M]
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
