"""What the stage configs share: the sharding table, the LoRA and optimizer blocks, and
the variant helper every `get_config(arg)` ends with."""

import ml_collections

from cai_jax.model import sharding

# (logical axis, mesh axes): batch over data x fsdp, weights FSDP over their
# model dimension, heads / MLP / vocabulary over tensor. Edit a copy here to
# shard differently; the table itself lives in cai_jax/model/sharding.py.
FSDP_RULES = dict(sharding.DEFAULT_RULES)
# The training stages' dtype and rematerialisation: float32 without remat on a CPU,
# bfloat16 with full remat at accelerator scale (the `full` variants).
SMALL_MODEL = {"dtype": "float32", "remat": "none"}
FULL_MODEL = {"dtype": "bfloat16", "remat": "full"}


def training_stage(model: str) -> ml_collections.ConfigDict:
  """How a training stage's config (SFT, PM, DPO) starts: seed 0, `model` (a load_model
  spec: bundled asset, HF directory, .gguf, hub id; "random:<preset>" with `tokenizer`
  "bytes" or a tokenizer path; "" for stage 3's SL-CAI export <workdir>/p3_sft/hf),
  SMALL_MODEL's dtype and remat, and FSDP over every device of a (data, fsdp, tensor)
  mesh."""
  return ml_collections.ConfigDict({
      "seed": 0, "model": model, "tokenizer": "bytes",
      "model_overrides": ml_collections.ConfigDict(SMALL_MODEL), "mesh": (1, -1, 1),
      "num_devices": 0,  # 0: every device; n: the mesh takes the first n
      "sharding_rules": FSDP_RULES})


def schedule(num_epochs: int, log_every: int, every: int) -> dict:
  """A training loop's length and cadence: `num_epochs` over the data (unless `num_steps`
  > 0), a log line every `log_every` steps, an evaluation and a checkpoint every `every`
  steps, the last two checkpoints kept."""
  return {"num_epochs": num_epochs, "num_steps": 0, "log_every": log_every,
          "eval_every": every, "save_every": every, "keep_checkpoints": 2}


def lora() -> ml_collections.ConfigDict:
  """LoRA (cai_jax.model.lora): rank 0 trains every weight; > 0 trains adapters of
  that rank on `targets` (scaled by alpha / rank) on frozen base weights."""
  return ml_collections.ConfigDict(
      {"rank": 0, "alpha": 16.0, "targets": ("q", "k", "v", "o", "gate", "up", "down")})


def optim(lr: float, warmup_steps: int, decay: str = "constant", end_lr_ratio: float = 1.0,
          weight_decay: float = 0.0) -> ml_collections.ConfigDict:
  """AdamW (b1 0.9, b2 0.95) with a linear warm-up to `lr`, then `decay` ("constant" or
  "cosine") to end_lr_ratio x lr, and gradients clipped to global norm 1
  (cai_jax.training.optim reads these fields)."""
  return ml_collections.ConfigDict({
      "lr": lr, "warmup_steps": warmup_steps, "decay": decay, "end_lr_ratio": end_lr_ratio,
      "b1": 0.9, "b2": 0.95, "eps": 1e-8, "weight_decay": weight_decay, "clip_norm": 1.0})


def variant(c: ml_collections.ConfigDict, arg: str, name: str,
            **variants: dict) -> ml_collections.ConfigDict:
  """`c` with variant `arg`'s fields set: each variant is a nested dict merged into `c`
  (a section's dict sets only the fields it names). `name` is the config file's, for
  the one-line error an unknown variant raises."""
  if arg not in variants:
    *most, last = variants
    raise ValueError(f"configs/{name}.py: unknown variant {arg!r}; use {', '.join(most)}"
                     f" or {last}")
  c.update(variants[arg])
  return c
