"""Continuous batching: a fixed number of slots kept busy until every request is answered.

The static sampler (`sampler.py`) decodes a batch until its *last* sequence stops, so a
15-token refusal beside a 64-token answer holds its row idle for 49 steps. The engine
keeps `slots` rows of KV cache and refills a row as soon as its sequence ends, the way
MaxText's offline engine (`prefill`, `insert`, `generate` over a fixed decode state) and
JetStream's orchestrator do:

  1. prefill: the next waiting requests, left-padded to a length bucket (one compiled
     shape per bucket and batch bucket); identical prompts among them are prefilled once
     and their first tokens drawn per request (the K samples of one prompt share one
     prefill);
  2. insert: each prefilled row is written into a free slot of the decode state, a fixed
     [slots, S] cache in which every row has its own write position
     (`transformer.hidden_states` with a per-row `index`);
  3. generate: one compiled loop of up to `steps_per_call` decode steps over all slots,
     leaving early when a sequence ends while requests wait; the host then collects the
     finished sequences and frees their slots.

Same tokens, same keys: a request's token at decode step t is drawn with
`fold_in(key, t)`, its own key and its own step, as in the static sampler, so what it draws
does not depend on its slot or its neighbours (its logits can, at float rounding: the
padding of a different prefill batch). The schedule is a function of the requests alone
(first come, first served, lowest free slot first), so reruns are bit-identical.

Returned log-probs are the behaviour policy's, as the static sampler's: of the sampled
token under softmax(logits / temperature) before top-k/top-p filtering.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from cai_jax.model import transformer
from cai_jax.model.config import ModelConfig
from cai_jax.model.sharding import Sharder, constrain
from cai_jax.sampling.sampler import (DEFAULT_LENGTH_BUCKETS, SampleOutput, SamplingParams,
                                      _pick)
from cai_jax.text.padding import batch_bucket, bucket, left_pad


@flax.struct.dataclass
class DecodeState:
  """The slots: a KV cache of S slots per row (per layer, keys [B, K, H, S]) in which row b
  writes at `cache["index"][b]`, and each row's sequence so far."""
  cache: dict
  last_B: jax.Array  # [B] int32, the token fed at the next step
  positions_B: jax.Array  # [B] int32, its position
  step_B: jax.Array  # [B] int32, the decode step of the next token (0: the prefill's)
  keys_B: jax.Array  # [B, key data]
  done_B: jax.Array  # [B] bool: finished, or no request in the slot
  limit_B: jax.Array  # [B] int32, the request's max_new_tokens
  tokens_BM: jax.Array  # [B, M] int32
  logprobs_BM: jax.Array  # [B, M] float32
  lengths_B: jax.Array  # [B] int32, tokens emitted including the stop token


def _rows_sharded(tree, sharder: Sharder | None):
  """Every array of `tree` split over the mesh's batch axis by its first (row) axis: the
  slots are spread over the data-parallel devices as the static sampler's rows are."""
  if sharder is None:
    return tree
  return jax.tree.map(lambda x: sharder.constrain(x, ("batch",) + (None,) * (x.ndim - 1)),
                      tree)


def prefill(params, prompt_PT: jax.Array, mask_PT: jax.Array, source_R: jax.Array,
            keys_R: jax.Array, *, cfg: ModelConfig, sampling: SamplingParams,
            sharder: Sharder | None):
  """Prefill P left-padded prompts once; draw the first token of R requests, request r
  continuing prompt `source_R[r]` with its own key. Returns the prompts' stacked cache
  (T slots), each request's first token and log-prob, and each prompt's next position."""
  P, T = prompt_PT.shape
  cache = transformer.init_cache(cfg, P, T)
  positions_PT = jnp.cumsum(mask_PT.astype(jnp.int32), axis=1) - 1
  hidden_PTD, cache = transformer.hidden_states(params, prompt_PT, cfg, mask_BT=mask_PT,
                                                positions_BT=positions_PT, cache=cache,
                                                sharder=sharder)
  logits_PV = transformer.logits_from_hidden(params, hidden_PTD[:, -1], cfg)
  first_R, logp_R = _pick(logits_PV[source_R], keys_R,
                          jnp.zeros(source_R.shape, jnp.int32), sampling)
  return cache, first_R, logp_R, positions_PT[:, -1] + 1


