"""Stage 7 (RL-CAI): on-policy RL against the preference model with a KL penalty to
SL-CAI: PPO (the default, the paper's), or the critic-free RLOO and GRPO.

  cai-jax stage ppo --config=ppo:cpu --workdir=runs/cai
  cai-jax stage ppo --config=ppo:cpu+grpo --workdir=runs/cai

Prompts come from stage 1 (`<workdir>/p1_prompts/{red_team,helpful}_train.jsonl`),
the policy and frozen reference from stage 3 (`<workdir>/p3_sft/hf`;
`--config.model=...` overrides), the preference model from stage 6
(`<workdir>/p6_preference_model`; `--config.reward_model=...`). Output goes to
`<workdir>/p7_ppo/` (`p7_rloo/`, `p7_grpo/`); rerunning the same command resumes.

Variants:
  tiny  random 2-layer policy and PM with a byte tokenizer (tests, smoke runs):
          cai-jax stage ppo --config=ppo:tiny --workdir=/tmp/ppo
  cpu   SmolLM2-135M policy (the SL-CAI model), 32 sequences x 64 new tokens per
        iteration.
  full  accelerator scale: bf16, remat, 512 sequences per iteration, adaptive KL.
`+rloo` or `+grpo` after a variant (`cpu+grpo`) switches to that algorithm with
K = 4 responses a prompt and as many sequences per iteration as PPO's
(rollout.batch_size / 4 prompts).
"""

import ml_collections

from cai_jax.configs import common


CRITIC_FREE_SAMPLES = 4  # K for `+rloo` / `+grpo`


def get_config(arg: str = "cpu") -> ml_collections.ConfigDict:
  arg, _, algorithm = arg.partition("+")
  c = _base(arg)
  if algorithm:
    critic_free(c, algorithm)
  return c


