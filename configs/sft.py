"""Stage 3 (SL-CAI SFT): fine-tune on final revisions + helpful answers.

  cai-jax stage sft --config=sft:cpu --workdir=runs/cai

Records come from `<workdir>/p2_critique_revision` unless
`--config.data.records_dir=...` says otherwise; output goes to
`<workdir>/p3_sft/`. Rerunning the same command resumes from the last
checkpoint.

Variants:
  tiny  a random 2-layer model with a byte tokenizer (tests, smoke runs):
          cai-jax stage sft --config=sft:tiny \
              --workdir=/tmp/sft --config.data.records_dir=<records>
  cpu   SmolLM2-135M-Instruct (bundled), seq 512, batch 8, a few hundred steps.
  full  accelerator scale, the paper's recipe: batch 1024 sequences, 1 epoch,
        lr 0.5x the pretraining rate. Point `model` at the helpful model and
        set `optim.pretrain_lr` to its pretraining peak rate, e.g.
          --config.model=/ckpt/llama3-8b-hf --config.optim.pretrain_lr=3e-4
"""

import ml_collections

from cai_jax.configs import common


def get_config(arg: str = "cpu") -> ml_collections.ConfigDict:
  c = common.training_stage("smollm2-135m-instruct")

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
  # Pack each step's conversations several to a row (segment-masked attention, positions
  # restarting per conversation): the same loss and gradients on fewer padded tokens.
  c.data.pack = False
  # Keep only red-team revisions worth learning (cai_jax.evaluation.revision_filter):
  # drops empty, degenerate, request-echoing, unchanged and off-topic revisions, and any
  # whose refusal-measure category is not in `categories`; the kept share and what was
  # dropped go to <workdir>/p3_sft/revision_filter.json.
  c.data.revision_filter = ml_collections.ConfigDict({
      "enabled": False,
      "categories": ("complies", "refuses", "refuses_explains"),
      "echo_words": 6,  # a run of this many words shared with a revision request
      "min_compression": 0.2,  # zlib ratio below which a text is a repeated phrase
      "constitution": "harmless"})  # whose revision requests an echo copies

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

  # LoRA (common.lora): the merged model is exported.
  c.lora = common.lora()

  c.optim = ml_collections.ConfigDict()
  c.optim.pretrain_lr = 3e-4  # the base model's pretraining peak rate
  # An instruct model: a gentle fine-tuning rate.
  c.optim.update(common.optim(lr=2e-5, warmup_steps=20, decay="cosine", end_lr_ratio=0.1,
                              weight_decay=0.1))

  c = common.variant(
      c, arg, "sft",
      tiny={"model": "random:tiny_llama",
            "data": {"eval_size": 2, "seq_len": 128, "length_buckets": (64,)},
            "train": {"num_epochs": 0, "num_steps": 8, "loss_chunk": 32, "log_every": 1,
                      "eval_every": 4, "save_every": 4},
            "optim": {"lr": 3e-3, "warmup_steps": 2, "weight_decay": 0.0}},
      # The pipeline's laptop run has a few dozen records: a small eval set, frequent saves.
      cpu={"data": {"eval_size": 8},
           "train": {"eval_every": 20, "save_every": 20},
           "optim": {"warmup_steps": 10}},
      full={"model_overrides": common.FULL_MODEL,
            "mesh": (-1, 8, 1),  # FSDP within a host (8 chips), data parallel across
            "data": {"eval_size": 2048, "seq_len": 2048, "length_buckets": (512, 1024)},
            # The paper's batch, in sequences.
            "train": {"batch_size": 1024, "microbatches": 8, "eval_batch_size": 128,
                      "loss_chunk": 512, "log_every": 10, "eval_every": 200,
                      "save_every": 200, "keep_checkpoints": 3},
            "optim": {"warmup_steps": 50}})
  if arg == "full":  # the paper: 0.5x the pretraining rate (follows --config.optim.pretrain_lr)
    c.optim.lr = c.optim.get_ref("pretrain_lr") * 0.5
  return c