def insert(state: DecodeState, prompt_cache: dict, next_pos_P: jax.Array, source_R: jax.Array,
           slot_R: jax.Array, first_R: jax.Array, logp_R: jax.Array, keys_R: jax.Array,
           limit_R: jax.Array, *, stop_ids: tuple[int, ...], pad_id: int,
           sharder: Sharder | None = None) -> DecodeState:
  """Write request r (prompt `source_R[r]` of the prefill) into slot `slot_R[r]`; a slot
  index of B or more (a padding request) writes nothing."""
  S = state.cache["pos"].shape[1]
  T = prompt_cache["pos"].shape[1]
  M = state.tokens_BM.shape[1]
  put = lambda x, v: x.at[slot_R].set(v, mode="drop")
  # The prompt cache is unstacked: keys [P, K, H, T], values [P, K, T, H].
  k = tuple(put(ck, jnp.pad(pk[source_R], ((0, 0), (0, 0), (0, 0), (0, S - T))))
            for ck, pk in zip(state.cache["k"], prompt_cache["k"]))
  v = tuple(put(cv, jnp.pad(pv[source_R], ((0, 0), (0, 0), (0, S - T), (0, 0))))
            for cv, pv in zip(state.cache["v"], prompt_cache["v"]))
  pos = put(state.cache["pos"], jnp.pad(prompt_cache["pos"][source_R], ((0, 0), (0, S - T)),
                                        constant_values=-1))
  index = put(state.cache["index"], jnp.full(slot_R.shape, T, jnp.int32))
  stop = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)
  done_R = jnp.isin(first_R, stop) | (limit_R <= 1)
  return _rows_sharded(DecodeState(
      cache={"k": k, "v": v, "pos": pos, "index": index},
      last_B=put(state.last_B, first_R),
      positions_B=put(state.positions_B, next_pos_P[source_R]),
      step_B=put(state.step_B, jnp.ones(slot_R.shape, jnp.int32)),
      keys_B=put(state.keys_B, keys_R),
      done_B=put(state.done_B, done_R),
      limit_B=put(state.limit_B, limit_R),
      tokens_BM=put(state.tokens_BM,
                    jnp.full((slot_R.shape[0], M), pad_id, jnp.int32).at[:, 0].set(first_R)),
      logprobs_BM=put(state.logprobs_BM,
                      jnp.zeros((slot_R.shape[0], M), jnp.float32).at[:, 0].set(logp_R)),
      lengths_B=put(state.lengths_B, jnp.ones(slot_R.shape, jnp.int32))), sharder)


