"""Jit-compiled sampling: one prefill, then one `lax.while_loop` over decode steps.

Prompts are left-padded to a length bucket and the batch to a size bucket, so
a new batch of prompts does not recompile. Every sequence has its own PRNG
key; the key of decode step t is `fold_in(key, t)`, so the random numbers a
sequence draws do not depend on its batch-mates or on the batch size (its
logits can, at float rounding: padding and the shared prefix below). Shards
have a fixed composition, so reruns and resumed runs are bit-identical.

The decode loop runs the layers unrolled over per-layer copies of the weights
and cache (`cfg.decode_layers`, default "unrolled"): under a layer scan XLA
copies the slice of every weight and of the cache that each layer reads, on
every decode step, which took about half of a decode step on the CPU and on an
H100. The per-layer copies, made once per `sample` call, cost one more set of
layer weights in memory; "scan" avoids that.

A prefix that every prompt of a call starts with (few-shot examples) is
prefilled once at batch 1 and broadcast to the rows, and only the rest of
each prompt is prefilled per row (`sample_after_prefix`, `sampling/prefix.py`).
The result is the one of prefilling whole prompts up to float summation
order, as it already was for the padding a longer batch-mate brings.

Returned log-probs are of the sampled token under softmax(logits / temperature)
before top-k/top-p filtering (softmax(logits) for greedy): the behaviour
policy's log-probs that PPO needs.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from cai_jax import distributed
from cai_jax.model import transformer
from cai_jax.model.config import ModelConfig
from cai_jax.model.sharding import Sharder, constrain
from cai_jax.sampling import prefix as prefix_lib
from cai_jax.text.padding import batch_bucket, bucket, left_pad

# Steps of 1.5x above 256 tokens: long few-shot prompts (critique/revision,
# labeling) pad less, for a few more compiled shapes.
DEFAULT_LENGTH_BUCKETS = (16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 4096, 8192)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to pick the next token. temperature 0 means greedy."""

  temperature: float = 0.0
  top_k: int = 0  # 0: no top-k filter
  top_p: float = 1.0  # 1.0: no nucleus filter

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


@flax.struct.dataclass
class SamplingState:
  step: jax.Array  # [] int32, index of the next token to sample
  done_B: jax.Array  # [B] bool, has emitted a stop token
  tokens_BM: jax.Array  # [B, M] int32
  logprobs_BM: jax.Array  # [B, M] float32
  lengths_B: jax.Array  # [B] int32, tokens emitted including the stop token
  positions_B: jax.Array  # [B] int32, position of the next token fed
  cache: dict
  keys_B: jax.Array  # [B] per-sequence PRNG keys


@flax.struct.dataclass
class SampleOutput:
  tokens: jax.Array  # [B, M] int32; pad_id after a sequence's stop token
  logprobs: jax.Array  # [B, M] float32; 0 after the stop token
  lengths: jax.Array  # [B] int32; number of valid tokens (stop token included)


def _filter_logits(logits_V: jax.Array, sampling: SamplingParams) -> jax.Array:
  if sampling.top_k:
    kth = jax.lax.top_k(logits_V, sampling.top_k)[0][-1]
    logits_V = jnp.where(logits_V < kth, -jnp.inf, logits_V)
  if sampling.top_p < 1.0:
    sorted_V = jnp.sort(logits_V)[::-1]
    cum_V = jnp.cumsum(jax.nn.softmax(sorted_V))
    # Keep the smallest prefix whose mass reaches top_p (at least one token).
    cutoff_idx = jnp.sum(cum_V < sampling.top_p)
    cutoff = sorted_V[jnp.minimum(cutoff_idx, sorted_V.shape[0] - 1)]
    logits_V = jnp.where(logits_V < cutoff, -jnp.inf, logits_V)
  return logits_V