def critic_free(c: ml_collections.ConfigDict, algorithm: str,
                samples_per_prompt: int = CRITIC_FREE_SAMPLES) -> None:
  """Switches `c` to RLOO or GRPO, keeping the sequences per iteration."""
  if algorithm not in ("rloo", "grpo"):
    raise ValueError(f"configs/ppo.py: unknown algorithm {algorithm!r} after '+';"
                     " use rloo or grpo")
  c.algorithm = algorithm
  c.rollout.samples_per_prompt = samples_per_prompt
  c.rollout.batch_size = max(1, c.rollout.batch_size // samples_per_prompt)


def _base(arg: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # "ppo" (the paper's: GAE on a value head that shares the policy's backbone), or
  # the critic-free "rloo" / "grpo": rollout.samples_per_prompt (>= 2) responses a
  # prompt, leave-one-out or group-normalised advantages, no value head. Output:
  # <workdir>/p7_ppo, p7_rloo or p7_grpo.
  c.algorithm = "ppo"
  c.model = ""  # "": the SL-CAI model <workdir>/p3_sft/hf (run stage 3 first)
  c.reward_model = ""  # "": stage 6 in the workdir; a dir; or "random:<preset>"
  c.tokenizer = "bytes"  # only for random:<preset> models
  c.model_overrides = ml_collections.ConfigDict(common.SMALL_MODEL)
  c.mesh = (1, -1, 1)  # (data, fsdp, tensor)
  c.num_devices = 0  # 0: every device; n: the mesh takes the first n
  c.sharding_rules = common.FSDP_RULES

  # LoRA (common.lora): adapters (and PPO's value head) train on the reference's
  # frozen weights, one copy for both.
  c.lora = common.lora()

  c.data = ml_collections.ConfigDict()
  c.data.kinds = ("red_team", "helpful")
  c.data.max_prompt_len = 128  # tokens of the rendered prompt; longer ones are dropped

  c.rollout = ml_collections.ConfigDict()
  c.rollout.batch_size = 32  # prompts per iteration
  c.rollout.samples_per_prompt = 1  # K responses a prompt; rloo and grpo need >= 2
  c.rollout.max_new_tokens = 64
  c.rollout.temperature = 1.0  # no top-k / top-p: log-probs must be the policy's
  # > 0: roll out with the continuous-batching engine of this many slots (a multiple of
  # the batch shards; sampling/engine.py): the same tokens and behaviour log-probs,
  # finished rows refilled.
  c.rollout.engine_slots = 0

  c.reward = ml_collections.ConfigDict()
  # Weighted sources, "name=weight,...": pm (stage 6), helpful_pm (the PM at
  # reward.helpful_pm), gated (pm on red-team prompts, helpful_pm on helpful ones,
  # each standardised; reward.gate), feedback (the feedback model live, pointwise under
  # reward.feedback.principle), feedback_by_kind (the same, with stage 5's helpfulness
  # question for helpful prompts), overlong, refusal (rl/reward.py).
  c.reward.sources = "pm=1"
  # A stage-6 PM dir (or its workdir) trained on helpfulness pairs; "": the helpfulness
  # PM stage 6 trained with pms="by_kind" (<workdir>/p6_preference_model/helpful).
  c.reward.helpful_pm = ""
  # "gated": each prompt kind's PM, each standardised (Llama 2's separate rewards); a
  # prompt of unknown kind takes the harm PM's score when sigmoid(z) < threshold, and
  # rule "llama2" applies that to helpful prompts too.
  c.reward.gate = ml_collections.ConfigDict({"threshold": 0.15, "rule": "kind"})
  c.reward.normalize = False  # standardise each source by its running mean / std
  c.reward.max_len = 256  # PM input tokens (prompt + response)
  # "auto": score the sampled token ids when the PM shares the policy's tokenizer,
  # else decode and re-render the text; "ids" / "text" force one.
  c.reward.pm_input = "auto"
  c.reward.no_eos_penalty = 1.0  # subtracted from the score of a response cut at M
  c.reward.overlong_after = 48  # "overlong": tokens after which the penalty grows to -1
  c.reward.feedback = ml_collections.ConfigDict()
  c.reward.feedback.model = ""  # "": stage 5's first feedback model
  c.reward.feedback.constitution = "harmless"
  c.reward.feedback.principle = "less_harmful"  # must have a pointwise question
  c.reward.feedback.prompt_format = "plain"  # as stage 5's default
  c.reward.feedback.max_response_tokens = 256
  c.reward.feedback.batch_size = 8
  c.reward.feedback.dtype = "float32"

  # The fixed probe: the first `num_prompts` held-out prompts of each kind, answered
  # greedily before training and every `every` iterations (and at the last), scored by
  # the reward without its running normalisation; written to <stage dir>/probe.jsonl,
  # the reward curve the evidence reads (paired, same prompts). 0: off.
  c.probe = ml_collections.ConfigDict({"every": 0, "num_prompts": 8})

  # The one KL knob: r_t = -coef * kl_t (+ score at the last token).
  c.kl = ml_collections.ConfigDict()
  c.kl.coef = 0.05  # beta (the initial beta when adaptive)
  c.kl.estimator = "k1"  # "k1": log p - log p_ref; "k3": (r - 1) - log r, r = p_ref / p
  c.kl.target = 0.0  # > 0: adapt beta to this KL per sequence (Ziegler et al.)
  c.kl.horizon = 10_000  # sequences

  c.learner = ml_collections.ConfigDict()
  c.learner.iterations = 20
  c.learner.epochs = 2  # passes over each rollout
  c.learner.clip_eps = 0.2
  c.learner.ent_coef = 0.0
  # PPO's critic only (ignored by rloo and grpo):
  c.learner.gamma = 1.0
  c.learner.lam = 0.95
  c.learner.value_clip = 0.2
  c.learner.vf_coef = 0.1
  c.learner.whiten_rewards = False

  c.train = ml_collections.ConfigDict()
  c.train.minibatch_size = 8  # sequences per optimizer update (of batch_size x K)
  c.train.microbatches = 1
  c.train.logits_chunk = 64  # response tokens per logits chunk
  c.train.save_every = 5  # iterations
  c.train.keep_checkpoints = 2

  c.optim = common.optim(lr=1e-6, warmup_steps=0)

  return common.variant(
      c, arg, "ppo",
      tiny={"model": "random:tiny_llama", "reward_model": "random:tiny_llama",
            "data": {"max_prompt_len": 64}, "rollout": {"batch_size": 16, "max_new_tokens": 16},
            "reward": {"max_len": 96, "overlong_after": 12}, "learner": {"iterations": 4},
            "train": {"save_every": 2}, "optim": {"lr": 1e-3}},
      cpu={},
      full={"model_overrides": common.FULL_MODEL, "mesh": (-1, 8, 1),
            "data": {"max_prompt_len": 512},
            "rollout": {"batch_size": 512, "max_new_tokens": 256},
            "reward": {"max_len": 1024}, "kl": {"target": 6.0},
            "learner": {"iterations": 1000, "epochs": 4},
            "train": {"minibatch_size": 64, "microbatches": 4, "logits_chunk": 128,
                      "save_every": 20, "keep_checkpoints": 3}})
