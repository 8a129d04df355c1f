"""SL-CAI data: a helpful model answers, then critiques and revises its answer.

For each red-team prompt: sample an initial answer (chat template), then R
rounds of: draw a principle (seeded per prompt and round), ask for a critique
of the latest answer with few-shot examples in context, then for a revision.
Every intermediate is kept (principle id, critique, revision per round).
"direct" mode skips the critique (the paper's ablation). Helpfulness prompts
get the initial answer only: SFT mixes them in to keep the model helpful.

`reviser` (a load spec; "" = the policy itself, as in the paper) writes the
critiques and revisions of the policy's answers: the Hugging Face CAI recipe
separates them (Mistral-7B-Instruct revises, base Mistral-7B is fine-tuned),
and a 135M policy's self-revisions mostly describe the response instead of
rewriting it.
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections

from cai_jax import records
from cai_jax.constitution import Constitution, draw_principles, load_constitution
from cai_jax.data import prompts
from cai_jax.model.sharding import Sharder
from cai_jax.sampling.chat import ChatModel
from cai_jax.text.chat import Message

MODES = ("critique", "direct")


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


class CritiqueReviser:
  """Runs initial answers and R critique/revision rounds for a chunk of prompts."""

  def __init__(self, config: ml_collections.ConfigDict, sharder: Sharder):
    self.config = config
    self.model = ChatModel(config.model, sharder, config)
    reviser = config.get("reviser", "")
    self.reviser = (ChatModel(reviser, sharder, config) if reviser and reviser != config.model
                    else self.model)
    self.constitution = load_constitution(config.constitution)
    self.shots = few_shot_turns(self.constitution, config.num_few_shot, config.mode)

  def __call__(self, chunk: Sequence[prompts.PromptRecord]) -> list[records.CritiqueRevisionRecord]:
    c = self.config
    responses = self.model.generate([[{"role": "user", "content": p.prompt}] for p in chunk],
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
        texts = self.reviser.generate(
            [critique_conversation(self.shots, chunk[i].prompt, current[i], reqs[i].critique)
             for i in red], [f"{chunk[i].id}/critique/{r}" for i in red])
        critiques = dict(zip(red, texts))
      texts = self.reviser.generate(
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
