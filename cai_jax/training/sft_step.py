"""SFT's train and eval steps: mean response-token NLL (`losses.sft_loss`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from cai_jax.model import lora as lora_lib
from cai_jax.model import transformer
from cai_jax.model.config import ModelConfig
from cai_jax.model.sharding import Sharder
from cai_jax.training import losses, optim


def sft_loss_fn(params, batch, *, cfg: ModelConfig, sharder: Sharder | None,
                loss_chunk: int) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(loss sum, stats) of one microbatch; `loss_chunk` > 0 avoids [B,T,V] logits."""
  x_BTD, _ = transformer.hidden_states(params, batch["inputs"], cfg,
                                       mask_BT=batch["input_mask"], sharder=sharder,
                                       positions_BT=batch.get("positions"),
                                       segment_ids_BT=batch.get("segments"))
  unembed = lambda x: transformer.logits_from_hidden(params, x, cfg, sharder)
  if loss_chunk:
    total, count = losses.chunked_sft_loss(x_BTD, unembed, batch["targets"],
                                           batch["loss_mask"], loss_chunk)
  else:
    total, count = losses.sft_loss(unembed(x_BTD), batch["targets"], batch["loss_mask"])
  tokens = jnp.sum(batch["input_mask"].astype(jnp.float32))
  return total, {"loss_sum": total, "loss_tokens": count, "tokens": tokens}


def train_step(state: optim.TrainState, batch, frozen=None, *, cfg: ModelConfig,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               sharder: Sharder | None, microbatches: int, loss_chunk: int,
               lora: lora_lib.LoraSpec | None = None
               ) -> tuple[optim.TrainState, dict[str, jax.Array]]:
  """One AdamW update on the mean response-token NLL of the whole batch; with `lora`,
  `state.params` are the adapters and `frozen` the base they adapt."""
  loss_fn = lambda p, b: sft_loss_fn(lora_lib.model_view(p, frozen, lora), b, cfg=cfg,
                                     sharder=sharder, loss_chunk=loss_chunk)
  metrics = lambda s, tokens: {"loss": s["loss_sum"] / tokens, "tokens": s["tokens"],
                               "loss_tokens": s["loss_tokens"]}
  return optim.gradient_step(state, batch, loss_fn, tx=tx, count="loss_tokens",
                             microbatches=microbatches, sharder=sharder, metrics=metrics,
                             schedule=schedule)


def eval_step(params, batch, frozen=None, *, cfg: ModelConfig, sharder: Sharder | None,
              loss_chunk: int, lora: lora_lib.LoraSpec | None = None
              ) -> tuple[jax.Array, jax.Array]:
  total, stats = sft_loss_fn(lora_lib.model_view(params, frozen, lora), batch, cfg=cfg,
                             sharder=sharder, loss_chunk=loss_chunk)
  return total, stats["loss_tokens"]
