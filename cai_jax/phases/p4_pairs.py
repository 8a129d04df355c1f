"""Stage 4: two samples per prompt from the SL-CAI model, for AI feedback.

For every red-team and helpfulness train prompt of stage 1, the SL-CAI model
(`paths.sl_cai_model`: the config's model, else stage 3's export) answers
twice at the config's temperature. Each sample has its own PRNG key from a
stable name ("<id>/pair/a", "<id>/pair/b"), so the two differ, and a rerun or
resumed run writes the same text. Stage 5 asks a feedback model which of the
two is better.

Output: `<workdir>/p4_pairs/shard-NNNNN.jsonl` of `ResponsePair`s, written
shard by shard; a killed run resumes at the first missing shard.

  python -m cai_jax.phases.p4_pairs --config=configs/pairs.py:cpu --workdir=runs/cai
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections

from cai_jax import records
from cai_jax.data import prompts
from cai_jax.model.sharding import sharder_from_config
from cai_jax.phases import cli, generation, paths
from cai_jax.sampling.chat import ChatModel
from cai_jax.text.chat import user_turn


def sample_pairs(model: ChatModel, chunk: Sequence[prompts.PromptRecord]
                 ) -> list[records.ResponsePair]:
  """Responses a and b for a chunk of prompts, in one batch."""
  texts = model.generate([user_turn(p.prompt) for p in chunk for _ in "ab"],
                         [f"{p.id}/pair/{x}" for p in chunk for x in "ab"])
  return [records.ResponsePair(id=p.id, prompt=p.prompt, kind=p.kind,
                               response_a=texts[2 * i], response_b=texts[2 * i + 1])
          for i, p in enumerate(chunk)]


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes (or completes) the response pairs; returns their directory."""
  inputs = [r for path in paths.require_prompts(workdir, "train")
            for r in prompts.read_jsonl(path)]

  def make_worker():
    model = ChatModel(paths.sl_cai_model(config.model, workdir), sharder_from_config(config),
                      config)
    return lambda chunk: sample_pairs(model, chunk)

  return generation.run_generation(paths.stage_dir(workdir, paths.PAIRS), inputs,
                                   config.shard_size, config, make_worker, "response pairs")


if __name__ == "__main__":
  cli.main(run)
