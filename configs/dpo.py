"""Stage 7, DPO (RL-CAI without a PM): DPO on stage 5's pairs with soft labels.

  python -m cai_jax.phases.p7_dpo --config=configs/dpo.py:cpu --workdir=runs/cai

Pairs come from `<workdir>/p5_ai_labels` (`--config.data.labels_dir=...`), split
exactly as stage 6 splits them (the `data` fields are the PM's); policy and
reference from stage 3 (`<workdir>/p3_sft/hf`; `--config.model=...`). Output
goes to `<workdir>/p7_dpo/`; rerunning the same command resumes.

Variants:
  tiny  a random 2-layer model with a byte tokenizer (tests, smoke runs):
          python -m cai_jax.phases.p7_dpo --config=configs/dpo.py:tiny --workdir=/tmp/dpo
  cpu   the SL-CAI model (SmolLM2-135M), batch 8 pairs, a few epochs.
  full  accelerator scale: bf16, remat, batch 256 pairs.
"""

import ml_collections

from configs import preference_model, sft


def get_config(arg: str = "cpu") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = ""  # "": the SL-CAI model <workdir>/p3_sft/hf; also the frozen reference
  c.tokenizer = "bytes"  # only for random:<preset>
  c.model_overrides = ml_collections.ConfigDict({"dtype": "float32", "remat": "none"})
  c.mesh = (1, -1, 1)  # (data, fsdp, tensor)
  c.sharding_rules = sft.FSDP_RULES

  # The PM's comparisons and split (labels_dir, helpful_ratio, eval_size, seq_len, ...).
  c.data = preference_model.get_config(arg).data

  c.dpo = ml_collections.ConfigDict()
  c.dpo.beta = 0.1  # KL strength: implicit reward = beta * (log pi - log pi_ref)
  c.dpo.loss_type = "sigmoid"  # soft-label Bradley-Terry on the implicit rewards; or "ipo"

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 8  # pairs per optimizer step (2x sequences per forward)
  c.train.microbatches = 1
  c.train.eval_batch_size = 8
  c.train.logits_chunk = 64  # positions per log-prob chunk (never [B, T, V] fp32 logits)
  c.train.num_epochs = 2
  c.train.num_steps = 0  # > 0 overrides num_epochs
  c.train.log_every = 5
  c.train.eval_every = 50
  c.train.save_every = 50
  c.train.keep_checkpoints = 2

  # LoRA (cai_jax.model.lora), as in configs/sft.py: rank 0 trains every weight; > 0
  # trains adapters on the frozen SL-CAI model, which is also the reference.
  c.lora = sft.get_config(arg).lora

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 5e-7
  c.optim.warmup_steps = 5
  c.optim.decay = "constant"
  c.optim.end_lr_ratio = 1.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0
  c.optim.clip_norm = 1.0

  if arg == "tiny":
    c.model = "random:tiny_llama"
    c.train.num_epochs = 0
    c.train.num_steps = 8
    c.train.log_every = 1
    c.train.eval_every = 4
    c.train.save_every = 4
    c.train.logits_chunk = 16
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 2
  elif arg == "cpu":
    c.optim.lr = 5e-6
  elif arg == "full":
    c.model_overrides = ml_collections.ConfigDict({"dtype": "bfloat16", "remat": "full"})
    c.mesh = (-1, 8, 1)
    c.train.batch_size = 256
    c.train.microbatches = 8
    c.train.eval_batch_size = 64
    c.train.logits_chunk = 128
    c.train.num_epochs = 1
    c.train.eval_every = 100
    c.train.save_every = 100
    c.train.keep_checkpoints = 3
    c.optim.lr = 5e-7
    c.optim.warmup_steps = 50
  else:
    raise ValueError(f"configs/dpo.py: unknown variant {arg!r}; use tiny, cpu or full")
  return c
