"""Stage 1: red-team and helpfulness prompts, deduplicated and split.

Writes `<workdir>/p1_prompts/{red_team,helpful}_{train,held_out}.jsonl`
(`cai_jax.data.prompts.PromptRecord`s). The split is a hash of each prompt's
text and the seed, so it is the same on every run and machine. Prompts of the
evaluation-only sets (`prompts.EVALUATION_ONLY`: the safe-but-dangerous-sounding
set stage 8 measures over-refusal on) never enter a training split.

  python -m cai_jax.phases.p1_prompts --config=configs/prompts.py:cpu --workdir=runs/cai
"""

from __future__ import annotations

import logging
import os

import ml_collections

from cai_jax import distributed, paths
from cai_jax.data import prompts
from cai_jax.phases import cli


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, int]:
  """Writes the four prompt files (skipped when they exist); returns counts."""
  c = config
  policy = prompts.PromptConfig(max_chars=c.max_chars, too_long=c.too_long, empty=c.empty)
  counts, chosen = {}, {}  # chosen: file -> records, written once every split is chosen
  for kind, sources, n_train, n_held in (
      ("red_team", c.red_team_sources, c.num_red_team_train, c.num_red_team_held_out),
      ("helpful", c.helpful_sources, c.num_helpful_train, c.num_helpful_held_out)):
    files = {s: paths.prompts_file(workdir, kind, s) for s in ("train", "held_out")}
    if all(os.path.exists(p) for p in files.values()):
      for s, p in files.items():
        counts[f"{kind}_{s}"] = len(prompts.read_jsonl(p))
      continue
    records = prompts.load_prompts(list(sources), policy, kind=kind)
    train, held_out = prompts.split(records, c.held_out_fraction, config.seed)
    kept = prompts.without_evaluation_sets(train)
    if len(kept) < len(train):
      logging.info("%s train: dropped %d prompts of the evaluation-only sets %s", kind,
                   len(train) - len(kept), prompts.EVALUATION_ONLY)
    train = kept
    edgy = []
    if kind == "helpful" and c.borderline_train_sources:
      edgy = prompts.subsample(prompts.without_evaluation_sets(prompts.load_prompts(
          list(c.borderline_train_sources), policy, kind=kind)), c.num_borderline_train,
          config.seed)
      held_texts = {prompts.normalize(r.prompt) for r in held_out}
      edgy = [r for r in edgy if prompts.normalize(r.prompt) not in held_texts]
      logging.info("helpful train: + %d safe-but-dangerous-sounding prompts of %s", len(edgy),
                   list(c.borderline_train_sources))
    for s, recs, limit in (("train", train, n_train), ("held_out", held_out, n_held)):
      if limit is not None and limit > len(recs):  # asked for more than the split holds
        raise ValueError(
            f"prompts.num_{kind}_{s}={limit}: the {kind} {s} split holds {len(recs)} prompts"
            f" (held_out_fraction={c.held_out_fraction} of {len(records)} from"
            f" {', '.join(sources)}); ask for at most {len(recs)}, change"
            " prompts.held_out_fraction, or add a source")
      picked = prompts.subsample(recs, limit, config.seed)
      if s == "train":
        picked = prompts.dedup(picked + edgy)
      chosen[files[s]] = picked
      counts[f"{kind}_{s}"] = len(picked)
      logging.info("%s %s: %d of %d prompts -> %s", kind, s, len(picked), len(recs), files[s])
  if distributed.is_leader():
    for path, recs in chosen.items():
      prompts.write_jsonl(recs, path)
  distributed.barrier("p1_prompts")
  return counts


if __name__ == "__main__":
  cli.main(run, stage="prompts")
