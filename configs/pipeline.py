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
    if os.path.exists(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")):
      c[name] = _stage_config(name, arg)
  return c
