"""Runs the pipeline stages in order; each skips what is complete and resumes
what is partial, so rerunning after a kill picks up where it stopped.

  python -m cai_jax.pipeline --config=configs/pipeline.py:cpu --workdir=runs/cai

Writes `<workdir>/pipeline_timings.json` (wall seconds per stage).
"""

from __future__ import annotations

import json
import logging
import os
import time

import ml_collections

from cai_jax.phases import (cli, p1_prompts, p2_critique_revision, p3_sft, p4_pairs,
                            p5_ai_labels, p6_preference_model, p7_ppo, p8_evaluation)

# In pipeline order; a stage runs when the config has its section.
STAGES = (
    ("prompts", p1_prompts),
    ("critique_revision", p2_critique_revision),
    ("sft", p3_sft),
    ("pairs", p4_pairs),
    ("ai_labels", p5_ai_labels),
    ("preference_model", p6_preference_model),
    ("ppo", p7_ppo),
    ("evaluation", p8_evaluation),
)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  os.makedirs(workdir, exist_ok=True)
  timings: dict[str, float] = {}
  for name, stage in STAGES:
    if name not in config:
      continue
    logging.info("=== stage %s ===", name)
    start = time.perf_counter()
    stage.run(config[name], workdir)
    timings[name] = time.perf_counter() - start
    with open(os.path.join(workdir, "pipeline_timings.json"), "w") as f:
      json.dump(timings, f, indent=1)
  return timings


if __name__ == "__main__":
  cli.main(run)
