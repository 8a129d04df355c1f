"""Stage 2: the helpful model answers, then critiques and revises its answer
(`cai_jax.critique_revision`: R rounds, a principle drawn per round, few-shot
examples in context; "direct" mode skips the critique). Helpfulness prompts
get the initial answer only: SFT mixes them in to keep the model helpful.

Output: `<workdir>/p2_critique_revision/shard-NNNNN.jsonl` of
`CritiqueRevisionRecord`s, written shard by shard; a killed run resumes at the
first missing shard and ends with exactly the records of an uninterrupted run.

  python -m cai_jax.phases.p2_critique_revision \
      --config=configs/critique_revision.py:cpu --workdir=runs/cai
"""

from __future__ import annotations

import ml_collections

from cai_jax import paths
from cai_jax.constitution import load_constitution
from cai_jax.critique_revision import MODES, CritiqueReviser
from cai_jax.data import prompts
from cai_jax.model.sharding import sharder_from_config
from cai_jax.phases import cli, generation


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes (or completes) the critique/revision records; returns their directory."""
  if config.mode not in MODES:
    raise ValueError(f"config.mode must be 'critique' or 'direct', got {config.mode!r}")
  inputs = [r for path in paths.require_prompts(workdir, "train")
            for r in prompts.read_jsonl(path)]
  load_constitution(config.constitution)  # fail on a bad file before touching outputs
  return generation.run_generation(
      paths.stage_dir(workdir, paths.CRITIQUE_REVISION), inputs, config.shard_size, config,
      lambda: CritiqueReviser(config, sharder_from_config(config)), "critique/revision")


if __name__ == "__main__":
  cli.main(run, stage="critique_revision")