def _argmax(x_BV: jax.Array) -> jax.Array:
  """First index of each row's maximum, as `jnp.argmax`: a max and a min
  reduction are ~3x faster on XLA:CPU than argmax's (value, index) reduction."""
  V = x_BV.shape[-1]
  is_max_BV = x_BV == jnp.max(x_BV, axis=-1, keepdims=True)
  first_B = jnp.min(jnp.where(is_max_BV, jnp.arange(V, dtype=jnp.int32), V), axis=-1)
  return jnp.minimum(first_B, V - 1)  # an all-NaN row has no maximum


def _pick(logits_BV: jax.Array, keys_B: jax.Array, step: jax.Array,
          sampling: SamplingParams) -> tuple[jax.Array, jax.Array]:
  """Next token and its log-prob for every row."""
  if sampling.greedy:
    scaled_BV = logits_BV
    tokens_B = _argmax(logits_BV)
  else:
    scaled_BV = logits_BV / sampling.temperature

    def row(scaled_V, key, step):
      key = jax.random.fold_in(key, step)
      return jax.random.categorical(key, _filter_logits(scaled_V, sampling))

    # `step`: one decode step for every row, or each row's own ([B]: the engine's slots).
    step_B = jnp.broadcast_to(step, scaled_BV.shape[:1])
    tokens_B = jax.vmap(row)(scaled_BV, keys_B, step_B).astype(jnp.int32)
  # log_softmax at one token: no [B, V] array of log-probs.
  picked_B = jnp.take_along_axis(scaled_BV, tokens_B[:, None], axis=-1)[:, 0]
  return tokens_B, picked_B - jax.nn.logsumexp(scaled_BV, axis=-1)


def sample(params, prompt_BT: jax.Array, prompt_mask_BT: jax.Array, keys_B: jax.Array,
           *, cfg: ModelConfig, sampling: SamplingParams, max_new_tokens: int,
           stop_ids: tuple[int, ...], pad_id: int,
           sharder: Sharder | None = None) -> SampleOutput:
  """Sample `max_new_tokens` after left-padded prompts. Pure; jit it.

  The prefill runs the layer scan; the decode loop follows `cfg.decode_layers`.
  """
  B, T = prompt_BT.shape
  # Unrolled: the prefill fills a cache of exactly T slots, extended per layer
  # afterwards (cheaper than slicing a full stacked cache into layers).
  unroll = cfg.decode_layers == "unrolled"
  cache = prefix_lib.constrain_cache(
      transformer.init_cache(cfg, B, T if unroll else T + max_new_tokens), sharder)
  positions_BT = jnp.cumsum(prompt_mask_BT.astype(jnp.int32), axis=1) - 1
  return _prefill_and_decode(params, cache, prompt_BT, prompt_mask_BT, positions_BT, keys_B, cfg=cfg,
                             sampling=sampling, max_new_tokens=max_new_tokens,
                             stop_ids=stop_ids, pad_id=pad_id, sharder=sharder)


def sample_after_prefix(params, prefix_cache: transformer.Cache, suffix_BT: jax.Array,
                        suffix_mask_BT: jax.Array, keys_B: jax.Array, *, cfg: ModelConfig,
                        sampling: SamplingParams, max_new_tokens: int,
                        stop_ids: tuple[int, ...], pad_id: int,
                        sharder: Sharder | None = None) -> SampleOutput:
  """`sample` of prompts = one shared prefix + left-padded suffixes. Pure; jit it.

  `prefix_cache`: the prefix's batch-1 stacked cache (`prefix.prefill`),
  broadcast to the B rows; the suffixes are prefilled after it at positions
  continuing from the prefix's real length (see `sampling/prefix.py`).
  """
  B, T = suffix_BT.shape
  unroll = cfg.decode_layers == "unrolled"
  cache = prefix_lib.broadcast_cache(prefix_cache, B, T if unroll else T + max_new_tokens,
                                     sharder)
  positions_BT = prefix_lib.suffix_positions(prefix_cache, suffix_mask_BT)
  return _prefill_and_decode(params, cache, suffix_BT, suffix_mask_BT, positions_BT, keys_B, cfg=cfg,
                             sampling=sampling, max_new_tokens=max_new_tokens,
                             stop_ids=stop_ids, pad_id=pad_id, sharder=sharder)


