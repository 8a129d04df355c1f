"""The Constitutional AI pipeline, one module per stage, in order.

Phase 1, SL-CAI (supervised learning from critiques and revisions):
  p1_prompts            red-team and helpfulness prompts, split train/held-out
  p2_critique_revision  helpful model answers; critique -> revision rounds
  p3_sft                fine-tune on (prompt, final revision) + helpful answers

Phase 2, RL-CAI (reinforcement learning from AI feedback):
  p4_pairs              two samples per prompt from the SL-CAI model
  p5_ai_labels          feedback model's soft A/B preference per pair
  p6_preference_model   Bradley-Terry preference model on the AI labels
  p7_ppo                PPO against the preference model, KL-penalised
  p8_evaluation         win rates / Elo of initial, SL-CAI and RL-CAI models

Each stage module has `run(config, workdir)`, reading top to bottom, and a
short absl `main`; its config lives in `configs/<stage>.py`. The logic lives
in the library (`cai_jax.text`, `data`, `training`, `preference`, `rl`,
`feedback`, `evaluation`, ...); no stage imports another, and no library
module imports a stage. Shared by the stages: `cai_jax.paths` (every stage's
outputs, the "run stage N first" errors, the one rule for where the SL-CAI
model is), `generation` (the sharded, resumable generation skeleton) and
`cli`. Stages exchange files whose schemas are in `cai_jax.records`.
"""
