"""Batched next-token log-probs of a few answer tokens: one forward, no sampling.

A feedback label needs log P(option | context) for two option tokens at the
last position only. Contexts are left-padded (so the last column is every
row's last real token, as in the sampler), sorted by length and grouped into
fixed-size batches padded to a length bucket: each bucket compiles once, and
short contexts are not padded to the longest one. Only the last position
goes through the unembedding, so no [B, T, V] logits are built (V is 150k+
for Qwen and Gemma).
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
from cai_jax.sampling.sampler import DEFAULT_LENGTH_BUCKETS
from cai_jax.text.padding import bucket, left_pad

_TRACES: collections.Counter = collections.Counter()


def option_logprobs(params, tokens_BT: jax.Array, mask_BT: jax.Array, option_ids_BK: jax.Array,
                    *, cfg: ModelConfig, sharder: Sharder | None = None) -> jax.Array:
  """log P(option_ids_BK[b, k] | row b) at the last position: [B, K] float32. Pure."""
  hidden_BTD, _ = transformer.hidden_states(params, tokens_BT, cfg, mask_BT=mask_BT,
                                            sharder=sharder)
  logits_BV = transformer.logits_from_hidden(params, hidden_BTD[:, -1], cfg)
  logp_BV = jax.nn.log_softmax(logits_BV, axis=-1)
  return jnp.take_along_axis(logp_BV, option_ids_BK, axis=-1)


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


class OptionScorer:
  """Scores (context, option ids) requests in length-bucketed batches."""

  def __init__(self, cfg: ModelConfig, *, pad_id: int, batch_size: int = 8,
               sharder: Sharder | None = None,
               length_buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS):
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
    fn = _compiled(self.cfg, self.sharder)
    out = np.zeros((n, k), np.float32)
    order = sorted(range(n), key=lambda i: len(contexts[i]))
    B = self.batch_size
    for start in range(0, n, B):
      rows = order[start:start + B]
      T = bucket(max(len(contexts[i]) for i in rows), self.length_buckets)
      tokens, mask = left_pad([contexts[i] for i in rows], T, self.pad_id, num_rows=B)
      ids = np.zeros((B, k), np.int32)
      ids[:len(rows)] = [option_ids[i] for i in rows]
      if self.sharder is not None:  # global arrays, so several hosts can share a batch
        batch2 = self.sharder.sharding(("batch", None))
        tokens, mask, ids = (distributed.to_global(x, batch2) for x in (tokens, mask, ids))
      logp = distributed.to_host(fn(params, tokens, mask, ids))
      out[rows] = logp[:len(rows)]
    return out
