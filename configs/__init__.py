"""The presets: one config file per stage (`get_config(variant)`, variants `tiny`,
`cpu` and `full`), `pipeline.py` (every stage's config, one variant for all:
`tiny`, `cpu`, `smoke`, `full`, with `+dpo`, `+rloo`, `+grpo`), `tiny_pipeline.py`
(the whole pipeline on one tiny model directory) and `common.py` (what the stage
configs share).

Shipped in the wheel as `cai_jax.configs`, so a command names a preset without a
path: `--config=cpu` (a pipeline variant), `--config=sft:cpu` (a config file and its
variant); a path (`--config=my_config.py:variant`) names a config of your own.
"""

import os

DIR = os.path.dirname(os.path.abspath(__file__))


def names() -> list[str]:
  """The preset files by name: `pipeline`, `sft`, `tiny_pipeline`, ..."""
  return sorted(f[:-3] for f in os.listdir(DIR)
                if f.endswith(".py") and not f.startswith("_") and f != "common.py")


def resolve(spec: str) -> str:
  """The file[:variant] that a --config value names: an existing file or a path as
  given; `<name>[:variant]` as that preset's file; anything else as a variant of
  pipeline.py (`cpu`, `tiny+dpo`)."""
  name, colon, variant = spec.partition(":")
  if not name or os.path.isfile(name) or name.endswith(".py") or os.sep in name:
    return spec
  if name in names():
    return os.path.join(DIR, name + ".py") + colon + variant
  return os.path.join(DIR, "pipeline.py") + ":" + spec