def generate_steps(params, state: DecodeState, max_steps: jax.Array, leave_early: jax.Array,
                   *, cfg: ModelConfig, sampling: SamplingParams, stop_ids: tuple[int, ...],
                   pad_id: int, sharder: Sharder | None) -> DecodeState:
  """Up to `max_steps` decode steps over every slot (unrolled params and cache); with
  `leave_early`, stop after the step in which a sequence finished (its slot can refill)."""
  stop = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)

  def cond(c):
    s, n, finished = c
    return (n < max_steps) & ~jnp.all(s.done_B) & ~(leave_early & finished)

  def body(c):
    s, n, _ = c
    hidden, cache = transformer.hidden_states(params, s.last_B[:, None], cfg,
                                              positions_BT=s.positions_B[:, None],
                                              cache=s.cache, sharder=sharder)
    logits_BV = transformer.logits_from_hidden(params, hidden[:, 0], cfg)
    logits_BV = constrain(sharder, logits_BV, ("batch", "vocab"))
    tok_B, logp_B = _pick(logits_BV, jax.random.wrap_key_data(s.keys_B), s.step_B,
                          sampling)
    tok_B = jnp.where(s.done_B, pad_id, tok_B)
    logp_B = jnp.where(s.done_B, 0.0, logp_B)
    # A finished or empty row writes nothing (its column is out of range: dropped).
    rows_B = jnp.arange(s.done_B.shape[0])
    col_B = jnp.where(s.done_B, s.tokens_BM.shape[1], s.step_B)
    lengths_B = s.lengths_B + (~s.done_B).astype(jnp.int32)
    now_done_B = s.done_B | jnp.isin(tok_B, stop) | (lengths_B >= s.limit_B)
    return (DecodeState(
        cache=cache, last_B=tok_B, positions_B=s.positions_B + 1,
        step_B=s.step_B + (~s.done_B).astype(jnp.int32), keys_B=s.keys_B, done_B=now_done_B,
        limit_B=s.limit_B,
        tokens_BM=s.tokens_BM.at[rows_B, col_B].set(tok_B, mode="drop"),
        logprobs_BM=s.logprobs_BM.at[rows_B, col_B].set(logp_B, mode="drop"),
        lengths_B=lengths_B), n + 1, jnp.any(now_done_B & ~s.done_B))

  state, _, _ = jax.lax.while_loop(cond, body, (_rows_sharded(state, sharder),
                                                jnp.zeros((), jnp.int32), jnp.zeros((), bool)))
  return _rows_sharded(state, sharder)


_TRACES: collections.Counter = collections.Counter()


@functools.lru_cache(maxsize=32)
def _compiled(cfg: ModelConfig, sampling: SamplingParams, stop_ids: tuple[int, ...],
              pad_id: int, sharder: Sharder | None):
  """The engine's jitted functions for one setting, shared by every Engine."""
  key = (cfg, sampling, stop_ids, pad_id, sharder)

  def counted(name, fn):
    def traced(*args, **kw):
      _TRACES[key + (name,)] += 1
      return fn(*args, **kw)
    return traced

  def pre(params, prompt, mask, source, key_data):
    return prefill(params, prompt, mask, source, jax.random.wrap_key_data(key_data), cfg=cfg,
                   sampling=sampling, sharder=sharder)

  def ins(state, prompt_cache, next_pos, source, slot, first, logp, key_data, limit):
    return insert(state, transformer.unstack_cache(prompt_cache), next_pos, source, slot,
                  first, logp, key_data, limit, stop_ids=stop_ids, pad_id=pad_id,
                  sharder=sharder)

  gen = functools.partial(generate_steps, cfg=cfg, sampling=sampling, stop_ids=stop_ids,
                          pad_id=pad_id, sharder=sharder)
  return {"prefill": jax.jit(counted("prefill", pre)),
          "insert": jax.jit(counted("insert", ins), donate_argnums=0),
          "generate": jax.jit(counted("generate", gen), donate_argnums=1),
          "unstack": jax.jit(transformer.unstack_layers)}


@dataclasses.dataclass
class EngineStats:
  """What one `generate` call did: decode steps run, slot-steps that carried a live
  sequence, device calls (the idle share is 1 - busy / (steps * slots)), and the seconds the
  host waited for the device (the rest of a call's wall time is host scheduling: the
  share the host loop costs)."""
  decode_steps: int = 0
  busy_slot_steps: int = 0
  prefills: int = 0
  prefill_rows: int = 0  # distinct prompts prefilled (the K samples of one prompt: one)
  generate_calls: int = 0
  wait_seconds: float = 0.0


