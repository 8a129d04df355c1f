"""The PM's train and eval steps: an LM with a scalar head, Bradley-Terry on soft labels.

Both members of a pair go through one [2B, T] forward (`pair_rewards`), the
score read at each conversation's last real token (`heads.sequence_scores`),
and the loss is `losses.bradley_terry_loss`.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import optax

from cai_jax.checkpoints.load import load_model
from cai_jax.model import heads
from cai_jax.model import lora as lora_lib
from cai_jax.model.config import ModelConfig
from cai_jax.model.sharding import Sharder
from cai_jax.text.tokenizer import Tokenizer
from cai_jax.training import losses, optim


def init_scalar_model(spec: str, sharder: Sharder, key: jax.Array, *, tokenizer: str,
                      **overrides) -> tuple[ModelConfig, heads.Params, Tokenizer]:
  """(cfg, {"backbone", "head"} in their shardings, tokenizer): LM `spec` + a fresh head."""
  backbone_key, head_key = jax.random.split(key)
  cfg, backbone, tok = load_model(spec, sharder, tokenizer=tokenizer, key=backbone_key,
                                  **overrides)
  head = jax.jit(functools.partial(heads.init_head, cfg),
                 out_shardings=heads.head_shardings(cfg, sharder))(head_key)
  logging.info("scalar model on %s: %s, %.1fM params; %r", spec, cfg.family,
               cfg.num_params() / 1e6, tok)
  return cfg, {"backbone": backbone, "head": head}, tok


def pair_rewards(params: heads.Params, tokens_B2T: jax.Array, mask_B2T: jax.Array,
                 cfg: ModelConfig, sharder: Sharder | None) -> jax.Array:
  """[B, 2] rewards: one [2B, T] forward, pair b's members in rows 2b and 2b + 1."""
  B, _, T = tokens_B2T.shape
  rewards = heads.sequence_scores(params, tokens_B2T.reshape(2 * B, T), cfg,
                                  mask_BT=mask_B2T.reshape(2 * B, T), sharder=sharder)
  return rewards.reshape(B, 2)


def pm_loss_fn(params, batch, *, cfg: ModelConfig, sharder: Sharder | None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(loss sum, stats sums) of one microbatch of pairs."""
  r_B2 = pair_rewards(params, batch["tokens"], batch["mask"], cfg, sharder)
  valid_B = batch["valid"]
  total, count = losses.bradley_terry_loss(r_B2[:, 0], r_B2[:, 1], batch["p_a"], valid_B)
  p_B = batch["p_a"]
  decided_B = valid_B & (p_B != 0.5)
  agree_B = (r_B2[:, 0] > r_B2[:, 1]) == (p_B > 0.5)
  v_B1 = valid_B[:, None]
  r = jnp.where(v_B1, r_B2, 0.0)
  return total, {"loss_sum": total, "pairs": count,
                 "correct": jnp.sum((agree_B & decided_B).astype(jnp.float32)),
                 "decided": jnp.sum(decided_B.astype(jnp.float32)),
                 "reward_sum": jnp.sum(r), "reward_sq_sum": jnp.sum(r * r)}


def train_step(state: optim.TrainState, batch, frozen=None, *, cfg: ModelConfig,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               sharder: Sharder | None, microbatches: int,
               lora: lora_lib.LoraSpec | None = None
               ) -> tuple[optim.TrainState, dict[str, jax.Array]]:
  """One AdamW update on the mean Bradley-Terry loss of the batch's pairs (with LoRA,
  `state.params` are `{"adapters", "head"}` on the `frozen` backbone)."""
  loss_fn = lambda p, b: pm_loss_fn(lora_lib.scalar_view(p, frozen, lora), b, cfg=cfg,
                                    sharder=sharder)

  def metrics(s, pairs):
    mean = s["reward_sum"] / (2 * pairs)
    return {"loss": s["loss_sum"] / pairs,
            "accuracy": s["correct"] / jnp.maximum(s["decided"], 1.0), "reward_mean": mean,
            "reward_std": jnp.sqrt(jnp.maximum(s["reward_sq_sum"] / (2 * pairs) - mean**2,
                                               0.0))}

  return optim.gradient_step(state, batch, loss_fn, tx=tx, count="pairs",
                             microbatches=microbatches, sharder=sharder, metrics=metrics,
                             schedule=schedule)


def eval_step(params, batch, frozen=None, *, cfg: ModelConfig, sharder: Sharder | None,
              lora: lora_lib.LoraSpec | None = None) -> jax.Array:
  return pair_rewards(lora_lib.scalar_view(params, frozen, lora), batch["tokens"],
                      batch["mask"], cfg, sharder)
