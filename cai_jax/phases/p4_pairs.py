"""Stage 4: two samples per prompt from the SL-CAI model, for AI feedback.

For every red-team and helpfulness train prompt of stage 1, the SL-CAI model
(`paths.sl_cai_model`: the config's model, else stage 3's export) answers
twice at the config's temperature. Each sample has its own PRNG key from a
stable name ("<id>/pair/a", "<id>/pair/b"), so the two differ, and a rerun or
resumed run writes the same text. Stage 5 asks a feedback model which of the
two is better.

With `revision_pairs`, each red-team prompt stage 2 revised also gives the
pair (its initial answer, its last revision), id "<id>/revision", first in
the output: contrasts of a compliant and a rewritten answer that two samples
of SL-CAI seldom show. Stage 5 labels them like every other pair; nothing
assumes the revision is better.

With `refusal_pairs`, each helpful prompt also gives the pair (its sample a, a
canned refusal from `data.refusals`), id "<id>/refusal", after its sampled pair:
the samples never show the PM that refusing an ordinary request is unhelpful.
Stage 5 labels them under the helpfulness question; nothing assumes the sample
wins.

Output: `<workdir>/p4_pairs/shard-NNNNN.jsonl` of `ResponsePair`s, written
shard by shard; a killed run resumes at the first missing shard.

  python -m cai_jax.phases.p4_pairs --config=configs/pairs.py:cpu --workdir=runs/cai
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections

from cai_jax import paths, records
from cai_jax.data import prompts, refusals
from cai_jax.model.sharding import sharder_from_config
from cai_jax.phases import cli, generation
from cai_jax.sampling.chat import ChatModel
from cai_jax.text.chat import user_turn


def sample_pairs(model: ChatModel, chunk: Sequence[prompts.PromptRecord | records.ResponsePair],
                 refusal_pairs: bool = False) -> list[records.ResponsePair]:
  """Responses a and b for a chunk of prompts, in one batch (pairs pass through);
  with `refusal_pairs`, each helpful prompt's pair is followed by its refusal pair."""
  todo = [p for p in chunk if isinstance(p, prompts.PromptRecord)]
  texts = iter(model.generate([user_turn(p.prompt) for p in todo for _ in "ab"],
                              [f"{p.id}/pair/{x}" for p in todo for x in "ab"]))
  out = []
  for p in chunk:
    if isinstance(p, records.ResponsePair):
      out.append(p)
      continue
    pair = records.ResponsePair(id=p.id, prompt=p.prompt, kind=p.kind,
                                response_a=next(texts), response_b=next(texts))
    out.append(pair)
    if refusal_pairs and p.kind == "helpful":
      out.append(records.refusal_pair(pair, refusals.refusal_for(pair.id)))
  return out


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes (or completes) the response pairs; returns their directory."""
  # Revision pairs first: a stage 4 killed before its end then lacks sampled pairs,
  # which stage 5's count of them detects.
  inputs: list = []
  if config.revision_pairs:
    d = paths.require_records(paths.stage_dir(workdir, paths.CRITIQUE_REVISION),
                              paths.CRITIQUE_REVISION, "critique/revision records")
    inputs = [records.revision_pair(r) for r in records.red_team_records(d) if r.rounds]
  inputs += [r for path in paths.require_prompts(workdir, "train")
             for r in prompts.read_jsonl(path)]

  def make_worker():
    model = ChatModel(paths.sl_cai_model(config.model, workdir), sharder_from_config(config),
                      config)
    return lambda chunk: sample_pairs(model, chunk, config.refusal_pairs)

  return generation.run_generation(paths.stage_dir(workdir, paths.PAIRS), inputs,
                                   config.shard_size, config, make_worker, "response pairs")


if __name__ == "__main__":
  cli.main(run, stage="pairs")
