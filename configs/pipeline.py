"""The whole pipeline: every stage's config, one variant for all.

  python -m cai_jax.pipeline --config=configs/pipeline.py:cpu --workdir=runs/cai

Variants: `tiny` (tests), `cpu` (SmolLM2-135M on a laptop), `full`
(accelerators). Override any stage field from the command line, e.g.
`--config.critique_revision.model=/path/to/hf_dir`.
"""

import importlib.util
import os

import ml_collections

STAGES = ("prompts", "critique_revision", "sft", "pairs", "ai_labels", "preference_model",
          "ppo", "evaluation")


def _stage_config(name: str, arg: str) -> ml_collections.ConfigDict:
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"cai_jax_configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def get_config(arg: str = "cpu") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  for name in STAGES:
    c[name] = _stage_config(name, arg)
  if arg == "cpu":
    _fit_laptop_budget(c)
  return c


def _fit_laptop_budget(c: ml_collections.ConfigDict) -> None:
  """The whole pipeline in about 30 minutes on 2 CPU cores: fewer prompts,
  shorter answers, a few PPO iterations. Each stage's own `cpu` variant is
  larger (a standalone run of that stage)."""
  c.prompts.num_red_team_train = 16
  c.prompts.num_helpful_train = 8
  c.prompts.num_red_team_held_out = 8
  c.prompts.num_helpful_held_out = 8
  c.critique_revision.max_new_tokens = 48
  c.pairs.max_new_tokens = 48
  c.preference_model.data.eval_size = 4
  c.ppo.ppo.iterations = 3
  c.ppo.rollout.batch_size = 16
  c.ppo.rollout.max_new_tokens = 32
  c.ppo.data.max_prompt_len = 256  # keep every stage-1 prompt
  c.evaluation.num_red_team = 8
  c.evaluation.num_helpful = 8
  c.evaluation.max_new_tokens = 48
  c.evaluation.pm.num_revision_prompts = 16
  # Feedback-model accuracy (Fig. 4 analogue: alone, ensemble, order swap,
  # chain of thought) for the stage-5 model only, on 8 pairs
  # (benchmarks/labeler_accuracy.py measures every setting on 64).
  c.evaluation.accuracy.models = tuple(c.ai_labels.feedback_models[:1])
  c.evaluation.accuracy.runs = ("multiple_choice", "chain_of_thought", "pointwise")
  c.evaluation.accuracy.principles = ("less_harmful", "wise_and_kind")
  c.evaluation.accuracy.num_few_shot = 1
  c.evaluation.accuracy.num_pairs = 8
