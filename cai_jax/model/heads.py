"""Scalar heads on the transformer: the preference model's reward and PPO's value.

A scalar model's params are `{"backbone": <transformer params>, "head": {"w", "b"}}`;
its output per position is `final_hidden_BTD @ w + b` in float32. The
preference model reads it at each sequence's last real token; PPO's critic
reads it at every response position.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from cai_jax.model import transformer
from cai_jax.model.config import ModelConfig
from cai_jax.model.sharding import Sharder

Params = dict[str, Any]


def head_shapes(cfg: ModelConfig) -> Params:
  return {"w": ((cfg.dim,), ("embed",)), "b": ((), ())}


def init_head(cfg: ModelConfig, key: jax.Array) -> Params:
  """Small random w (so rewards start near 0 but gradients reach every unit)."""
  w = jax.random.normal(key, (cfg.dim,), jnp.float32) * (cfg.dim**-0.5) * 0.01
  return {"w": w, "b": jnp.zeros((), jnp.float32)}


def head_shardings(cfg: ModelConfig, sharder: Sharder) -> Params:
  return {name: sharder.sharding(axes, shape) for name, (shape, axes) in head_shapes(cfg).items()}


def scalar_model_shardings(cfg: ModelConfig, sharder: Sharder) -> Params:
  return {"backbone": transformer.param_shardings(cfg, sharder),
          "head": head_shardings(cfg, sharder)}


def abstract_head(cfg: ModelConfig) -> Params:
  return {"w": jax.ShapeDtypeStruct((cfg.dim,), jnp.float32),
          "b": jax.ShapeDtypeStruct((), jnp.float32)}


def abstract_scalar_params(cfg: ModelConfig) -> Params:
  """`jax.ShapeDtypeStruct`s of a scalar model's params (no memory)."""
  return {"backbone": transformer.abstract_params(cfg), "head": abstract_head(cfg)}


def head_values(head: Params, x_BTD: jax.Array) -> jax.Array:
  """The head on final hidden states: [B, T] float32."""
  return jnp.einsum("BTD,D->BT", x_BTD.astype(jnp.float32),
                    head["w"].astype(jnp.float32)) + head["b"]


def scalar_outputs(params: Params, tokens_BT: jax.Array, cfg: ModelConfig, *,
                   mask_BT: jax.Array | None = None, positions_BT: jax.Array | None = None,
                   sharder: Sharder | None = None) -> jax.Array:
  """The head's output at every position, [B, T] float32."""
  x_BTD, _ = transformer.hidden_states(params["backbone"], tokens_BT, cfg, mask_BT=mask_BT,
                                       positions_BT=positions_BT, sharder=sharder)
  return head_values(params["head"], x_BTD)


def last_token_index(mask_BT: jax.Array) -> jax.Array:
  """Index of each row's last real token (works for left and right padding)."""
  T = mask_BT.shape[1]
  return T - 1 - jnp.argmax(mask_BT[:, ::-1], axis=1)


def sequence_scores(params: Params, tokens_BT: jax.Array, cfg: ModelConfig, *,
                    mask_BT: jax.Array, sharder: Sharder | None = None) -> jax.Array:
  """One score per sequence, read at its last real token: [B] float32."""
  values_BT = scalar_outputs(params, tokens_BT, cfg, mask_BT=mask_BT, sharder=sharder)
  idx_B = last_token_index(mask_BT)
  return jnp.take_along_axis(values_BT, idx_B[:, None], axis=1)[:, 0]
