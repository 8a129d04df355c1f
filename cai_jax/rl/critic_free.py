"""Critic-free advantages (RLOO, GRPO), as pure float32 array functions.

Each of Q prompts is answered C times (`rollout.samples_per_prompt`); the
B = Q * C sequences are laid out prompt-major (rows q*C .. q*C + C - 1 answer
prompt q). M is the response axis, as in the shape legend (`model.transformer`).
The KL penalty enters the reward through the same one knob as PPO's
(`config.kl`), summed over the sequence instead of spread over its tokens:

  R_i = score_i - beta * sum_t kl_{i,t}

and every response token of sequence i gets the same advantage A_i:

  RLOO (Ahmadian et al. 2024; TRL's RLOOTrainer):
      A_i = R_i - mean_{j != i} R_j          (the leave-one-out baseline)
  GRPO (Shao et al. 2024; TRL's GRPOTrainer):
      A_i = (R_i - mean_j R_j) / (std_j R_j + eps)   (std with Bessel's correction)

No value head, no critic pass and no GAE: the group is the baseline. The
update is PPO's token-level clipped surrogate (`rl.ppo.policy_loss`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

ALGORITHMS = ("ppo", "rloo", "grpo")  # "ppo" uses a critic (`rl.learner`); the rest do not
GRPO_EPS = 1e-4  # TRL's GRPOTrainer: advantages / (std + 1e-4)


def sequence_rewards(scores_B: jax.Array, kl_BM: jax.Array, mask_BM: jax.Array,
                     kl_coef: jax.Array | float) -> jax.Array:
  """R = score - beta * (the sequence's summed per-token KL estimate)."""
  kl_B = jnp.sum(jnp.asarray(kl_BM, jnp.float32) * mask_BM, axis=1)
  return jnp.asarray(scores_B, jnp.float32) - kl_coef * kl_B


def rloo(rewards_QC: jax.Array) -> jax.Array:
  """A_i = R_i minus the mean of the other C - 1 rewards of its prompt."""
  C = rewards_QC.shape[1]
  baseline_QC = (jnp.sum(rewards_QC, axis=1, keepdims=True) - rewards_QC) / (C - 1)
  return rewards_QC - baseline_QC


def grpo(rewards_QC: jax.Array) -> jax.Array:
  """A_i = (R_i - group mean) / (group std + eps), std with Bessel's correction."""
  mean_Q1 = jnp.mean(rewards_QC, axis=1, keepdims=True)
  std_Q1 = jnp.std(rewards_QC, axis=1, keepdims=True, ddof=1)
  return (rewards_QC - mean_Q1) / (std_Q1 + GRPO_EPS)


GROUP_ADVANTAGES: dict[str, Callable[[jax.Array], jax.Array]] = {"rloo": rloo, "grpo": grpo}


def token_advantages(algorithm: str, rewards_B: jax.Array, mask_BM: jax.Array,
                     samples_per_prompt: int) -> jax.Array:
  """Each sequence's group advantage on each of its response tokens, [B, M]."""
  B = rewards_B.shape[0]
  adv_QC = GROUP_ADVANTAGES[algorithm](rewards_B.reshape(B // samples_per_prompt,
                                                         samples_per_prompt))
  return adv_QC.reshape(B)[:, None] * mask_BM
