"""Stage 1: red-team and helpfulness prompts, deduplicated and split.

Writes `<workdir>/p1_prompts/{red_team,helpful}_{train,held_out}.jsonl`
(`cai_jax.prompts.PromptRecord`s). The split is a hash of each prompt's text
and the seed, so it is the same on every run and machine.

  python -m cai_jax.phases.p1_prompts --config=configs/prompts.py:cpu --workdir=runs/cai
"""

from __future__ import annotations

import logging
import os

import ml_collections
import numpy as np

from cai_jax import distributed, prompts
from cai_jax.phases import cli

OUT = "p1_prompts"


def output_path(workdir: str, kind: str, split: str) -> str:
  return os.path.join(workdir, OUT, f"{kind}_{split}.jsonl")


def _subsample(records, limit: int | None, seed: int):
  """A seeded subset of `limit` prompts, in a fixed order (all when limit is None)."""
  if limit is None or limit >= len(records):
    return list(records)
  order = np.random.default_rng(seed).permutation(len(records))[:limit]
  return [records[i] for i in sorted(order)]


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, int]:
  """Writes the four prompt files (skipped when they exist); returns counts."""
  c = config.prompts
  policy = prompts.PromptConfig(max_chars=c.max_chars, too_long=c.too_long, empty=c.empty)
  counts = {}
  for kind, sources, n_train, n_held in (
      ("red_team", c.red_team_sources, c.num_red_team_train, c.num_red_team_held_out),
      ("helpful", c.helpful_sources, c.num_helpful_train, c.num_helpful_held_out)):
    paths = {s: output_path(workdir, kind, s) for s in ("train", "held_out")}
    if all(os.path.exists(p) for p in paths.values()):
      for s, p in paths.items():
        counts[f"{kind}_{s}"] = len(prompts.read_jsonl(p))
      continue
    records = prompts.load_prompts(list(sources), policy, kind=kind)
    train, held_out = prompts.split(records, c.held_out_fraction, config.seed)
    for s, recs, limit in (("train", train, n_train), ("held_out", held_out, n_held)):
      chosen = _subsample(recs, limit, config.seed)
      if distributed.is_leader():
        prompts.write_jsonl(chosen, paths[s])
      counts[f"{kind}_{s}"] = len(chosen)
      logging.info("%s %s: %d of %d prompts -> %s", kind, s, len(chosen), len(recs), paths[s])
  distributed.barrier("p1_prompts")
  return counts


if __name__ == "__main__":
  cli.main(run)
