"""A training stage's final params as a Hugging Face directory."""

from __future__ import annotations

import json
import logging
import os

import jax

from cai_jax.checkpoints import hf
from cai_jax.model.config import ModelConfig
from cai_jax.text.tokenizer import Tokenizer


def export_hf(params, cfg: ModelConfig, tok: Tokenizer, path: str, step: int) -> None:
  """The params as a Hugging Face directory (gathered to process 0).

  Skipped when `path` already holds the export of this step, so rerunning a
  finished stage leaves its files (and what later stages derived from them)
  untouched.
  """
  marker = os.path.join(path, "cai_jax_export.json")
  if os.path.exists(marker):
    with open(marker) as f:
      if json.load(f).get("step") == step:
        return
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    params = multihost_utils.process_allgather(params, tiled=True)
  if jax.process_index() == 0:
    hf.save_hf(params, cfg, path, tokenizer=tok)
    with open(marker, "w") as f:
      json.dump({"step": step}, f)
    logging.info("exported %s", path)
