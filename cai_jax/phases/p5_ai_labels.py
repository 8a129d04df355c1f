"""Stage 5: AI feedback labels, a feedback model's soft preference for each pair.

Reads stage 4's `ResponsePair`s and asks the feedback model(s) which response
is better under the constitution's comparison principles (multiple choice
(A)/(B), optionally with chain of thought, or pointwise Yes/No scores; see
`cai_jax.feedback`); pairs of helpful prompts under one helpfulness question
(`helpful_labels`). Each record keeps the raw answer log-probs for every
model, principle and order, the reasoning, and the final soft label
p(a preferred) that the preference model (stage 6) trains on.

Output: `<workdir>/p5_ai_labels/shard-NNNNN.jsonl` of `LabelRecord`s, written
shard by shard; a killed run resumes at the first missing shard and ends
with exactly the records of an uninterrupted run (principle draws and
reasoning samples are keyed by pair id).

  python -m cai_jax.phases.p5_ai_labels --config=configs/ai_labels.py:cpu --workdir=runs/cai
"""

from __future__ import annotations

import ml_collections

from cai_jax import paths, records
from cai_jax.data import prompts
from cai_jax.feedback import Labeler, LabelerSettings
from cai_jax.feedback.labeler import HELPFUL_LABELS, label_by_kind
from cai_jax.phases import cli, generation


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes (or completes) the label records; returns their directory."""
  LabelerSettings.from_config(config)  # fail on a bad setting before any model loads
  if config.helpful_labels not in HELPFUL_LABELS:
    raise ValueError(f"configs/ai_labels.py: helpful_labels={config.helpful_labels!r}; use"
                     f" one of {HELPFUL_LABELS}")
  pairs_dir = paths.require_records(paths.stage_dir(workdir, paths.PAIRS), paths.PAIRS,
                                    "response pairs")
  pairs = records.read_records(pairs_dir, records.ResponsePair)
  expected = sum(len(prompts.read_jsonl(p)) for p in paths.require_prompts(workdir, "train"))
  if sum(records.pair_source(p) == "samples" for p in pairs) != expected:
    raise ValueError(f"{pairs_dir}: {len(pairs)} pairs for {expected} stage-1 prompts; stage 4"
                     " is incomplete, rerun it (it resumes) before labelling")
  pairs = [p for p in pairs if p.kind in tuple(config.kinds)]

  def make_worker():
    labelers = Labeler.by_kind_from_config(config)
    return lambda chunk: label_by_kind(labelers, chunk)
  return generation.run_generation(paths.stage_dir(workdir, paths.AI_LABELS), pairs,
                                   config.shard_size, config, make_worker, "AI labels")


if __name__ == "__main__":
  cli.main(run, stage="ai_labels")
