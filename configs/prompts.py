"""Stage 1 (prompts): which red-team and helpfulness prompts, and how many.

  python -m cai_jax.phases.p1_prompts --config=configs/prompts.py:cpu --workdir=runs/cai

Variants: `tiny` (tests), `cpu` (a laptop run), `full` (every offline prompt).
Sources are built-in names (see `cai_jax.data.prompts.BUILTIN_SOURCES`), local
JSONL/CSV/Parquet files, or `hub:<dataset name>`.
"""

import ml_collections


def get_config(arg: str = "cpu") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.update(dict(
      red_team_sources=("advbench", "harmbench", "donotanswer", "strongreject"),
      helpful_sources=("cai_helpful",),
      held_out_fraction=0.1,
      max_chars=2000,
      too_long="truncate",
      empty="drop",
      num_red_team_train=None, num_red_team_held_out=None,
      num_helpful_train=None, num_helpful_held_out=None))
  sizes = {
      "tiny": (8, 4, 4, 4),
      "cpu": (32, 16, 16, 16),
      "full": (None, None, None, None),
  }
  if arg not in sizes:
    raise ValueError(f"configs/prompts.py: unknown variant {arg!r}; use one of {sorted(sizes)}")
  (c.num_red_team_train, c.num_red_team_held_out,
   c.num_helpful_train, c.num_helpful_held_out) = sizes[arg]
  if arg == "full":
    c.helpful_sources = ("cai_helpful", "sharegpt")
  return c
