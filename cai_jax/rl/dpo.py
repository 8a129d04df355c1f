"""DPO on stage 5's pairs with each pair's soft label: log-probs, loss, steps.

A pair is two conversations [user: x, assistant: y_a | y_b] (the one chat rule,
as the PM sees them). The policy's log-probability of a response is the sum of
its token log-probs over the response tokens and the end-of-turn token; the
reference (SL-CAI, frozen) is scored once before training
(`reference_logps`) and rides in each batch, so no second model is held during
training and a resumed run reads the same numbers. The loss is
`losses.dpo_loss` on logratio = log pi - log pi_ref.

Both members of a pair go through one [2B, T] forward; log-probs come in
chunks of `chunk` positions (`ppo.token_logprobs`), never [B, T, V] float32
logits.

With `lora`, the steps' `state.params` are adapters on a frozen base passed as
`frozen` (`lora.model_view`, the rule SFT, the PM and the RL policy share); the
reference is that base with the adapters off, scored once like any reference.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cai_jax import distributed
from cai_jax.data import batching, comparisons
from cai_jax.model import lora as lora_lib
from cai_jax.model import transformer
from cai_jax.model.config import ModelConfig
from cai_jax.model.sharding import Sharder
from cai_jax.rl import ppo
from cai_jax.training import losses, optim


def response_logps(params, tokens_B2T: jax.Array, mask_B2T: jax.Array,
                   response_mask_B2T: jax.Array, *, cfg: ModelConfig,
                   sharder: Sharder | None, chunk: int) -> jax.Array:
  """[B, 2] sum over each response's tokens of log pi(token | everything before it)."""
  B, _, T = tokens_B2T.shape
  tokens_NT = tokens_B2T.reshape(2 * B, T)
  x_NTD, _ = transformer.hidden_states(params, tokens_NT, cfg,
                                       mask_BT=mask_B2T.reshape(2 * B, T), sharder=sharder)
  # Position t predicts token t + 1: drop the last position and the first token.
  targets_NT = tokens_NT[:, 1:]
  scored_NT = response_mask_B2T.reshape(2 * B, T)[:, 1:].astype(jnp.float32)
  unembed = lambda x: transformer.logits_from_hidden(params, x, cfg)
  logp_NT, _ = ppo.token_logprobs(x_NTD[:, :-1], unembed, targets_NT, 1.0, chunk,
                                  with_entropy=False)
  return jnp.sum(jnp.where(scored_NT > 0, logp_NT, 0.0), axis=1).reshape(B, 2)


def response_lengths(response_mask_B2T: jax.Array) -> jax.Array:
  """[B, 2] response tokens that are scored (the first token of a row never is)."""
  return jnp.sum(response_mask_B2T[..., 1:].astype(jnp.float32), axis=-1)