def _prefill_and_decode(params, cache: transformer.Cache, tokens_BT: jax.Array,
                        mask_BT: jax.Array, positions_BT: jax.Array, keys_B: jax.Array,
                        **decode_kw) -> SampleOutput:
  """Prefill left-padded tokens at the cache's index, then `_decode` from the last column."""
  hidden_BTD, cache = transformer.hidden_states(
      params, tokens_BT, decode_kw["cfg"], mask_BT=mask_BT, positions_BT=positions_BT,
      cache=cache, sharder=decode_kw["sharder"])
  return _decode(params, cache, hidden_BTD[:, -1], positions_BT[:, -1] + 1, keys_B, **decode_kw)


def _decode(params, cache: transformer.Cache, last_hidden_BD: jax.Array,
            positions_B: jax.Array, keys_B: jax.Array, *, cfg: ModelConfig,
            sampling: SamplingParams, max_new_tokens: int, stop_ids: tuple[int, ...],
            pad_id: int, sharder: Sharder | None) -> SampleOutput:
  """The first token from the prefill's last hidden state, then the decode loop.

  `cache`: stacked, after the prefill; for "unrolled" it holds just the
  prefilled slots (grown by M here), for "scan" M empty slots already.
  `positions_B`: the position of each row's first new token.
  """
  B = last_hidden_BD.shape[0]
  M = max_new_tokens
  stop = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)
  # Left padding: the last column is every row's last prompt token.
  logits_BV = transformer.logits_from_hidden(params, last_hidden_BD, cfg)
  logits_BV = constrain(sharder, logits_BV, ("batch", "vocab"))
  first_B, first_logp_B = _pick(logits_BV, keys_B, jnp.zeros((), jnp.int32), sampling)
  done_B = jnp.isin(first_B, stop)
  if cfg.decode_layers == "unrolled":
    params = transformer.unstack_layers(params)
    cache = transformer.unstack_cache(cache, length=cache["pos"].shape[1] + M)

  state = SamplingState(
      step=jnp.ones((), jnp.int32),
      done_B=done_B,
      tokens_BM=jnp.full((B, M), pad_id, jnp.int32).at[:, 0].set(first_B),
      logprobs_BM=jnp.zeros((B, M), jnp.float32).at[:, 0].set(first_logp_B),
      lengths_B=jnp.ones((B,), jnp.int32),
      positions_B=positions_B.astype(jnp.int32),
      cache=cache,
      keys_B=keys_B)

  def cond(s: SamplingState):
    return (s.step < M) & ~jnp.all(s.done_B)

  def body(s: SamplingState):
    last_B = s.tokens_BM[:, s.step - 1]
    hidden, cache = transformer.hidden_states(
        params, last_B[:, None], cfg, positions_BT=s.positions_B[:, None],
        cache=s.cache, sharder=sharder)
    logits_BV = transformer.logits_from_hidden(params, hidden[:, 0], cfg)
    tok_B, logp_B = _pick(logits_BV, s.keys_B, s.step, sampling)
    tok_B = jnp.where(s.done_B, pad_id, tok_B)
    logp_B = jnp.where(s.done_B, 0.0, logp_B)
    return SamplingState(
        step=s.step + 1,
        done_B=s.done_B | jnp.isin(tok_B, stop),
        tokens_BM=jax.lax.dynamic_update_index_in_dim(s.tokens_BM, tok_B, s.step, 1),
        logprobs_BM=jax.lax.dynamic_update_index_in_dim(s.logprobs_BM, logp_B, s.step, 1),
        lengths_B=s.lengths_B + (~s.done_B).astype(jnp.int32),
        positions_B=s.positions_B + 1,
        cache=cache,
        keys_B=s.keys_B)

  state = jax.lax.while_loop(cond, body, state)
  return SampleOutput(tokens=state.tokens_BM, logprobs=state.logprobs_BM,
                      lengths=state.lengths_B)


