"""Stage 2: the helpful model answers, then critiques and revises its answer.

For each red-team prompt: sample an initial answer (chat template), then R
rounds of: draw a principle (seeded per prompt and round), ask for a critique
of the latest answer with few-shot examples in context, then for a revision.
Every intermediate is kept (principle id, critique, revision per round).
"direct" mode skips the critique (the paper's ablation). Helpfulness prompts
get the initial answer only: SFT mixes them in to keep the model helpful.

Output: `<workdir>/p2_critique_revision/shard-NNNNN.jsonl` of
`CritiqueRevisionRecord`s, written shard by shard; a killed run resumes at the
first missing shard and ends with exactly the records of an uninterrupted run.

  python -m cai_jax.phases.p2_critique_revision \
      --config=configs/critique_revision.py:cpu --workdir=runs/cai
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import ml_collections
from tqdm import tqdm

from cai_jax import prompts, records
from cai_jax.constitution import Constitution, draw_principles, load_constitution
from cai_jax.phases import cli, common, p1_prompts
from cai_jax.sampling.chat import Message, generate_chat

OUT = "p2_critique_revision"


def output_dir(workdir: str) -> str:
  return os.path.join(workdir, OUT)


# --- Prompts for the model ------------------------------------------------------------


def few_shot_turns(constitution: Constitution, num_examples: int, mode: str) -> list[Message]:
  """Worked critique/revision exchanges, as earlier turns of the conversation."""
  turns: list[Message] = []
  for ex in constitution.few_shot[:num_examples]:
    principle = constitution.critique_principle(ex.principle_id)
    turns += [{"role": "user", "content": ex.prompt},
              {"role": "assistant", "content": ex.response}]
    if mode == "critique":
      turns += [{"role": "user", "content": principle.critique},
                {"role": "assistant", "content": ex.critique}]
    turns += [{"role": "user", "content": principle.revision},
              {"role": "assistant", "content": ex.revision}]
  return turns


def critique_conversation(shots: list[Message], prompt: str, response: str,
                          critique_request: str) -> list[Message]:
  return shots + [{"role": "user", "content": prompt},
                  {"role": "assistant", "content": response},
                  {"role": "user", "content": critique_request}]


def revision_conversation(shots: list[Message], prompt: str, response: str,
                          critique_request: str | None, critique: str | None,
                          revision_request: str, instruction: str = "") -> list[Message]:
  conv = shots + [{"role": "user", "content": prompt},
                  {"role": "assistant", "content": response}]
  if critique_request is not None:
    conv += [{"role": "user", "content": critique_request},
             {"role": "assistant", "content": critique}]
  request = f"{revision_request}\n\n{instruction}" if instruction else revision_request
  return conv + [{"role": "user", "content": request}]


# --- The phase -------------------------------------------------------------------------


class CritiqueReviser:
  """Runs initial answers and R critique/revision rounds for a chunk of prompts."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.sharder = common.sharder_from_config(config)
    self.cfg, self.params, self.tok = common.load_for_sampling(
        config.model, self.sharder, config.dtype, config.decode_layers)
    self.constitution = load_constitution(config.constitution)
    self.sampler = common.make_sampler(self.cfg, self.tok, self.sharder,
                                       config.max_new_tokens)
    self.sampling = common.sampling_from_config(config.sampling)
    self.shots = few_shot_turns(self.constitution, config.num_few_shot, config.mode)

  def _generate(self, conversations: Sequence[list[Message]], names: Sequence[str]) -> list[str]:
    if not conversations:
      return []
    return generate_chat(self.sampler, self.params, self.tok, conversations,
                         seed=self.config.seed, names=names, sampling=self.sampling,
                         max_prompt_tokens=self.config.max_prompt_tokens)

  def __call__(self, chunk: Sequence[prompts.PromptRecord]) -> list[records.CritiqueRevisionRecord]:
    c = self.config
    responses = self._generate([[{"role": "user", "content": p.prompt}] for p in chunk],
                               [f"{p.id}/initial" for p in chunk])
    red = [i for i, p in enumerate(chunk) if p.kind == "red_team"]
    principles = {i: draw_principles(self.constitution, c.seed, chunk[i].id, c.num_rounds)
                  for i in red}
    rounds: dict[int, list[records.RevisionRound]] = {i: [] for i in red}
    current = {i: responses[i] for i in red}
    for r in range(c.num_rounds):
      reqs = {i: self.constitution.critique_principle(principles[i][r]) for i in red}
      critiques = {i: "" for i in red}
      if c.mode == "critique":
        texts = self._generate(
            [critique_conversation(self.shots, chunk[i].prompt, current[i], reqs[i].critique)
             for i in red], [f"{chunk[i].id}/critique/{r}" for i in red])
        critiques = dict(zip(red, texts))
      texts = self._generate(
          [revision_conversation(self.shots, chunk[i].prompt, current[i],
                                 reqs[i].critique if c.mode == "critique" else None,
                                 critiques[i], reqs[i].revision, c.revision_instruction)
           for i in red],
          [f"{chunk[i].id}/revision/{r}" for i in red])
      for i, revision in zip(red, texts):
        rounds[i].append(records.RevisionRound(principles[i][r], critiques[i], revision))
        current[i] = revision
    return [records.CritiqueRevisionRecord(
        id=p.id, prompt=p.prompt, kind=p.kind, source=p.source,
        initial_response=responses[i], rounds=tuple(rounds.get(i, ())), mode=c.mode)
            for i, p in enumerate(chunk)]


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes (or completes) the critique/revision records; returns their directory."""
  if config.mode not in ("critique", "direct"):
    raise ValueError(f"config.mode must be 'critique' or 'direct', got {config.mode!r}")
  inputs = []
  for kind in ("red_team", "helpful"):
    path = p1_prompts.output_path(workdir, kind, "train")
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path}: missing; run stage 1 first"
                              " (python -m cai_jax.phases.p1_prompts ...)")
    inputs += prompts.read_jsonl(path)
  load_constitution(config.constitution)  # fail on a bad file before touching outputs
  out = output_dir(workdir)
  records.check_same_config(out, config)
  num_shards = -(-len(inputs) // config.shard_size)
  todo = num_shards - len(records.completed_shards(out) & set(range(num_shards)))
  if todo == 0:
    logging.info("%s: complete (%d shards)", out, num_shards)
    return out
  reviser = CritiqueReviser(config)
  with tqdm(total=num_shards, initial=num_shards - todo, desc="critique/revision",
            unit="shard") as bar:
    records.run_sharded(out, inputs, config.shard_size, reviser,
                        on_shard=lambda i, n: bar.update(1))
  return out


if __name__ == "__main__":
  cli.main(run)
