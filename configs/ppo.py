"""Stage 7 (RL-CAI): PPO against the preference model with a KL penalty to SL-CAI.

  python -m cai_jax.phases.p7_ppo --config=configs/ppo.py:cpu --workdir=runs/cai

Prompts come from stage 1 (`<workdir>/p1_prompts/{red_team,helpful}_train.jsonl`),
the policy and frozen reference from stage 3 (`<workdir>/p3_sft/hf`, else the
bundled SmolLM2-135M-Instruct; `--config.model=...` overrides), the preference
model from stage 6 (`<workdir>/p6_preference_model`; `--config.reward_model=...`).
Output goes to `<workdir>/p7_ppo/`; rerunning the same command resumes.

Variants:
  tiny  random 2-layer policy and PM with a byte tokenizer (tests, smoke runs):
          python -m cai_jax.phases.p7_ppo --config=configs/ppo.py:tiny --workdir=/tmp/ppo
  cpu   SmolLM2-135M policy (the SL-CAI model if stage 3 ran), 32 prompts x 64
        new tokens per iteration, a few iterations.
  full  accelerator scale: bf16, remat, 512 prompts per iteration, adaptive KL.
"""

import ml_collections

from configs import sft as sft_config


def get_config(arg: str = "cpu") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = ""  # "": the SL-CAI model <workdir>/p3_sft/hf (run stage 3 first)
  c.reward_model = ""  # "": stage 6 in the workdir; a dir; or "random:<preset>"
  c.tokenizer = "bytes"  # only for random:<preset> models
  c.model_overrides = ml_collections.ConfigDict({"dtype": "float32", "remat": "none"})
  c.mesh = (1, -1, 1)  # (data, fsdp, tensor)
  c.sharding_rules = sft_config.FSDP_RULES

  c.data = ml_collections.ConfigDict()
  c.data.kinds = ("red_team", "helpful")
  c.data.max_prompt_len = 128  # tokens of the rendered prompt; longer ones are dropped

  c.rollout = ml_collections.ConfigDict()
  c.rollout.batch_size = 32  # prompts (one response each) per iteration
  c.rollout.max_new_tokens = 64
  c.rollout.temperature = 1.0  # no top-k / top-p: log-probs must be the policy's

  c.reward = ml_collections.ConfigDict()
  c.reward.max_len = 256  # PM input tokens (prompt + response)
  c.reward.no_eos_penalty = 1.0  # subtracted from the score of a response cut at M

  # The one KL knob: r_t = -coef * kl_t (+ score at the last token).
  c.kl = ml_collections.ConfigDict()
  c.kl.coef = 0.05  # beta (the initial beta when adaptive)
  c.kl.estimator = "k1"  # "k1": log p - log p_ref; "k3": (r - 1) - log r, r = p_ref / p
  c.kl.target = 0.0  # > 0: adapt beta to this KL per sequence (Ziegler et al.)
  c.kl.horizon = 10_000  # sequences

  c.ppo = ml_collections.ConfigDict()
  c.ppo.iterations = 20
  c.ppo.epochs = 2  # passes over each rollout
  c.ppo.gamma = 1.0
  c.ppo.lam = 0.95
  c.ppo.clip_eps = 0.2
  c.ppo.value_clip = 0.2
  c.ppo.vf_coef = 0.1
  c.ppo.ent_coef = 0.0
  c.ppo.whiten_rewards = False

  c.train = ml_collections.ConfigDict()
  c.train.minibatch_size = 8  # sequences per optimizer update
  c.train.microbatches = 1
  c.train.logits_chunk = 64  # response tokens per logits chunk
  c.train.save_every = 5  # iterations
  c.train.keep_checkpoints = 2

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-6
  c.optim.warmup_steps = 0
  c.optim.decay = "constant"
  c.optim.end_lr_ratio = 1.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0
  c.optim.clip_norm = 1.0

  if arg == "tiny":
    c.model = "random:tiny_llama"
    c.reward_model = "random:tiny_llama"
    c.data.max_prompt_len = 64
    c.rollout.batch_size = 16
    c.rollout.max_new_tokens = 16
    c.reward.max_len = 96
    c.ppo.iterations = 4
    c.train.save_every = 2
    c.optim.lr = 1e-3
  elif arg == "cpu":
    pass
  elif arg == "full":
    c.model_overrides = ml_collections.ConfigDict({"dtype": "bfloat16", "remat": "full"})
    c.mesh = (-1, 8, 1)
    c.data.max_prompt_len = 512
    c.rollout.batch_size = 512
    c.rollout.max_new_tokens = 256
    c.reward.max_len = 1024
    c.kl.target = 6.0
    c.ppo.iterations = 1000
    c.ppo.epochs = 4
    c.train.minibatch_size = 64
    c.train.microbatches = 4
    c.train.logits_chunk = 128
    c.train.save_every = 20
    c.train.keep_checkpoints = 3
  else:
    raise ValueError(f"configs/ppo.py: unknown variant {arg!r}; use tiny, cpu or full")
  return c
