"""Stage 3 (SL-CAI SFT): fine-tune on final revisions + helpful answers.

  python -m cai_jax.phases.p3_sft --config=configs/sft.py:cpu --workdir=runs/cai

Records come from `<workdir>/p2_critique_revision` unless
`--config.data.records_dir=...` says otherwise; output goes to
`<workdir>/p3_sft/`. Rerunning the same command resumes from the last
checkpoint.

Variants:
  tiny  a random 2-layer model with a byte tokenizer (tests, smoke runs):
          python -m cai_jax.phases.p3_sft --config=configs/sft.py:tiny \
              --workdir=/tmp/sft --config.data.records_dir=<records>
  cpu   SmolLM2-135M-Instruct (bundled), seq 512, batch 8, a few hundred steps.
  full  accelerator scale, the paper's recipe: batch 1024 sequences, 1 epoch,
        lr 0.5x the pretraining rate. Point `model` at the helpful model and
        set `optim.pretrain_lr` to its pretraining peak rate, e.g.
          --config.model=/ckpt/llama3-8b-hf --config.optim.pretrain_lr=3e-4
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
  # load_model spec (bundled asset, HF dir, .gguf, hub id) or "random:<preset>".
  c.model = "smollm2-135m-instruct"
  c.tokenizer = "bytes"  # only for random:<preset>: "bytes" or a tokenizer path
  c.model_overrides = ml_collections.ConfigDict({"dtype": "float32", "remat": "none"})
  c.mesh = (1, -1, 1)  # (data, fsdp, tensor)
  c.sharding_rules = FSDP_RULES

  c.data = ml_collections.ConfigDict()
  c.data.records_dir = ""  # "": <workdir>/p2_critique_revision
  c.data.revision_round = -1  # -1: the last revision; 0: the initial answer
  # Paper: 182,831 red-team prompts x 4 revisions and 135,296 helpfulness prompts
  # x 2 answers: 0.27 of the examples are helpful.
  c.data.helpful_ratio = 0.27
  c.data.eval_size = 64
  c.data.seq_len = 512
  c.data.length_buckets = (128, 256)  # batches padded to the smallest that fits
  c.data.truncation = "truncate"  # or "error"

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 8  # sequences per optimizer step
  c.train.microbatches = 1  # gradient accumulation inside the step
  c.train.eval_batch_size = 8
  c.train.num_epochs = 1
  c.train.num_steps = 0  # > 0 overrides num_epochs
  c.train.loss_chunk = 128  # tokens per logits chunk; 0: full [B, T, V] logits
  c.train.log_every = 10
  c.train.eval_every = 100
  c.train.save_every = 100
  c.train.keep_checkpoints = 2

  # LoRA (cai_jax.model.lora): rank 0 trains every weight; > 0 trains adapters of that
  # rank on `targets` only, scaled by alpha / rank, and exports the merged model.
  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 0
  c.lora.alpha = 16.0
  c.lora.targets = ("q", "k", "v", "o", "gate", "up", "down")

  c.optim = ml_collections.ConfigDict()
  c.optim.pretrain_lr = 3e-4  # the base model's pretraining peak rate
  c.optim.lr = 2e-5  # an instruct model: a gentle fine-tuning rate
  c.optim.warmup_steps = 20
  c.optim.decay = "cosine"
  c.optim.end_lr_ratio = 0.1
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.1
  c.optim.clip_norm = 1.0

  if arg == "tiny":
    c.model = "random:tiny_llama"
    c.data.eval_size = 2
    c.data.seq_len = 128
    c.data.length_buckets = (64,)
    c.train.batch_size = 8
    c.train.eval_batch_size = 8
    c.train.num_epochs = 0
    c.train.num_steps = 8
    c.train.loss_chunk = 32
    c.train.log_every = 1
    c.train.eval_every = 4
    c.train.save_every = 4
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 2
    c.optim.weight_decay = 0.0
  elif arg == "cpu":
    # The pipeline's laptop run has a few dozen records: a short epoch.
    c.data.eval_size = 8
    c.train.num_epochs = 1
    c.train.eval_every = 20
    c.train.save_every = 20
    c.optim.warmup_steps = 10
  elif arg == "full":
    c.model_overrides = ml_collections.ConfigDict({"dtype": "bfloat16", "remat": "full"})
    c.mesh = (-1, 8, 1)  # FSDP within a host (8 chips), data parallel across
    c.data.eval_size = 2048
    c.data.seq_len = 2048
    c.data.length_buckets = (512, 1024)
    c.train.batch_size = 1024  # the paper's batch, in sequences
    c.train.microbatches = 8
    c.train.eval_batch_size = 128
    c.train.loss_chunk = 512
    c.train.log_every = 10
    c.train.eval_every = 200
    c.train.save_every = 200
    c.train.keep_checkpoints = 3
    # The paper: 0.5x the pretraining rate (follows --config.optim.pretrain_lr).
    c.optim.lr = c.optim.get_ref("pretrain_lr") * 0.5
    c.optim.warmup_steps = 50
  else:
    raise ValueError(f"configs/sft.py: unknown variant {arg!r}; use tiny, cpu or full")
  return c
