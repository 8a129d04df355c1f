"""Batched next-token log-probs of a few answer tokens: one forward, no sampling.

A feedback label needs log P(option | context) for two option tokens at the
last position only. Contexts are left-padded (so the last column is every
row's last real token, as in the sampler), sorted by length and grouped into
fixed-size batches padded to a length bucket: each bucket compiles once, and
short contexts are not padded to the longest one. Only the last position
goes through the unembedding, so no [B, T, V] logits are built (V is 150k+
for Qwen and Gemma). Leading tokens that every context of a batch shares
(few-shot examples) are prefilled once at batch 1 and only the rest per row
(`sampling/prefix.py`).
"""

from __future__ import annotations

import collections
import functools
import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cai_jax import distributed
from cai_jax.model import transformer
from cai_jax.model.config import ModelConfig
from cai_jax.model.sharding import Sharder
from cai_jax.sampling import prefix as prefix_lib
from cai_jax.sampling.sampler import DEFAULT_LENGTH_BUCKETS
from cai_jax.text.padding import bucket, left_pad

_TRACES: collections.Counter = collections.Counter()
_PREFIX_TRACES: collections.Counter = collections.Counter()


def _option_logprobs(params, last_hidden_BD: jax.Array, option_ids_BK: jax.Array,
                     cfg: ModelConfig) -> jax.Array:
  logits_BV = transformer.logits_from_hidden(params, last_hidden_BD, cfg)
  logp_BV = jax.nn.log_softmax(logits_BV, axis=-1)
  return jnp.take_along_axis(logp_BV, option_ids_BK, axis=-1)


def option_logprobs(params, tokens_BT: jax.Array, mask_BT: jax.Array, option_ids_BK: jax.Array,
                    *, cfg: ModelConfig, sharder: Sharder | None = None) -> jax.Array:
  """log P(option_ids_BK[b, k] | row b) at the last position: [B, K] float32. Pure."""
  hidden_BTD, _ = transformer.hidden_states(params, tokens_BT, cfg, mask_BT=mask_BT,
                                            sharder=sharder)
  return _option_logprobs(params, hidden_BTD[:, -1], option_ids_BK, cfg)


def option_logprobs_after_prefix(params, prefix_cache: transformer.Cache, suffix_BT: jax.Array,
                                 suffix_mask_BT: jax.Array, option_ids_BK: jax.Array, *,
                                 cfg: ModelConfig, sharder: Sharder | None = None) -> jax.Array:
  """`option_logprobs` of contexts = one shared prefix (its batch-1 cache) + suffixes. Pure."""
  B, T = suffix_BT.shape
  cache = prefix_lib.broadcast_cache(prefix_cache, B, T, sharder)
  hidden_BTD, _ = transformer.hidden_states(
      params, suffix_BT, cfg, mask_BT=suffix_mask_BT,
      positions_BT=prefix_lib.suffix_positions(prefix_cache, suffix_mask_BT), cache=cache,
      sharder=sharder)
  return _option_logprobs(params, hidden_BTD[:, -1], option_ids_BK, cfg)


@functools.lru_cache(maxsize=16)
def _compiled(cfg: ModelConfig, sharder: Sharder | None):
  def traced(params, tokens, mask, ids):
    _TRACES[(cfg, sharder)] += 1
    return option_logprobs(params, tokens, mask, ids, cfg=cfg, sharder=sharder)

  if sharder is None:
    return jax.jit(traced)
  batch2 = sharder.sharding(("batch", None))
  return jax.jit(traced, in_shardings=(transformer.param_shardings(cfg, sharder), batch2,
                                       batch2, batch2), out_shardings=batch2)


@functools.lru_cache(maxsize=16)
def _compiled_after_prefix(cfg: ModelConfig, sharder: Sharder | None):
  def traced(params, prefix_cache, tokens, mask, ids):
    _PREFIX_TRACES[(cfg, sharder)] += 1
    return option_logprobs_after_prefix(params, prefix_cache, tokens, mask, ids, cfg=cfg,
                                        sharder=sharder)

  if sharder is None:
    return jax.jit(traced)
  batch2 = sharder.sharding(("batch", None))
  # The prefix cache keeps the sharding `prefix.prefill` gave it (None: as passed).
  return jax.jit(traced, in_shardings=(transformer.param_shardings(cfg, sharder), None, batch2,
                                       batch2, batch2), out_shardings=batch2)


