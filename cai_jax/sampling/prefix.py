"""A prompt prefix shared by every row of a batch, prefilled once at batch 1.

Few-shot contexts (critique/revision, AI feedback labels) start every row of
a batch with the same tokens. Their keys and values do not depend on the
row, so they are computed once for one row, broadcast to the B rows, and each
row's own suffix is prefilled after them:

  slots      [0, P)        the prefix, left-padded to a length bucket P
             [P, P + T)    the suffixes, each left-padded to a bucket T
  positions  prefix        0 .. n - 1 (n real prefix tokens; padding -1)
             suffix        n + cumsum(mask) - 1

Padding slots hold position -1 and are never attended to, so every real
token sees the same keys at the same positions as when its row is prefilled
whole: the results agree up to float summation order (masked slots add
exact zeros to the softmax, but the sums run over other slot counts).

`PrefixCache` keeps the last prefix's batch-1 cache on the device, keyed by
its tokens and the identity of the params' arrays (JAX arrays are immutable:
the same arrays hold the same values), so consecutive calls with one
few-shot prefix prefill it once.
"""

from __future__ import annotations

import collections
import functools
import weakref
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cai_jax import distributed
from cai_jax.model import transformer
from cai_jax.model.config import ModelConfig
from cai_jax.model.sharding import Sharder
from cai_jax.text.padding import left_pad

DEFAULT_MIN_SHARED_PREFIX = 64

_TRACES: collections.Counter = collections.Counter()


def shared_prefix_length(rows: Sequence[Sequence[int]], min_length: int | None) -> int:
  """How many leading tokens to prefill once for all `rows`; 0 for none.

  The rows' longest common prefix, cut to min(len) - 1 so that every row
  keeps its last token (whose logits come out of the suffix prefill); 0 when
  that is under `min_length`, when `min_length` is 0 or None (disabled) or
  for a single row (nothing to share).
  """
  if not min_length or len(rows) < 2:
    return 0
  if min_length < 0:
    raise ValueError(f"min_shared_prefix must be >= 0 or None, got {min_length}")
  n = min(len(r) for r in rows) - 1
  if n < min_length:
    return 0
  rows_RN = np.asarray([list(r[:n]) for r in rows], np.int64)
  differs_N = np.any(rows_RN != rows_RN[:1], axis=0)
  common = int(np.argmax(differs_N)) if differs_N.any() else n
  return common if common >= min_length else 0


def constrain_cache(cache: transformer.Cache, sharder: Sharder | None) -> transformer.Cache:
  """A stacked cache constrained to `transformer.cache_axes()` (no-op without a sharder)."""
  if sharder is None:
    return cache
  return jax.tree.map(lambda x, a: sharder.constrain(x, a), cache, transformer.cache_axes(),
                      is_leaf=lambda x: isinstance(x, jax.Array))


def broadcast_cache(cache_1: transformer.Cache, batch: int, extra: int,
                    sharder: Sharder | None = None) -> transformer.Cache:
  """A batch-1 stacked cache as `batch` rows, with `extra` empty slots after it.

  The next slot to write stays the prefix's end (`index`).
  """
  L, _, K, P, H = cache_1["k"].shape

  def grow(x_L1KPH):
    x_LBKPH = jnp.broadcast_to(x_L1KPH, (L, batch, K, P, H))
    return jnp.pad(x_LBKPH, ((0, 0), (0, 0), (0, 0), (0, extra), (0, 0)))

  pos_BS = jnp.pad(jnp.broadcast_to(cache_1["pos"], (batch, P)), ((0, 0), (0, extra)),
                   constant_values=-1)
  cache = {"k": grow(cache_1["k"]), "v": grow(cache_1["v"]), "pos": pos_BS,
           "index": cache_1["index"]}
  return constrain_cache(cache, sharder)


def suffix_positions(cache: transformer.Cache, mask_BT: jax.Array) -> jax.Array:
  """RoPE positions of left-padded suffixes after the cache's prefix: n + cumsum(mask) - 1."""
  prefix_len = jnp.max(cache["pos"]) + 1  # the prefix's real tokens, the same in every row
  return prefix_len + jnp.cumsum(mask_BT.astype(jnp.int32), axis=1) - 1


def prefill(params, prefix_1P: jax.Array, mask_1P: jax.Array, *, cfg: ModelConfig,
            sharder: Sharder | None = None) -> transformer.Cache:
  """The stacked KV cache of one left-padded prefix: P slots, index P. Pure; jit it."""
  cache = transformer.init_cache(cfg, 1, prefix_1P.shape[1])
  _, cache = transformer.hidden_states(params, prefix_1P, cfg, mask_BT=mask_1P, cache=cache,
                                       sharder=sharder)
  return constrain_cache(cache, sharder)


@functools.lru_cache(maxsize=16)
def _compiled_prefill(cfg: ModelConfig, sharder: Sharder | None):
  """One jitted `prefill` per (model, mesh), shared by samplers and scorers."""

  def traced(params, prefix, mask):
    _TRACES[(cfg, sharder)] += 1
    return prefill(params, prefix, mask, cfg=cfg, sharder=sharder)

  if sharder is None:
    return jax.jit(traced)
  rep = sharder.replicated
  return jax.jit(traced, in_shardings=(transformer.param_shardings(cfg, sharder), rep, rep))


def num_prefill_traces(cfg: ModelConfig, sharder: Sharder | None = None) -> int:
  return _TRACES[(cfg, sharder)]


class PrefixCache:
  """Prefills shared prefixes at batch 1; keeps the last one while tokens and params match."""

  def __init__(self, cfg: ModelConfig, *, pad_id: int, sharder: Sharder | None = None):
    self.cfg, self.pad_id, self.sharder = cfg, int(pad_id), sharder
    self.num_prefills = 0  # batch-1 prefills run (tests: the prefix path is taken)
    self.clear()

  def clear(self) -> None:
    """Forget the kept prefix (the next `get` prefills)."""
    self._key, self._cache, self._param_refs = None, None, ()

  def _same_params(self, leaves) -> bool:
    return len(leaves) == len(self._param_refs) and all(
        r() is x for r, x in zip(self._param_refs, leaves))

  def get(self, params, prefix: Sequence[int], length: int) -> transformer.Cache:
    """The batch-1 cache of `prefix` left-padded to `length` slots."""
    key = (tuple(int(t) for t in prefix), length)
    leaves = jax.tree.leaves(params)
    if self._cache is not None and key == self._key and self._same_params(leaves):
      return self._cache
    self.clear()  # the old prefix's cache is freed before the new one is made
    tokens, mask = left_pad([prefix], length, self.pad_id)
    if self.sharder is not None:
      tokens, mask = (distributed.to_global(x, self.sharder.replicated) for x in (tokens, mask))
    cache = _compiled_prefill(self.cfg, self.sharder)(params, tokens, mask)
    self.num_prefills += 1
    if all(isinstance(x, jax.Array) for x in leaves):  # numpy leaves may change in place
      self._key, self._cache = key, cache
      self._param_refs = tuple(weakref.ref(x) for x in leaves)
    return cache