def sequence_keys(seed: int | jax.Array, sequence_ids: Sequence[int]) -> jax.Array:
  """One PRNG key per sequence, from a base seed and stable sequence ids."""
  base = jax.random.key(seed) if isinstance(seed, int) else seed
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(
      jnp.asarray(sequence_ids, jnp.uint32))


_TRACES: collections.Counter = collections.Counter()
_PREFIX_TRACES: collections.Counter = collections.Counter()


def _out_shardings(sharder: Sharder) -> SampleOutput:
  batch2 = sharder.sharding(("batch", None))
  return SampleOutput(tokens=batch2, logprobs=batch2, lengths=sharder.sharding(("batch",)))


@functools.lru_cache(maxsize=32)
def _compiled_sample(cfg: ModelConfig, sampling: SamplingParams, max_new_tokens: int,
                     stop_ids: tuple[int, ...], pad_id: int, sharder: Sharder | None):
  """One jitted `sample` per static setting, shared by every Sampler."""
  key = (cfg, sampling, max_new_tokens, stop_ids, pad_id, sharder)

  def traced(params, prompt, mask, key_data):
    _TRACES[key] += 1
    keys = jax.random.wrap_key_data(key_data)
    return sample(params, prompt, mask, keys, cfg=cfg, sampling=sampling,
                  max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=pad_id,
                  sharder=sharder)

  if sharder is None:
    return jax.jit(traced)
  batch2 = sharder.sharding(("batch", None))
  return jax.jit(traced, in_shardings=(transformer.param_shardings(cfg, sharder), batch2,
                                       batch2, batch2), out_shardings=_out_shardings(sharder))


@functools.lru_cache(maxsize=32)
def _compiled_sample_after_prefix(cfg: ModelConfig, sampling: SamplingParams,
                                  max_new_tokens: int, stop_ids: tuple[int, ...], pad_id: int,
                                  sharder: Sharder | None):
  """One jitted `sample_after_prefix` per static setting, shared by every Sampler."""
  key = (cfg, sampling, max_new_tokens, stop_ids, pad_id, sharder)

  def traced(params, prefix_cache, suffix, mask, key_data):
    _PREFIX_TRACES[key] += 1
    keys = jax.random.wrap_key_data(key_data)
    return sample_after_prefix(params, prefix_cache, suffix, mask, keys, cfg=cfg,
                               sampling=sampling, max_new_tokens=max_new_tokens,
                               stop_ids=stop_ids, pad_id=pad_id, sharder=sharder)

  if sharder is None:
    return jax.jit(traced)
  batch2 = sharder.sharding(("batch", None))
  # The prefix cache keeps the sharding `prefix.prefill` gave it (None: as passed).
  return jax.jit(traced, in_shardings=(transformer.param_shardings(cfg, sharder), None, batch2,
                                       batch2, batch2), out_shardings=_out_shardings(sharder))