def dpo_loss_fn(params, batch, *, cfg: ModelConfig, sharder: Sharder | None, beta: float,
                loss_type: str, chunk: int) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(loss sum, stats sums) of one microbatch of pairs."""
  logp_B2 = response_logps(params, batch["tokens"], batch["mask"], batch["response_mask"],
                           cfg=cfg, sharder=sharder, chunk=chunk)
  ratio_B2 = logp_B2 - batch["ref_logp"]
  len_B2 = response_lengths(batch["response_mask"])
  valid_B = batch["valid"]
  total, count = losses.dpo_loss(ratio_B2[:, 0], ratio_B2[:, 1], batch["p_a"], beta,
                                 loss_type, valid_B, len_B2[:, 0], len_B2[:, 1])
  p_B = batch["p_a"]
  margin_B = beta * (ratio_B2[:, 0] - ratio_B2[:, 1])
  decided_B = valid_B & (p_B != 0.5)
  agree_B = (margin_B > 0) == (p_B > 0.5)
  v = valid_B.astype(jnp.float32)
  return total, {"loss_sum": total, "pairs": count,
                 "correct": jnp.sum((agree_B & decided_B).astype(jnp.float32)),
                 "decided": jnp.sum(decided_B.astype(jnp.float32)),
                 # the preferred response's implicit reward minus the other's (TRL's
                 # rewards/margins); 0 for p = 0.5
                 "margin_sum": jnp.sum(jnp.where(decided_B, jnp.sign(p_B - 0.5) * margin_B,
                                                 0.0)),
                 # log pi - log pi_ref summed over both responses: a KL-like drift signal
                 "logratio_sum": jnp.sum(jnp.where(valid_B[:, None], ratio_B2, 0.0)),
                 "tokens": jnp.sum(batch["mask"].astype(jnp.float32) * v[:, None, None])}


def train_step(state: optim.TrainState, batch, frozen=None, *, cfg: ModelConfig,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               sharder: Sharder | None, microbatches: int, beta: float, loss_type: str,
               chunk: int, lora: lora_lib.LoraSpec | None = None
               ) -> tuple[optim.TrainState, dict[str, jax.Array]]:
  """One AdamW update on the pair-mean DPO loss of the whole batch; with `lora`,
  `state.params` are the adapters and `frozen` the base they adapt."""
  loss_fn = lambda p, b: dpo_loss_fn(lora_lib.model_view(p, frozen, lora), b, cfg=cfg,
                                     sharder=sharder, beta=beta, loss_type=loss_type,
                                     chunk=chunk)
  decided = lambda s: jnp.maximum(s["decided"], 1.0)
  metrics = lambda s, pairs: {"loss": s["loss_sum"] / pairs,
                              "accuracy": s["correct"] / decided(s),
                              "margin": s["margin_sum"] / decided(s),
                              "logratio": s["logratio_sum"] / (2.0 * pairs),
                              "tokens": s["tokens"]}
  return optim.gradient_step(state, batch, loss_fn, tx=tx, count="pairs",
                             microbatches=microbatches, sharder=sharder, metrics=metrics,
                             schedule=schedule)


def eval_step(params, batch, frozen=None, *, cfg: ModelConfig, sharder: Sharder | None,
              beta: float, loss_type: str, chunk: int,
              lora: lora_lib.LoraSpec | None = None) -> dict[str, jax.Array]:
  """Sums of the loss, agreement and margins over a batch of held-out pairs."""
  _, stats = dpo_loss_fn(lora_lib.model_view(params, frozen, lora), batch, cfg=cfg,
                         sharder=sharder, beta=beta, loss_type=loss_type, chunk=chunk)
  return stats


def batch_shardings(sharder: Sharder) -> dict[str, jax.sharding.Sharding]:
  """`comparisons.batch_shardings` with the response mask and the reference log-probs."""
  return {**comparisons.batch_shardings(sharder, with_responses=True),
          "ref_logp": sharder.sharding(("batch", None))}


def make_batch(data: comparisons.TokenizedPairs, ref_logp_E2: np.ndarray, rows: np.ndarray,
               T: int) -> dict[str, np.ndarray]:
  """The pairs of `rows` (-1: padding) with their stored reference log-probs."""
  batch = comparisons.make_batch(data, rows, T, with_responses=True)
  batch["ref_logp"] = np.where((rows >= 0)[:, None], ref_logp_E2[np.maximum(rows, 0)],
                               0.0).astype(np.float32)
  return batch


def reference_logps(params, splits: Sequence[tuple[comparisons.TokenizedPairs, np.ndarray]], *,
                    cfg: ModelConfig, sharder: Sharder, batch_size: int, chunk: int
                    ) -> list[np.ndarray]:
  """[E, 2] float32 log pi_ref(response) of every pair of each (pairs, buckets) split,
  in bucketed batches through one jitted function (each bucket compiles once)."""
  batch_sh = comparisons.batch_shardings(sharder, with_responses=True)
  param_sh = transformer.param_shardings(cfg, sharder)
  fn = jax.jit(lambda p, b: response_logps(p, b["tokens"], b["mask"], b["response_mask"],
                                           cfg=cfg, sharder=sharder, chunk=chunk),
               in_shardings=(param_sh, batch_sh), out_shardings=sharder.replicated)
  outs = []
  for data, buckets_E in splits:
    out = np.zeros((data.size, 2), np.float32)
    for T, rows in batching.eval_batches(buckets_E, batch_size):
      batch = comparisons.make_batch(data, rows, T, with_responses=True)
      logp_B2 = np.asarray(jax.device_get(fn(params, distributed.batch_to_global(batch,
                                                                                  batch_sh))))
      out[rows[rows >= 0]] = logp_B2[rows >= 0]
    outs.append(out)
  return outs


def stored_reference_logps(path: str, compute: Callable[[], list[np.ndarray]],
                           expect: dict[str, str]) -> list[np.ndarray]:
  """[train, held-out] reference log-probs: read from the .npz `path` when it was
  written for the same data and reference (`expect`), else computed and written
  atomically (process 0), so a resumed run trains on the same numbers."""
  if os.path.exists(path):
    with np.load(path) as f:
      found = {k: str(f[k]) for k in expect if k in f}
      if found == expect:
        return [f["train"], f["held_out"]]
    logging.warning("%s was written for other data or another reference (%s, now %s);"
                    " recomputing", path, found, expect)
  train, held = compute()
  if distributed.is_leader():
    tmp = path + ".tmp.npz"
    np.savez(tmp, train=train, held_out=held, **expect)
    os.replace(tmp, path)
  return [train, held]
