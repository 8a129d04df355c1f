"""Stage 6 (RL-CAI): the preference model on AI harmlessness + helpfulness labels.

  cai-jax stage preference_model --config=preference_model:cpu --workdir=runs/cai

AI labels come from `<workdir>/p5_ai_labels` unless
`--config.data.labels_dir=...` says otherwise. Human helpfulness comparisons
(prompt, chosen, rejected columns; .jsonl/.json/.csv/.parquet) replace the AI
helpful labels with `--config.data.helpful_comparisons=/data/helpful.jsonl`.
Output goes to `<workdir>/p6_preference_model/`; rerunning the same command
resumes from the last checkpoint. PPO loads the result with
`cai_jax.preference.saved.restore_preference_model(<workdir>/p6_preference_model, sharder)`.

Variants:
  tiny  a random 2-layer model with a byte tokenizer (tests, smoke runs):
          cai-jax stage preference_model --config=preference_model:tiny --workdir=/tmp/pm
  cpu   the stage-3 SFT export `<workdir>/p3_sft/hf` if present, else
        SmolLM2-135M-Instruct (bundled); seq 512, batch 8 pairs.
  full  accelerator scale: bf16, remat, batch 512 pairs (1024 sequences),
        1 epoch; point `model` at the pretrained LM the PM starts from, e.g.
          --config.model=/ckpt/llama3-8b-hf
"""

import ml_collections

from cai_jax.configs import common


def get_config(arg: str = "cpu") -> ml_collections.ConfigDict:
  c = common.training_stage("")  # "": the SL-CAI model (run stage 3 first)

  # "one": one PM on every comparison; "by_kind": a harmlessness PM on the red-team
  # comparisons and a helpfulness PM on the helpful ones (in p6_preference_model/helpful),
  # for stage 7's `gated` reward.
  c.pms = "one"

  # LoRA (common.lora): adapters and the head train on the frozen SL-CAI backbone.
  c.lora = common.lora()

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
  c.train.update(common.schedule(num_epochs=1, log_every=10, every=100))

  c.eval = ml_collections.ConfigDict()
  c.eval.num_bins = 10  # reliability-table bins of sigma(r_a - r_b)

  c.optim = common.optim(lr=1e-5, warmup_steps=20, decay="cosine", end_lr_ratio=0.1)

  return common.variant(
      c, arg, "preference_model",
      tiny={"model": "random:tiny_llama",
            "data": {"helpful_ratio": None, "eval_size": 4, "seq_len": 128,
                     "length_buckets": (64,)},
            "train": {"num_epochs": 0, "num_steps": 8, "log_every": 1, "eval_every": 4,
                      "save_every": 4},
            "optim": {"lr": 3e-3, "warmup_steps": 2}},
      cpu={"data": {"eval_size": 32}, "train": {"eval_every": 50, "save_every": 50},
           "optim": {"warmup_steps": 10}},
      full={"model_overrides": common.FULL_MODEL, "mesh": (-1, 8, 1),
            "data": {"eval_size": 2048, "seq_len": 2048, "length_buckets": (512, 1024)},
            "train": {"batch_size": 512, "microbatches": 8, "eval_batch_size": 64,
                      "eval_every": 200, "save_every": 200, "keep_checkpoints": 3},
            "optim": {"warmup_steps": 50}})
