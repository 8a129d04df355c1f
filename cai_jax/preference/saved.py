"""A trained PM on disk: its config and tokenizer beside the Orbax params.

  <pm dir>/model/        model_config.json (`model.config.config_to_json`),
                         pm.json (seq_len, system prompt, source model),
                         the tokenizer files
  <pm dir>/checkpoints/  Orbax steps; params {"backbone", "head"}, or with LoRA
                         {"adapters", "head"} (pm.json's "lora" names the base)
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
CHECKPOINTS = "checkpoints"  # where stage 6 trains them (`training.supervised.fit`)


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
  info = read_info(pm_dir)
  if "lora" not in info:
    shardings = heads.scalar_model_shardings(cfg, sharder)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          heads.abstract_scalar_params(cfg), shardings)
    return cfg, checkpoint.restore_params(os.path.join(pm_dir, CHECKPOINTS), target, step), tok
  # LoRA: the adapters and head from the checkpoint, merged into the named base.
  from cai_jax.checkpoints.load import load_model
  from cai_jax.model import lora, transformer
  spec = lora.LoraSpec(int(info["lora"]["lora_rank"]), float(info["lora"]["lora_alpha"]),
                       tuple(info["lora"]["lora_targets"]))
  base_spec = info["lora"]["lora_base"]
  if base_spec.startswith("random:"):
    raise ValueError(f"{pm_dir}: a LoRA PM on a random base ({base_spec}) cannot be"
                     " restored (its weights are not on disk); train it on a saved model")
  base_cfg, base, _ = load_model(base_spec, sharder, tokenizer=info.get("tokenizer", "bytes"),
                                 **info.get("model_overrides", {}))
  if base_cfg != cfg:
    raise ValueError(f"{pm_dir}: pm.json's base {base_spec} is not the model this PM was"
                     " trained on (its config differs from model/model_config.json)")
  shardings = {"adapters": lora.adapter_shardings(cfg, spec, sharder),
               "head": heads.head_shardings(cfg, sharder)}
  abstract = {"adapters": lora.abstract_adapters(cfg, spec), "head": heads.abstract_head(cfg)}
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
  trained = checkpoint.restore_params(os.path.join(pm_dir, CHECKPOINTS), target, step)
  backbone = jax.jit(lambda b, a: lora.merge(b, a, spec),
                     out_shardings=transformer.param_shardings(cfg, sharder))(
                         base, trained["adapters"])
  return cfg, {"backbone": backbone, "head": trained["head"]}, tok