class Engine:
  """Continuous batching over `slots` rows: `generate(params, prompts, keys)` answers any
  number of token-id prompts and returns what `Sampler.generate` returns, in their order.

  The decode state holds `bucket(longest prompt) + max_new_tokens` cache slots per row; a
  new workload whose longest prompt falls in the same length bucket reuses every compiled
  function.
  """

  def __init__(self, cfg: ModelConfig, *, slots: int, max_new_tokens: int,
               stop_ids: Sequence[int], pad_id: int, sharder: Sharder | None = None,
               length_buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS,
               steps_per_call: int = 16):
    if slots < 1 or steps_per_call < 1:
      raise ValueError(f"slots ({slots}) and steps_per_call ({steps_per_call}) must be >= 1")
    self.multiple = 1 if sharder is None else sharder.batch_shards
    if slots % self.multiple:
      raise ValueError(f"engine_slots={slots} must be a multiple of the mesh's"
                       f" {self.multiple} batch shards (its data-parallel devices)")
    self.cfg = cfg
    self.slots = slots
    self.max_new_tokens = max_new_tokens
    self.stop_ids = tuple(int(i) for i in stop_ids)
    self.pad_id = int(pad_id)
    self.sharder = sharder
    self.length_buckets = tuple(length_buckets)
    self.steps_per_call = steps_per_call
    self.stats = EngineStats()

  def num_traces(self, sampling: SamplingParams = SamplingParams()) -> dict[str, int]:
    """Traces of each compiled function for this setting (tests prove no recompiles)."""
    key = (self.cfg, sampling, self.stop_ids, self.pad_id, self.sharder)
    return {n: _TRACES[key + (n,)] for n in ("prefill", "insert", "generate")}

  def _empty_state(self, S: int) -> DecodeState:
    cfg, B, M = self.cfg, self.slots, self.max_new_tokens
    K, H, dt = cfg.num_kv_heads, cfg.head_dim, cfg.compute_dtype
    key_shape = jax.random.key_data(jax.random.key(0)).shape
    return self._place(DecodeState(
        cache={"k": tuple(jnp.zeros((B, K, H, S), dt) for _ in range(cfg.num_layers)),
               "v": tuple(jnp.zeros((B, K, S, H), dt) for _ in range(cfg.num_layers)),
               "pos": jnp.full((B, S), -1, jnp.int32), "index": jnp.zeros((B,), jnp.int32)},
        last_B=jnp.full((B,), self.pad_id, jnp.int32), positions_B=jnp.zeros((B,), jnp.int32),
        step_B=jnp.zeros((B,), jnp.int32),
        keys_B=jnp.zeros((B, *key_shape), jnp.uint32), done_B=jnp.ones((B,), bool),
        limit_B=jnp.zeros((B,), jnp.int32),
        tokens_BM=jnp.full((B, M), self.pad_id, jnp.int32),
        logprobs_BM=jnp.zeros((B, M), jnp.float32), lengths_B=jnp.zeros((B,), jnp.int32)))

  def _place(self, tree):
    """Arrays with rows split over the batch axis (as committed inputs of the jits)."""
    if self.sharder is None:
      return tree
    return jax.tree.map(lambda x: jax.device_put(x, self.sharder.sharding(
        ("batch",) + (None,) * (x.ndim - 1), x.shape)), tree)

  def generate(self, params, prompts: Sequence[Sequence[int]], keys: jax.Array,
               sampling: SamplingParams = SamplingParams(),
               max_new_tokens: Sequence[int] | None = None) -> SampleOutput:
    """Sample continuations of token-id prompts, one key each; `max_new_tokens` per
    request (default: the engine's). Host numpy arrays [n, max_new_tokens], request order."""
    n = len(prompts)
    if not n:
      raise ValueError("generate() needs at least one prompt")
    if any(len(p) == 0 for p in prompts):
      raise ValueError("empty prompt: every prompt needs at least one token")
    M = self.max_new_tokens
    limits = [M] * n if max_new_tokens is None else [int(m) for m in max_new_tokens]
    if len(limits) != n or not all(1 <= m <= M for m in limits):
      raise ValueError(f"max_new_tokens needs {n} values in [1, {M}]")
    key_data = np.asarray(jax.random.key_data(jnp.asarray(keys)))
    if key_data.shape[0] != n:
      raise ValueError(f"got {key_data.shape[0]} keys for {n} prompts")
    longest = max(len(p) for p in prompts)
    T = bucket(longest, self.length_buckets)
    if T + M > self.cfg.max_seq_len:
      raise ValueError(f"a prompt of {longest} tokens (bucket {T}) + max_new_tokens {M}"
                       f" exceeds the model's max_seq_len {self.cfg.max_seq_len}")
    fns = _compiled(self.cfg, sampling, self.stop_ids, self.pad_id, self.sharder)
    unrolled = fns["unstack"](params)
    state = self._empty_state(T + M)
    out_tokens = np.full((n, M), self.pad_id, np.int32)
    out_logprobs = np.zeros((n, M), np.float32)
    out_lengths = np.zeros((n,), np.int32)
    queue = collections.deque(range(n))
    request_in = [-1] * self.slots  # the request each slot holds (-1: free)
    self.stats = stats = EngineStats()
    while queue or any(r >= 0 for r in request_in):
      free = [s for s in range(self.slots) if request_in[s] < 0]
      if queue and free:
        take = [queue.popleft() for _ in range(min(len(free), len(queue)))]
        state = self._fill(fns, params, state, prompts, take, free, key_data, limits)
        for r, s in zip(take, free):
          request_in[s] = r
        stats.prefills += 1
      t = time.perf_counter()
      before = np.asarray(state.step_B)  # waits for the prefill and insert
      state = fns["generate"](unrolled, state, jnp.int32(self.steps_per_call),
                              jnp.asarray(bool(queue)))
      stats.generate_calls += 1
      done = np.asarray(state.done_B)
      stats.wait_seconds += time.perf_counter() - t
      lengths = np.asarray(state.lengths_B)
      steps = np.asarray(state.step_B) - before
      stats.decode_steps += int(steps.max(initial=0))
      stats.busy_slot_steps += int(steps.sum())
      finished = [s for s in range(self.slots) if request_in[s] >= 0 and done[s]]
      if finished:
        tokens, logprobs = np.asarray(state.tokens_BM), np.asarray(state.logprobs_BM)
        for s in finished:
          r = request_in[s]
          out_tokens[r], out_logprobs[r], out_lengths[r] = tokens[s], logprobs[s], lengths[s]
          request_in[s] = -1
    return SampleOutput(tokens=out_tokens, logprobs=out_logprobs, lengths=out_lengths)

  def _fill(self, fns, params, state, prompts, take, free, key_data, limits):
    """Prefill the requests `take` (each distinct prompt once) into the slots `free`."""
    unique: dict[tuple[int, ...], int] = {}
    source = [unique.setdefault(tuple(prompts[r]), len(unique)) for r in take]
    rows = list(unique)
    self.stats.prefill_rows += len(rows)
    P = batch_bucket(len(rows), self.multiple)
    R = batch_bucket(len(take), self.multiple)
    T = bucket(max(len(p) for p in rows), self.length_buckets)
    prompt, mask = left_pad(rows, T, self.pad_id, num_rows=P)
    pad = R - len(take)
    src = np.asarray(source + [0] * pad, np.int32)
    kd = np.concatenate([key_data[take], np.repeat(key_data[take[:1]], pad, axis=0)])
    slot = np.asarray(free[:len(take)] + [self.slots] * pad, np.int32)  # B: dropped
    limit = np.asarray([limits[r] for r in take] + [1] * pad, np.int32)
    prompt, mask, src, kd, slot, limit = self._place((prompt, mask, src, kd, slot, limit))
    cache, first, logp, next_pos = fns["prefill"](params, prompt, mask, src, kd)
    return fns["insert"](state, cache, next_pos, src, slot, first, logp, kd, limit)
