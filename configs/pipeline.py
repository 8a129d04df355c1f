"""The whole pipeline: every stage's config, one variant for all.

  python -m cai_jax.pipeline --config=configs/pipeline.py:cpu --workdir=runs/cai

Variants: `tiny` (tests), `cpu` (a small CAI experiment with SmolLM2-135M on 2 CPU
cores), `smoke` (the machinery end to end, fast, shows nothing), `full`
(accelerators). `+dpo` after a variant (`cpu+dpo`) also trains stage 7's DPO
alternative on the same pairs, `+rloo` / `+grpo` the critic-free on-policy
algorithms on the same prompts and PM; stage 8 evaluates each beside the PPO
model (`cpu+grpo+dpo` trains both). Override any
stage field from the command line, e.g. `--config.critique_revision.model=/path/to/hf_dir`.
"""

import ml_collections

from configs import (ai_labels, critique_revision, dpo, evaluation, pairs, ppo,
                     preference_model, prompts, sft)

# Stage name -> its config module, in pipeline order.
STAGE_CONFIGS = {"prompts": prompts, "critique_revision": critique_revision, "sft": sft,
                 "pairs": pairs, "ai_labels": ai_labels, "preference_model": preference_model,
                 "ppo": ppo, "evaluation": evaluation}
STAGES = tuple(STAGE_CONFIGS)
# Stage 7's alternatives to PPO that `+<name>` after a variant adds (trained after
# PPO, evaluated beside it).
ADDITIONS = ("rloo", "grpo", "dpo")


def get_config(arg: str = "cpu") -> ml_collections.ConfigDict:
  arg, *extras = arg.split("+")
  if set(extras) - set(ADDITIONS):
    raise ValueError(f"configs/pipeline.py: unknown addition(s) {sorted(set(extras) - set(ADDITIONS))}"
                     f" after the variant; additions are {' '.join('+' + a for a in ADDITIONS)}")
  c = ml_collections.ConfigDict()
  for name, module in STAGE_CONFIGS.items():
    c[name] = module.get_config("cpu" if arg == "smoke" else arg)
  if arg == "cpu":
    _small_experiment(c)
  elif arg == "smoke":
    _smoke(c)
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


