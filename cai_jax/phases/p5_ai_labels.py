"""Stage 5: AI feedback labels, a feedback model's soft preference for each pair.

Reads stage 4's `ResponsePair`s and asks the feedback model(s) which response
is better under the constitution's comparison principles (multiple choice
(A)/(B), optionally with chain of thought, or pointwise Yes/No scores; see
`cai_jax.feedback`). Each record keeps the raw answer log-probs for every
model, principle and order, the reasoning, and the final soft label
p(a preferred) that the preference model (stage 6) trains on.

Output: `<workdir>/p5_ai_labels/shard-NNNNN.jsonl` of `LabelRecord`s, written
shard by shard; a killed run resumes at the first missing shard and ends
with exactly the records of an uninterrupted run (principle draws and
reasoning samples are keyed by pair id).

  python -m cai_jax.phases.p5_ai_labels --config=configs/ai_labels.py:cpu --workdir=runs/cai
"""

from __future__ import annotations

import logging
import os

import ml_collections
from tqdm import tqdm

from cai_jax import records
from cai_jax.constitution import load_constitution
from cai_jax.feedback import FeedbackModel, Labeler, LabelerSettings
from cai_jax.phases import cli, common, p4_pairs

OUT = "p5_ai_labels"


def output_dir(workdir: str) -> str:
  return os.path.join(workdir, OUT)


def make_labeler(config: ml_collections.ConfigDict) -> Labeler:
  """The config's feedback models (loaded once, kept for every shard) and settings."""
  specs = list(config.feedback_models)
  if not specs:
    raise ValueError("config.feedback_models is empty; give at least one load_model spec")
  settings = LabelerSettings.from_config(config)
  sharder = common.sharder_from_config(config)
  models = [FeedbackModel.load(spec, sharder, config.dtype, config.decode_layers)
            for spec in specs]
  return Labeler(models, load_constitution(config.constitution), settings)


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes (or completes) the label records; returns their directory."""
  LabelerSettings.from_config(config)  # fail on a bad setting before any model loads
  pairs_dir = p4_pairs.output_dir(workdir)
  if not records.completed_shards(pairs_dir):
    raise FileNotFoundError(f"{pairs_dir}: no response pairs; run stage 4 first"
                            " (python -m cai_jax.phases.p4_pairs ...)")
  pairs = records.read_records(pairs_dir, records.ResponsePair)
  expected = len(p4_pairs.input_prompts(workdir))
  if len(pairs) != expected:
    raise ValueError(f"{pairs_dir}: {len(pairs)} pairs for {expected} stage-1 prompts; stage 4"
                     " is incomplete, rerun it (it resumes) before labelling")
  pairs = [p for p in pairs if p.kind in tuple(config.kinds)]
  out = output_dir(workdir)
  records.check_same_config(out, config)
  num_shards = -(-len(pairs) // config.shard_size)
  todo = num_shards - len(records.completed_shards(out) & set(range(num_shards)))
  if todo == 0:
    logging.info("%s: complete (%d shards)", out, num_shards)
    return out
  labeler = make_labeler(config)
  with tqdm(total=num_shards, initial=num_shards - todo, desc="AI labels",
            unit="shard") as bar:
    records.run_sharded(out, pairs, config.shard_size, labeler.label,
                        on_shard=lambda i, n: bar.update(1))
  return out


if __name__ == "__main__":
  cli.main(run)
