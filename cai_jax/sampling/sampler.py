"""Jit-compiled sampling: one prefill, then one `lax.while_loop` over decode steps.

Prompts are left-padded to a length bucket and the batch to a size bucket, so
a new batch of prompts does not recompile. Every sequence has its own PRNG
key; the key of decode step t is `fold_in(key, t)`, so what a sequence samples
does not depend on its batch-mates or on the batch size.

The decode loop runs the layers unrolled over per-layer copies of the weights
and cache (`cfg.decode_layers`, default "unrolled"): under a layer scan XLA
copies the slice of every weight and of the cache that each layer reads, on
every decode step, which took about half of a decode step on the CPU and on an
H100. The per-layer copies, made once per `sample` call, cost one more set of
layer weights in memory; "scan" avoids that.

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

    def row(scaled_V, key):
      key = jax.random.fold_in(key, step)
      return jax.random.categorical(key, _filter_logits(scaled_V, sampling))

    tokens_B = jax.vmap(row)(scaled_BV, keys_B).astype(jnp.int32)
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
  unroll = cfg.decode_layers == "unrolled"
  B, T = prompt_BT.shape
  M = max_new_tokens
  stop = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)

  # Unrolled: the prefill fills a cache of exactly T slots, extended per layer
  # afterwards (cheaper than slicing a full stacked cache into layers).
  cache = transformer.init_cache(cfg, B, T if unroll else T + M)
  if sharder is not None:
    cache = jax.tree.map(lambda x, a: sharder.constrain(x, a), cache,
                         transformer.cache_axes(), is_leaf=lambda x: isinstance(x, jax.Array))
  positions_BT = jnp.cumsum(prompt_mask_BT.astype(jnp.int32), axis=1) - 1
  hidden_BTD, cache = transformer.hidden_states(
      params, prompt_BT, cfg, mask_BT=prompt_mask_BT, positions_BT=positions_BT,
      cache=cache, sharder=sharder)
  # Left padding: the last column is every row's last prompt token.
  logits_BV = transformer.logits_from_hidden(params, hidden_BTD[:, -1], cfg)
  logits_BV = constrain(sharder, logits_BV, ("batch", "vocab"))
  first_B, first_logp_B = _pick(logits_BV, keys_B, jnp.zeros((), jnp.int32), sampling)
  done_B = jnp.isin(first_B, stop)
  if unroll:
    params = transformer.unstack_layers(params)
    cache = transformer.unstack_cache(cache, length=T + M)

  state = SamplingState(
      step=jnp.ones((), jnp.int32),
      done_B=done_B,
      tokens_BM=jnp.full((B, M), pad_id, jnp.int32).at[:, 0].set(first_B),
      logprobs_BM=jnp.zeros((B, M), jnp.float32).at[:, 0].set(first_logp_B),
      lengths_B=jnp.ones((B,), jnp.int32),
      positions_B=jnp.sum(prompt_mask_BT, axis=1).astype(jnp.int32),
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
  batch1 = sharder.sharding(("batch",))
  out = SampleOutput(tokens=batch2, logprobs=batch2, lengths=batch1)
  return jax.jit(traced, in_shardings=(transformer.param_shardings(cfg, sharder), batch2,
                                       batch2, batch2), out_shardings=out)


class Sampler:
  """Pads prompts to buckets and calls one compiled `sample` per bucket.

  Compiled functions are cached per (model config, sampling, lengths, stop
  ids, mesh), so a new Sampler for the same model does not recompile.
  """

  def __init__(self, cfg: ModelConfig, *, max_new_tokens: int, stop_ids: Sequence[int],
               pad_id: int, sharder: Sharder | None = None,
               length_buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS):
    self.cfg = cfg
    self.max_new_tokens = max_new_tokens
    self.stop_ids = tuple(int(i) for i in stop_ids)
    self.pad_id = int(pad_id)
    self.sharder = sharder
    self.length_buckets = tuple(length_buckets)

  def _key(self, sampling: SamplingParams):
    return (self.cfg, sampling, self.max_new_tokens, self.stop_ids, self.pad_id, self.sharder)

  def num_traces(self, sampling: SamplingParams = SamplingParams()) -> int:
    """How often `sample` was traced for this setting (tests prove no recompiles)."""
    return _TRACES[self._key(sampling)]

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
    T = min(bucket(longest, self.length_buckets), room)
    B = batch_bucket(n, self.batch_multiple())
    prompt, mask = left_pad(prompts, T, self.pad_id, num_rows=B)
    keys = jnp.asarray(keys)
    if keys.shape[0] != n:
      raise ValueError(f"got {keys.shape[0]} keys for {n} prompts")
    if B > n:
      keys = jnp.concatenate([keys, jnp.repeat(keys[:1], B - n, axis=0)])
    key_data = np.asarray(jax.random.key_data(keys))
    if self.sharder is not None:  # global arrays, so several hosts can share a batch
      batch2 = self.sharder.sharding(("batch", None))
      prompt, mask, key_data = (distributed.to_global(x, batch2)
                                for x in (prompt, mask, key_data))
    out = _compiled_sample(*self._key(sampling))(params, prompt, mask, key_data)
    return SampleOutput(tokens=distributed.to_host(out.tokens)[:n],
                        logprobs=distributed.to_host(out.logprobs)[:n],
                        lengths=distributed.to_host(out.lengths)[:n])
