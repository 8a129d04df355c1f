"""A trained PM on disk: its config and tokenizer beside the Orbax params.

  <pm dir>/model/        model_config.json (`model.config.config_to_json`),
                         pm.json (seq_len, system prompt, source model),
                         the tokenizer files
  <pm dir>/checkpoints/  Orbax steps; params {"backbone", "head"}
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax

from cai_jax import distributed
from cai_jax.model import heads
from cai_jax.model.config import ModelConfig, config_from_json, config_to_json
from cai_jax.model.sharding import Sharder
from cai_jax.text.tokenizer import Tokenizer
from cai_jax.training import checkpoint

MODEL_DIR = "model"
CHECKPOINTS = "checkpoints"


def is_pm_dir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, MODEL_DIR))


def save_model_files(pm_dir: str, cfg: ModelConfig, tok: Tokenizer, info: dict[str, Any]
                     ) -> None:
  """model_config.json + pm.json + tokenizer files (process 0, atomically)."""
  if not distributed.is_leader():
    return
  path = os.path.join(pm_dir, MODEL_DIR)
  tmp = path.rstrip("/") + ".tmp"
  os.makedirs(tmp, exist_ok=True)
  with open(os.path.join(tmp, "model_config.json"), "w") as f:
    json.dump(config_to_json(cfg), f, indent=1)
  with open(os.path.join(tmp, "pm.json"), "w") as f:
    json.dump({**info, "system_prompt": tok.default_system_prompt}, f, indent=1)
  tok.save(tmp)
  shutil.rmtree(path, ignore_errors=True)
  os.replace(tmp, path)


def read_info(pm_dir: str) -> dict[str, Any]:
  """pm.json: seq_len, system prompt, source model."""
  with open(os.path.join(pm_dir, MODEL_DIR, "pm.json")) as f:
    return json.load(f)


def restore_preference_model(pm_dir: str, sharder: Sharder, step: int | None = None
                             ) -> tuple[ModelConfig, heads.Params, Tokenizer]:
  """(cfg, params {"backbone", "head"} in their shardings, tokenizer) of a trained PM.

  The params come from the Orbax checkpoint (default: the latest step)
  restored into `eval_shape` targets carrying `sharder`'s shardings, so any
  mesh works.
  """
  if not is_pm_dir(pm_dir):
    raise FileNotFoundError(f"{pm_dir}: no trained preference model (expected"
                            f" {os.path.join(pm_dir, MODEL_DIR)})")
  model = os.path.join(pm_dir, MODEL_DIR)
  with open(os.path.join(model, "model_config.json")) as f:
    cfg = config_from_json(json.load(f))
  tok = Tokenizer.from_dir(model).with_system_prompt(read_info(pm_dir).get("system_prompt"))
  shardings = heads.scalar_model_shardings(cfg, sharder)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        heads.abstract_scalar_params(cfg), shardings)
  params = checkpoint.restore_params(os.path.join(pm_dir, CHECKPOINTS), target, step)
  return cfg, params, tok
