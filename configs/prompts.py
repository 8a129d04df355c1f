"""Stage 1 (prompts): which red-team and helpfulness prompts, and how many.

  cai-jax stage prompts --config=prompts:cpu --workdir=runs/cai

Variants: `tiny` (tests), `cpu` (a laptop run), `full` (every offline prompt).
Sources are built-in names (see `cai_jax.data.prompts.BUILTIN_SOURCES`), local
JSONL/CSV/Parquet files, or `hub:<dataset name>`.
"""

import ml_collections

from cai_jax.configs import common


def get_config(arg: str = "cpu") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.update(dict(
      red_team_sources=("advbench", "harmbench", "donotanswer", "strongreject"),
      helpful_sources=("cai_helpful",),
      # Safe prompts that sound dangerous, for training only (every one goes to the helpful
      # train split, none held out: stage 8's over-refusal sets are other prompts). With
      # pairs.refusal_pairs they teach the helpful PM that answering beats refusing them.
      borderline_train_sources=(),
      num_borderline_train=None,
      held_out_fraction=0.1,
      max_chars=2000,
      too_long="truncate",
      empty="drop",
      num_red_team_train=None, num_red_team_held_out=None,
      num_helpful_train=None, num_helpful_held_out=None))
  return common.variant(
      c, arg, "prompts",
      tiny={"num_red_team_train": 8, "num_red_team_held_out": 4,
            "num_helpful_train": 4, "num_helpful_held_out": 4},
      cpu={"num_red_team_train": 32, "num_red_team_held_out": 16,
           "num_helpful_train": 16, "num_helpful_held_out": 16},
      full={"helpful_sources": ("cai_helpful", "sharegpt")})  # every offline prompt
