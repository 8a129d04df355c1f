"""Stage 7, DPO (RL-CAI without a PM): DPO on stage 5's pairs with soft labels.

  cai-jax stage dpo --config=dpo:cpu --workdir=runs/cai

Pairs come from `<workdir>/p5_ai_labels` (`--config.data.labels_dir=...`), split
exactly as stage 6 splits them (the `data` fields are the PM's); policy and
reference from stage 3 (`<workdir>/p3_sft/hf`; `--config.model=...`). Output
goes to `<workdir>/p7_dpo/`; rerunning the same command resumes.

Variants:
  tiny  a random 2-layer model with a byte tokenizer (tests, smoke runs):
          cai-jax stage dpo --config=dpo:tiny --workdir=/tmp/dpo
  cpu   the SL-CAI model (SmolLM2-135M), batch 8 pairs, a few epochs.
  full  accelerator scale: bf16, remat, batch 256 pairs.
"""

import ml_collections

from cai_jax.configs import common, preference_model


def get_config(arg: str = "cpu") -> ml_collections.ConfigDict:
  c = common.training_stage("")  # "": the SL-CAI model; also the frozen reference

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
  c.train.update(common.schedule(num_epochs=2, log_every=5, every=50))

  # LoRA (common.lora): adapters train on the frozen SL-CAI model, also the reference.
  c.lora = common.lora()

  c.optim = common.optim(lr=5e-7, warmup_steps=5)

  return common.variant(
      c, arg, "dpo",
      tiny={"model": "random:tiny_llama",
            "train": {"num_epochs": 0, "num_steps": 8, "log_every": 1, "eval_every": 4,
                      "save_every": 4, "logits_chunk": 16},
            "optim": {"lr": 1e-3, "warmup_steps": 2}},
      cpu={"optim": {"lr": 5e-6}},
      full={"model_overrides": common.FULL_MODEL, "mesh": (-1, 8, 1),
            "train": {"batch_size": 256, "microbatches": 8, "eval_batch_size": 64,
                      "logits_chunk": 128, "num_epochs": 1, "eval_every": 100,
                      "save_every": 100, "keep_checkpoints": 3},
            "optim": {"warmup_steps": 50}})