class OptionScorer:
  """Scores (context, option ids) requests in length-bucketed batches.

  A batch whose contexts share at least `min_shared_prefix` leading tokens
  (0 or None: never) prefills them once at batch 1; the last such prefix's
  cache is kept for the next batch with the same prefix and params.
  """

  def __init__(self, cfg: ModelConfig, *, pad_id: int, batch_size: int = 8,
               sharder: Sharder | None = None,
               length_buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS,
               min_shared_prefix: int | None = prefix_lib.DEFAULT_MIN_SHARED_PREFIX):
    if min_shared_prefix is not None and min_shared_prefix < 0:
      raise ValueError(f"min_shared_prefix must be >= 0 or None, got {min_shared_prefix}")
    self.min_shared_prefix = min_shared_prefix
    self.prefix_cache = prefix_lib.PrefixCache(cfg, pad_id=pad_id, sharder=sharder)
    self.cfg = cfg
    self.pad_id = int(pad_id)
    self.sharder = sharder
    self.length_buckets = tuple(b for b in length_buckets if b < cfg.max_seq_len) + (
        cfg.max_seq_len,)
    multiple = 1 if sharder is None else sharder.batch_shards
    self.batch_size = -(-max(1, batch_size) // multiple) * multiple

  def num_traces(self) -> int:
    """How often the forward was traced for this model (tests prove no recompiles)."""
    return _TRACES[(self.cfg, self.sharder)]

  def num_prefix_traces(self) -> int:
    """How often the forward after a shared prefix was traced for this model."""
    return _PREFIX_TRACES[(self.cfg, self.sharder)]

  def __call__(self, params, contexts: Sequence[Sequence[int]],
               option_ids: Sequence[Sequence[int]]) -> np.ndarray:
    """[N, K] float32 log-probs of each request's K option tokens after its context.

    Contexts longer than the model's max_seq_len keep their last tokens
    (few-shot examples come first, so they are what is cut) with a warning.
    """
    n = len(contexts)
    if n != len(option_ids):
      raise ValueError(f"{n} contexts but {len(option_ids)} option id lists")
    if n == 0:
      return np.zeros((0, 0), np.float32)
    k = len(option_ids[0])
    if any(len(ids) != k for ids in option_ids):
      raise ValueError("every request needs the same number of options")
    if any(not 0 <= i < self.cfg.vocab_size for ids in option_ids for i in ids):
      raise ValueError(f"option token ids outside the vocabulary [0, {self.cfg.vocab_size})")
    if any(len(c) == 0 for c in contexts):
      raise ValueError("empty context: every request needs at least one token")
    limit = self.length_buckets[-1]
    contexts = list(contexts)
    for i, c in enumerate(contexts):
      if len(c) > limit:
        logging.warning("feedback context of %d tokens cut to its last %d", len(c), limit)
        contexts[i] = c[-limit:]
    out = np.zeros((n, k), np.float32)
    order = sorted(range(n), key=lambda i: len(contexts[i]))
    B = self.batch_size
    batch2 = None if self.sharder is None else self.sharder.sharding(("batch", None))
    for start in range(0, n, B):
      rows = order[start:start + B]
      batch = [contexts[i] for i in rows]
      longest = max(len(c) for c in batch)
      ids = np.zeros((B, k), np.int32)
      ids[:len(rows)] = [option_ids[i] for i in rows]
      shared = prefix_lib.shared_prefix_length(batch, self.min_shared_prefix)
      if shared:
        P = bucket(shared, self.length_buckets)
        T = bucket(longest - shared, self.length_buckets)
        shared = shared if P + T <= limit else 0  # else: whole contexts, as below
      if shared:
        prefix_cache = self.prefix_cache.get(params, batch[0][:shared], P)
        tokens, mask = left_pad([c[shared:] for c in batch], T, self.pad_id, num_rows=B)
        if batch2 is not None:  # global arrays, so several hosts can share a batch
          tokens, mask, ids = (distributed.to_global(x, batch2) for x in (tokens, mask, ids))
        logp = _compiled_after_prefix(self.cfg, self.sharder)(params, prefix_cache, tokens,
                                                              mask, ids)
      else:
        T = bucket(longest, self.length_buckets)
        tokens, mask = left_pad(batch, T, self.pad_id, num_rows=B)
        if batch2 is not None:
          tokens, mask, ids = (distributed.to_global(x, batch2) for x in (tokens, mask, ids))
        logp = _compiled(self.cfg, self.sharder)(params, tokens, mask, ids)
      out[rows] = distributed.to_host(logp)[:len(rows)]
    return out