class Sampler:
  """Pads prompts to buckets and calls one compiled `sample` per bucket.

  Compiled functions are cached per (model config, sampling, lengths, stop
  ids, mesh), so a new Sampler for the same model does not recompile.

  When the prompts of a call share at least `min_shared_prefix` leading
  tokens (0 or None: never), those are prefilled once at batch 1 and only
  the rest of each prompt per row (`sampling/prefix.py`); the last shared
  prefix's cache is kept for the next call with the same prefix and params.
  """

  def __init__(self, cfg: ModelConfig, *, max_new_tokens: int, stop_ids: Sequence[int],
               pad_id: int, sharder: Sharder | None = None,
               length_buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS,
               min_shared_prefix: int | None = prefix_lib.DEFAULT_MIN_SHARED_PREFIX):
    if min_shared_prefix is not None and min_shared_prefix < 0:
      raise ValueError(f"min_shared_prefix must be >= 0 or None, got {min_shared_prefix}")
    self.cfg = cfg
    self.max_new_tokens = max_new_tokens
    self.stop_ids = tuple(int(i) for i in stop_ids)
    self.pad_id = int(pad_id)
    self.sharder = sharder
    self.length_buckets = tuple(length_buckets)
    self.min_shared_prefix = min_shared_prefix
    self.prefix_cache = prefix_lib.PrefixCache(cfg, pad_id=pad_id, sharder=sharder)

  def _key(self, sampling: SamplingParams):
    return (self.cfg, sampling, self.max_new_tokens, self.stop_ids, self.pad_id, self.sharder)

  def num_traces(self, sampling: SamplingParams = SamplingParams()) -> int:
    """How often `sample` was traced for this setting (tests prove no recompiles)."""
    return _TRACES[self._key(sampling)]

  def num_prefix_traces(self, sampling: SamplingParams = SamplingParams()) -> int:
    """How often `sample_after_prefix` was traced for this setting."""
    return _PREFIX_TRACES[self._key(sampling)]

  def batch_multiple(self) -> int:
    return 1 if self.sharder is None else self.sharder.batch_shards

  def generate(self, params, prompts: Sequence[Sequence[int]], keys: jax.Array,
               sampling: SamplingParams = SamplingParams()) -> SampleOutput:
    """Sample continuations of token-id prompts; `keys` has one key per prompt.

    Returns host numpy arrays for the real (unpadded) rows.
    """
    if not prompts:
      raise ValueError("generate() needs at least one prompt")
    if any(len(p) == 0 for p in prompts):
      raise ValueError("empty prompt: every prompt needs at least one token")
    n = len(prompts)
    longest = max(len(p) for p in prompts)
    room = self.cfg.max_seq_len - self.max_new_tokens
    if longest > room:
      raise ValueError(f"a prompt of {longest} tokens + max_new_tokens {self.max_new_tokens}"
                       f" exceeds the model's max_seq_len {self.cfg.max_seq_len}")
    B = batch_bucket(n, self.batch_multiple())
    keys = jnp.asarray(keys)
    if keys.shape[0] != n:
      raise ValueError(f"got {keys.shape[0]} keys for {n} prompts")
    if B > n:
      keys = jnp.concatenate([keys, jnp.repeat(keys[:1], B - n, axis=0)])
    key_data = np.asarray(jax.random.key_data(keys))
    batch2 = None if self.sharder is None else self.sharder.sharding(("batch", None))

    shared = prefix_lib.shared_prefix_length(prompts, self.min_shared_prefix)
    if shared:
      P = bucket(shared, self.length_buckets)
      T = bucket(longest - shared, self.length_buckets)
      shared = shared if P + T <= room else 0  # else: the whole prompts, as below
    if shared:
      prefix_cache = self.prefix_cache.get(params, prompts[0][:shared], P)
      suffix, mask = left_pad([p[shared:] for p in prompts], T, self.pad_id, num_rows=B)
      if batch2 is not None:  # global arrays, so several hosts can share a batch
        suffix, mask, key_data = (distributed.to_global(x, batch2)
                                  for x in (suffix, mask, key_data))
      out = _compiled_sample_after_prefix(*self._key(sampling))(
          params, prefix_cache, suffix, mask, key_data)
    else:
      T = min(bucket(longest, self.length_buckets), room)
      prompt, mask = left_pad(prompts, T, self.pad_id, num_rows=B)
      if batch2 is not None:
        prompt, mask, key_data = (distributed.to_global(x, batch2)
                                  for x in (prompt, mask, key_data))
      out = _compiled_sample(*self._key(sampling))(params, prompt, mask, key_data)
    return SampleOutput(tokens=distributed.to_host(out.tokens)[:n],
                        logprobs=distributed.to_host(out.logprobs)[:n],
                        lengths=distributed.to_host(out.lengths)[:n])