def _small_experiment(c: ml_collections.ConfigDict) -> None:
  """A small CAI experiment on 2 CPU cores (the README's first command): enough
  prompts, SFT epochs and PPO iterations to move SmolLM2, and evaluation sets
  large enough for intervals that mean something. The choices, measured in
  BENCHMARKS.md ("A run that trains"):
  - Qwen2.5-Coder-0.5B revises SmolLM2's answers (the HF CAI recipe's split of
    reviser and policy; SmolLM2's self-revisions describe the response instead
    of rewriting it), one direct revision (no critique: half the generation);
  - SFT 3 epochs at lr 1e-4 (2e-5 for 1 epoch did not change the answers);
  - stage 4 adds stage 2's (initial answer, revision) of each red-team prompt as a
    pair, and stage 5 labels helpful prompts' pairs by the helpfulness question
    (new in run 3, where the PM went from 0.47 to 0.77 on PyRIT's human-labelled
    pairs; the second run's PM was at chance on red-team pairs);
  - no refusal pairs (`pairs.refusal_pairs`, each helpful prompt's sample against a
    canned refusal): run 4 measured them. RL-CAI then refused no more helpful prompts
    than SL-CAI (+0.00, run 3: +0.19) and PPO's reward rose, but the PM learned that
    refusing is worse everywhere: 0.34 on PyRIT's human harm pairs (run 3: 0.77) and
    RL-CAI no more harmless than SL-CAI by the judge (BENCHMARKS.md, "fourth run");
  - the PM on every pair, 2 epochs at lr 5e-5, 32 pairs held out;
  - PPO 12 iterations of 16 rollouts at lr 3e-6, between the two measured: 1e-6
    left KL at 0.03 nats and moved nothing; 1e-5 drove KL to 2.1 nats with the
    reward flat and learned to refuse (BENCHMARKS.md, "second run"); 3e-6 (run 3)
    kept KL at 0.19 nats, the reward still flat and RL-CAI still more refusing;
  - stage 8: 32 red-team, 16 helpful and all 48 safe-but-dangerous-sounding prompts,
    without the feedback-model accuracy runs (8 pairs said nothing in 254 s;
    `benchmarks/labeler_accuracy.py` measures them on 64);
  - generation in batches of 32 (stages 2, 4 and 8; 1.7x the tokens/s of batch 8,
    `benchmarks/decode.py`).
  """
  c.prompts.num_red_team_train = 48
  c.prompts.num_helpful_train = 24
  c.prompts.num_red_team_held_out = 32
  c.prompts.num_helpful_held_out = 16
  cr = c.critique_revision
  cr.reviser = "qwen2.5-coder-0.5b-instruct"
  cr.mode = "direct"
  cr.num_rounds = 1
  cr.max_new_tokens = 64
  cr.shard_size = 32
  c.pairs.revision_pairs = True
  c.pairs.shard_size = 16  # 2 samples a prompt: batches of 32
  c.sft.train.num_epochs = 3
  c.sft.optim.lr = 1e-4
  c.sft.optim.warmup_steps = 5
  # The PM on every pair (helpful_ratio=0.5 dropped half the red-team pairs) for 4
  # epochs at 5e-5: 1 epoch at 1e-5 was 4 steps inside the warm-up and learned
  # nothing (held-out 5/15); retrained on the same labels it fits the training
  # pairs (BENCHMARKS.md, "A run that trains").
  pm = c.preference_model
  pm.data.helpful_ratio = None
  # 32 held-out pairs. 48 was tried (BENCHMARKS.md, "Eleventh run"): the 16 pairs it
  # takes from training left a flatter PM (reward std 0.028 against 0.083) whose
  # accuracy, on more pairs, still missed the bar, and 2 more claims failed.
  pm.data.eval_size = 32
  pm.train.num_epochs = 2
  pm.optim.lr = 5e-5
  pm.optim.warmup_steps = 4
  c.ppo.learner.iterations = 12
  c.ppo.optim.lr = 3e-6
  e = c.evaluation
  e.num_red_team = 32
  e.num_helpful = 16
  e.num_borderline = 0  # all 48
  e.max_new_tokens = 64
  e.shard_size = 32
  e.pm.num_revision_prompts = 48
  e.pm.num_human_pairs = 64
  e.judge.validation_rows = (48, 96)
  # The judge: Qwen2.5-Coder-0.5B, the only cheap bundled model that judges harm
  # above chance (benchmarks/harm_judge.py: SmolLM2 and Gemma-3-270m are at chance;
  # Qwen's AUC on these rows is what stage 8's judge validation reports).
  # It also revised (stage 2) and labelled (stage 5), so the report marks its
  # claims as trained-on and leans on the model-free refusal measure.
  e.judge.model = "qwen2.5-coder-0.5b-instruct"
  _small_common(c)
  e.accuracy.enabled = False


def _smoke(c: ml_collections.ConfigDict) -> None:
  """The machinery end to end in about 15 minutes on 2 CPU cores (the old `cpu`
  preset): 24 training prompts, short answers, 3 PPO iterations. Shows nothing."""
  c.prompts.num_red_team_train = 16
  c.prompts.num_helpful_train = 8
  c.prompts.num_red_team_held_out = 8
  c.prompts.num_helpful_held_out = 8
  c.critique_revision.max_new_tokens = 48
  c.preference_model.data.eval_size = 4
  c.ppo.learner.iterations = 3
  c.evaluation.num_red_team = 8
  c.evaluation.num_helpful = 8
  c.evaluation.num_borderline = 8
  c.evaluation.max_new_tokens = 48
  c.evaluation.pm.num_revision_prompts = 16
  c.evaluation.pm.num_human_pairs = 16
  c.evaluation.judge.validation_rows = (16, 32)
  _small_common(c)


def _small_common(c: ml_collections.ConfigDict) -> None:
  """What the two CPU presets share: short pair samples and PPO rollouts, and the
  feedback-model accuracy runs (Fig. 4 analogue) for the stage-5 model only."""
  c.pairs.max_new_tokens = 48
  c.ppo.rollout.batch_size = 16
  c.ppo.rollout.max_new_tokens = 32
  c.ppo.data.max_prompt_len = 256  # keep every stage-1 prompt
  # Feedback-model accuracy (Fig. 4 analogue: alone, ensemble, order swap,
  # chain of thought) for the stage-5 model only, on 8 pairs
  # (benchmarks/labeler_accuracy.py measures every setting on 64).
  c.evaluation.accuracy.models = tuple(c.ai_labels.feedback_models[:1])
  c.evaluation.accuracy.runs = ("multiple_choice", "chain_of_thought", "pointwise")
  c.evaluation.accuracy.principles = ("less_harmful", "wise_and_kind")
  c.evaluation.accuracy.num_few_shot = 1
  c.evaluation.accuracy.num_pairs = 8
