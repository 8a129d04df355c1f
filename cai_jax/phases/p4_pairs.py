"""Stage 4: two samples per prompt from the SL-CAI model, for AI feedback.

For every red-team and helpfulness train prompt of stage 1, the SL-CAI model
(stage 3's export, by default) answers twice at the config's temperature.
Each sample has its own PRNG key from a stable name ("<id>/pair/a",
"<id>/pair/b"), so the two differ, and a rerun or resumed run writes the
same text. Stage 5 asks a feedback model which of the two is better.

Output: `<workdir>/p4_pairs/shard-NNNNN.jsonl` of `ResponsePair`s, written
shard by shard; a killed run resumes at the first missing shard.

  python -m cai_jax.phases.p4_pairs --config=configs/pairs.py:cpu --workdir=runs/cai
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import ml_collections
from tqdm import tqdm

from cai_jax import prompts, records
from cai_jax.phases import cli, common, p1_prompts
from cai_jax.sampling.chat import generate_chat

OUT = "p4_pairs"
KINDS = ("red_team", "helpful")


def output_dir(workdir: str) -> str:
  return os.path.join(workdir, OUT)


def resolve_model(model: str, workdir: str) -> str:
  """The config's model, or "" for stage 3's Hugging Face export `<workdir>/p3_sft/hf`."""
  if model:
    return model
  from cai_jax.phases import p3_sft  # heavy imports (optax, orbax): only when needed
  path = os.path.join(p3_sft.output_dir(workdir), "hf")
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f"{path}: no SL-CAI model; run stage 3 first (python -m cai_jax.phases.p3_sft ...)"
        " or pass --config.model=<bundled asset, HF directory, .gguf or hub id>")
  return path


class PairSampler:
  """Samples responses a and b for a chunk of prompts in one batch."""

  def __init__(self, config: ml_collections.ConfigDict, model: str):
    self.config = config
    self.sharder = common.sharder_from_config(config)
    self.cfg, self.params, self.tok = common.load_for_sampling(
        model, self.sharder, config.dtype, config.decode_layers)
    self.sampler = common.make_sampler(self.cfg, self.tok, self.sharder, config.max_new_tokens)
    self.sampling = common.sampling_from_config(config.sampling)

  def __call__(self, chunk: Sequence[prompts.PromptRecord]) -> list[records.ResponsePair]:
    conversations = [[{"role": "user", "content": p.prompt}] for p in chunk for _ in "ab"]
    names = [f"{p.id}/pair/{x}" for p in chunk for x in "ab"]
    texts = generate_chat(self.sampler, self.params, self.tok, conversations,
                          seed=self.config.seed, names=names, sampling=self.sampling,
                          max_prompt_tokens=self.config.max_prompt_tokens)
    return [records.ResponsePair(id=p.id, prompt=p.prompt, kind=p.kind,
                                 response_a=texts[2 * i], response_b=texts[2 * i + 1])
            for i, p in enumerate(chunk)]


def input_prompts(workdir: str) -> list[prompts.PromptRecord]:
  """Stage 1's red-team and helpfulness train prompts: one pair each."""
  inputs = []
  for kind in KINDS:
    path = p1_prompts.output_path(workdir, kind, "train")
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path}: missing; run stage 1 first"
                              " (python -m cai_jax.phases.p1_prompts ...)")
    inputs += prompts.read_jsonl(path)
  return inputs


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes (or completes) the response pairs; returns their directory."""
  inputs = input_prompts(workdir)
  out = output_dir(workdir)
  records.check_same_config(out, config)
  num_shards = -(-len(inputs) // config.shard_size)
  todo = num_shards - len(records.completed_shards(out) & set(range(num_shards)))
  if todo == 0:
    logging.info("%s: complete (%d shards)", out, num_shards)
    return out
  pair_sampler = PairSampler(config, resolve_model(config.model, workdir))
  with tqdm(total=num_shards, initial=num_shards - todo, desc="response pairs",
            unit="shard") as bar:
    records.run_sharded(out, inputs, config.shard_size, pair_sampler,
                        on_shard=lambda i, n: bar.update(1))
  return out


if __name__ == "__main__":
  cli.main(run)
