"""What every phase needs: the mesh from the config, the model, the sampler."""

from __future__ import annotations

import logging

import jax
import ml_collections

from cai_jax.checkpoints.load import load_model
from cai_jax.model.sharding import Sharder, make_mesh
from cai_jax.sampling.sampler import Sampler, SamplingParams


def sharder_from_config(config: ml_collections.ConfigDict) -> Sharder:
  """The config's (data, fsdp, tensor) mesh over all devices, with its rules."""
  mesh = make_mesh(tuple(config.mesh))
  rules = tuple((k, tuple(v)) for k, v in config.get("sharding_rules", {}).items())
  return Sharder(mesh, rules) if rules else Sharder(mesh)


def load_for_sampling(model_spec: str, sharder: Sharder, dtype: str,
                      decode_layers: str = "unrolled"):
  """(cfg, params, tokenizer) with params placed in their shardings."""
  cfg, params, tok = load_model(model_spec, sharder, dtype=dtype, decode_layers=decode_layers)
  logging.info("loaded %s: %s, %.1fM params on %d device(s)", model_spec, cfg.family,
               cfg.num_params() / 1e6, len(jax.devices()))
  return cfg, params, tok


def make_sampler(cfg, tok, sharder: Sharder, max_new_tokens: int) -> Sampler:
  return Sampler(cfg, max_new_tokens=max_new_tokens, stop_ids=cfg.eos_token_ids,
                 pad_id=tok.pad_id, sharder=sharder)


def sampling_from_config(c: ml_collections.ConfigDict) -> SamplingParams:
  return SamplingParams(temperature=float(c.temperature), top_k=int(c.get("top_k", 0)),
                        top_p=float(c.get("top_p", 1.0)))
