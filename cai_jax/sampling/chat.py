"""Text in, text out: chat conversations through the jit sampler.

Every sequence's PRNG key is derived from a stable string (e.g.
"<prompt id>/critique/2"), so a generation depends on what it is, not on
which batch or shard it landed in: reruns and resumed runs write the same text.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

import jax
import numpy as np

from cai_jax.sampling.sampler import Sampler, SamplingParams, sequence_keys
from cai_jax.tokenizer import Tokenizer

Message = dict[str, str]


def stable_id(text: str) -> int:
  """A 31-bit integer id of a string, stable across processes and runs."""
  return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:4], "little") >> 1


def keys_for(seed: int, names: Sequence[str]) -> jax.Array:
  """One PRNG key per named sequence."""
  return sequence_keys(seed, [stable_id(n) for n in names])


def encode_chat(tok: Tokenizer, messages: Sequence[Message],
                add_generation_prompt: bool = True) -> list[int]:
  """Token ids of a rendered chat (the tokenizer does not double a BOS)."""
  text = tok.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt)
  return tok.encode(text)


def generate_chat(sampler: Sampler, params, tok: Tokenizer,
                  conversations: Sequence[Sequence[Message]], *, seed: int,
                  names: Sequence[str], sampling: SamplingParams,
                  max_prompt_tokens: int) -> list[str]:
  """The assistant's next message for each conversation.

  Conversations longer than `max_prompt_tokens` keep their last
  `max_prompt_tokens` tokens (few-shot examples come first, so they are what
  is cut) with a warning.
  """
  prompts = []
  for conv, name in zip(conversations, names):
    ids = encode_chat(tok, conv)
    if len(ids) > max_prompt_tokens:
      logging.warning("%s: prompt of %d tokens cut to the last %d", name, len(ids),
                      max_prompt_tokens)
      ids = ids[-max_prompt_tokens:]
    prompts.append(ids)
  out = sampler.generate(params, prompts, keys_for(seed, names), sampling)
  texts = []
  for tokens, length in zip(np.asarray(out.tokens), np.asarray(out.lengths)):
    texts.append(tok.decode(tokens[:length], skip_special_tokens=True).strip())
  return texts
