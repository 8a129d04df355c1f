"""RL prompts: chat-rendered generation prompts and the order rollouts visit them."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Sequence

import numpy as np

from cai_jax.text.chat import generation_ids, user_turn
from cai_jax.text.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class PromptSet:
  texts: list[str]
  ids: list[list[int]]  # chat-rendered generation prompts

  def width(self, max_prompt_len: int, multiple: int = 16) -> int:
    """The rollout's prompt width: the longest prompt rounded up to `multiple`, at most
    `max_prompt_len` (a set of short prompts is not padded to the longest allowed one:
    every PPO pass costs tokens of width + response)."""
    longest = max((len(ids) for ids in self.ids), default=1)
    return min(max_prompt_len, -(-longest // multiple) * multiple)

  def fingerprint(self) -> str:
    h = hashlib.sha256()
    for ids in self.ids:
      h.update(np.asarray(ids, np.int32).tobytes() + b"|")
    return h.hexdigest()[:16]


def render_prompts(tok: Tokenizer, texts: Sequence[str], max_prompt_len: int) -> PromptSet:
  """Each text as a user turn + generation prompt; longer than `max_prompt_len` dropped."""
  kept_texts, kept_ids = [], []
  for text in texts:
    ids = generation_ids(tok, user_turn(text))
    if len(ids) <= max_prompt_len:
      kept_texts.append(text)
      kept_ids.append(ids)
  if len(kept_ids) < len(texts):
    logging.warning("dropped %d of %d prompts longer than data.max_prompt_len=%d tokens",
                    len(texts) - len(kept_ids), len(texts), max_prompt_len)
  return PromptSet(kept_texts, kept_ids)


def prompt_rows(n_prompts: int, batch_size: int, seed: int, iteration: int) -> np.ndarray:
  """The prompt indices of `iteration`: epochs of seeded permutations, remainder dropped."""
  per_epoch = n_prompts // batch_size
  epoch, i = divmod(iteration, per_epoch)
  order = np.random.default_rng([seed, 3, epoch]).permutation(n_prompts)
  return order[i * batch_size:(i + 1) * batch_size]
