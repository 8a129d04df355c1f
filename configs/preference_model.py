"""Stage 6 (RL-CAI): the preference model on AI harmlessness + helpfulness labels.

  python -m cai_jax.phases.p6_preference_model \
      --config=configs/preference_model.py:cpu --workdir=runs/cai

AI labels come from `<workdir>/p5_ai_labels` unless
`--config.data.labels_dir=...` says otherwise. Human helpfulness comparisons
(prompt, chosen, rejected columns; .jsonl/.json/.csv/.parquet) replace the AI
helpful labels with `--config.data.helpful_comparisons=/data/helpful.jsonl`.
Output goes to `<workdir>/p6_preference_model/`; rerunning the same command
resumes from the last checkpoint. PPO loads the result with
`cai_jax.preference.saved.restore_preference_model(<workdir>/p6_preference_model, sharder)`.

Variants:
  tiny  a random 2-layer model with a byte tokenizer (tests, smoke runs):
          python -m cai_jax.phases.p6_preference_model \
              --config=configs/preference_model.py:tiny --workdir=/tmp/pm
  cpu   the stage-3 SFT export `<workdir>/p3_sft/hf` if present, else
        SmolLM2-135M-Instruct (bundled); seq 512, batch 8 pairs.
  full  accelerator scale: bf16, remat, batch 512 pairs (1024 sequences),
        1 epoch; point `model` at the pretrained LM the PM starts from, e.g.
          --config.model=/ckpt/llama3-8b-hf
"""

import ml_collections

from cai_jax.model import sharding

# (logical axis, mesh axes): batch over data x fsdp, weights FSDP over their
# model dimension, heads / MLP / vocabulary over tensor. Edit a copy here to
# shard differently; the table itself lives in cai_jax/model/sharding.py.
FSDP_RULES = dict(sharding.DEFAULT_RULES)


def get_config(arg: str = "cpu") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # load_model spec, or "": the SL-CAI model <workdir>/p3_sft/hf (run stage 3 first).
  c.model = ""
  c.tokenizer = "bytes"  # only for random:<preset>: "bytes" or a tokenizer path
  c.model_overrides = ml_collections.ConfigDict({"dtype": "float32", "remat": "none"})
  c.mesh = (1, -1, 1)  # (data, fsdp, tensor)
  c.sharding_rules = FSDP_RULES

  # LoRA (cai_jax.model.lora): rank 0 trains every weight; > 0 trains adapters of that
  # rank on `targets` and the head, on the frozen SL-CAI backbone.
  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 0
  c.lora.alpha = 16.0
  c.lora.targets = ("q", "k", "v", "o", "gate", "up", "down")

  c.data = ml_collections.ConfigDict()
  c.data.labels_dir = ""  # "": <workdir>/p5_ai_labels
  c.data.helpful_comparisons = ""  # "": the AI-labelled helpful pairs of stage 5
  # Fraction of helpfulness comparisons in the mix (None: every comparison).
  # The paper's RL-CAI PMs mix human helpfulness and AI harmlessness labels
  # about evenly (135k helpful vs 182k red-team prompts in SL); 0.5 here.
  c.data.helpful_ratio = 0.5
  c.data.eval_size = 64
  c.data.seq_len = 512
  c.data.length_buckets = (128, 256)  # pairs padded to the smallest that fits both
  c.data.truncation = "truncate"  # drop the start of too-long chats; or "error"

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 8  # pairs per optimizer step (2x sequences per forward)
  c.train.microbatches = 1
  c.train.eval_batch_size = 8
  c.train.num_epochs = 1
  c.train.num_steps = 0  # > 0 overrides num_epochs
  c.train.log_every = 10
  c.train.eval_every = 100
  c.train.save_every = 100
  c.train.keep_checkpoints = 2

  c.eval = ml_collections.ConfigDict()
  c.eval.num_bins = 10  # reliability-table bins of sigma(r_a - r_b)

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-5
  c.optim.warmup_steps = 20
  c.optim.decay = "cosine"
  c.optim.end_lr_ratio = 0.1
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0
  c.optim.clip_norm = 1.0

  if arg == "tiny":
    c.model = "random:tiny_llama"
    c.data.helpful_ratio = None
    c.data.eval_size = 4
    c.data.seq_len = 128
    c.data.length_buckets = (64,)
    c.train.batch_size = 8
    c.train.eval_batch_size = 8
    c.train.num_epochs = 0
    c.train.num_steps = 8
    c.train.log_every = 1
    c.train.eval_every = 4
    c.train.save_every = 4
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 2
  elif arg == "cpu":
    c.data.eval_size = 32
    c.train.eval_every = 50
    c.train.save_every = 50
    c.optim.warmup_steps = 10
  elif arg == "full":
    c.model_overrides = ml_collections.ConfigDict({"dtype": "bfloat16", "remat": "full"})
    c.mesh = (-1, 8, 1)
    c.data.eval_size = 2048
    c.data.seq_len = 2048
    c.data.length_buckets = (512, 1024)
    c.train.batch_size = 512
    c.train.microbatches = 8
    c.train.eval_batch_size = 64
    c.train.eval_every = 200
    c.train.save_every = 200
    c.train.keep_checkpoints = 3
    c.optim.lr = 1e-5
    c.optim.warmup_steps = 50
  else:
    raise ValueError(f"configs/preference_model.py: unknown variant {arg!r}; use tiny,"
                     " cpu or full")
  return c
