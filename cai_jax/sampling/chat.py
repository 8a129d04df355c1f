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
import ml_collections
import numpy as np

from cai_jax.model.sharding import Sharder

from cai_jax.sampling.engine import Engine
from cai_jax.sampling.prefix import DEFAULT_MIN_SHARED_PREFIX
from cai_jax.sampling.sampler import Sampler, SamplingParams, sequence_keys
from cai_jax.text.chat import Message, generation_ids
from cai_jax.text.tokenizer import Tokenizer


def stable_id(text: str) -> int:
  """A 31-bit integer id of a string, stable across processes and runs."""
  return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:4], "little") >> 1


def keys_for(seed: int, names: Sequence[str]) -> jax.Array:
  """One PRNG key per named sequence."""
  return sequence_keys(seed, [stable_id(n) for n in names])


def generate_chat(sampler: Sampler | Engine, params, tok: Tokenizer,
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
    ids = generation_ids(tok, conv)
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


def sampling_from_config(c: ml_collections.ConfigDict) -> SamplingParams:
  """A config's `sampling` block (temperature, top_k, top_p) as SamplingParams."""
  return SamplingParams(temperature=float(c.temperature), top_k=int(c.get("top_k", 0)),
                        top_p=float(c.get("top_p", 1.0)))


class ChatModel:
  """A model answering conversations: loaded once, one sampler, a key per named sequence.

  Built from a generation stage's config (`dtype`, `decode_layers`,
  `max_new_tokens`, `max_prompt_tokens`, `sampling`, `seed`, optionally
  `min_shared_prefix`: see `Sampler`; `engine_slots` > 0: the continuous-batching engine
  with that many slots instead, `sampling/engine.py`).
  """

  def __init__(self, spec: str, sharder: Sharder, config: ml_collections.ConfigDict):
    from cai_jax.checkpoints.load import load_model
    self.spec, self.config = spec, config
    self.cfg, self.params, self.tok = load_model(spec, sharder, dtype=config.dtype,
                                                 decode_layers=config.decode_layers)
    logging.info("loaded %s: %s, %.1fM params on %d device(s)", spec, self.cfg.family,
                 self.cfg.num_params() / 1e6, len(jax.devices()))
    slots = int(config.get("engine_slots", 0))
    if slots:  # continuous batching (sampling/engine.py): same tokens, refilled slots
      self.sampler = Engine(self.cfg, slots=slots, max_new_tokens=config.max_new_tokens,
                            stop_ids=self.cfg.eos_token_ids, pad_id=self.tok.pad_id,
                            sharder=sharder)
    else:
      self.sampler = Sampler(
          self.cfg, max_new_tokens=config.max_new_tokens, stop_ids=self.cfg.eos_token_ids,
          pad_id=self.tok.pad_id, sharder=sharder,
          min_shared_prefix=config.get("min_shared_prefix", DEFAULT_MIN_SHARED_PREFIX))
    self.sampling = sampling_from_config(config.sampling)

  def generate(self, conversations: Sequence[Sequence[Message]], names: Sequence[str]
               ) -> list[str]:
    """The next assistant message of each conversation; `names` key the PRNG streams."""
    if not conversations:
      return []
    return generate_chat(self.sampler, self.params, self.tok, conversations,
                         seed=self.config.seed, names=names, sampling=self.sampling,
                         max_prompt_tokens=self.config.max_prompt_tokens)
