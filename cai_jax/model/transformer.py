"""A decoder-only transformer as pure functions over an explicit params pytree.

Shape vocabulary (used in einsum strings and long-lived names):
  B batch          T query length      S key length (cache slots)
  L layers         D model width       F MLP hidden width      V vocabulary
  N query heads    K key/value heads   G = N // K query heads per KV head
  H head dim
Outside the model the same letters keep their meaning, plus:
  E examples (rows of a data set)      M response tokens (sampled positions)
  P prompt tokens (left-padded)        2 the two responses of a comparison
  Q prompts of an RL rollout           C responses (candidates) a prompt (RLOO, GRPO)

Families: Llama (Llama 2/3, SmolLM2; RoPE with Llama-3 scaling), Mistral
(sliding window), Qwen2 (q/k/v biases) and Gemma 3 (1+w norms, QK-norm,
sandwich norms, scaled embeddings, local/global layers with their own RoPE
bases). Layers are stacked on a leading L axis and run under `lax.scan`, so a
30-layer model compiles as fast as a 1-layer one. `unstack_layers` and
`unstack_cache` turn the stacked layers (and cache) into tuples of per-layer
arrays, which run as an unrolled Python loop instead: XLA:CPU copies every
weight and cache slice a scan step reads, which dominates a decode step there
(see `sampling/sampler.py`).

The KV cache is an explicit pytree, passed in and returned:
  k, v   [L, B, K, S, H]   keys and values per slot; unstacked: L arrays of
                           keys [B, K, H, S] and values [B, K, S, H]
  pos    [B, S] int32      the token position stored in each slot, -1 if empty
  index  [] int32          the next slot to write
Rows may be left-padded: a padded token gets slot position -1 and is never
attended to, so each row sees exactly its own tokens at its own positions.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cai_jax.model.config import ModelConfig
from cai_jax.model.sharding import Sharder, constrain

Params = dict[str, Any]
Cache = dict[str, jax.Array]

_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


# --- Parameters ----------------------------------------------------------------


def param_shapes(cfg: ModelConfig) -> Params:
  """Shapes and logical axes of every parameter: {path: (shape, axes)}."""
  L, D, N, K, H, F, V = (cfg.num_layers, cfg.dim, cfg.num_heads,
                         cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim,
                         cfg.vocab_size)
  attn = {
      "q": ((L, D, N, H), ("layers", "embed", "heads", "head_dim")),
      "k": ((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim")),
      "v": ((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim")),
      "o": ((L, N, H, D), ("layers", "heads", "head_dim", "embed")),
  }
  if cfg.qkv_bias:
    attn["q_bias"] = ((L, N, H), ("layers", "heads", "head_dim"))
    attn["k_bias"] = ((L, K, H), ("layers", "kv_heads", "head_dim"))
    attn["v_bias"] = ((L, K, H), ("layers", "kv_heads", "head_dim"))
  if cfg.qk_norm:
    attn["q_norm"] = ((L, H), ("layers", "head_dim"))
    attn["k_norm"] = ((L, H), ("layers", "head_dim"))
  layers = {
      "attn_norm": ((L, D), ("layers", "embed")),
      "attn": attn,
      "mlp_norm": ((L, D), ("layers", "embed")),
      "mlp": {
          "gate": ((L, D, F), ("layers", "embed", "mlp")),
          "up": ((L, D, F), ("layers", "embed", "mlp")),
          "down": ((L, F, D), ("layers", "mlp", "embed")),
      },
  }
  if cfg.post_norms:
    layers["post_attn_norm"] = ((L, D), ("layers", "embed"))
    layers["post_mlp_norm"] = ((L, D), ("layers", "embed"))
  tree = {
      "embed": ((V, D), ("vocab", "embed")),
      "layers": layers,
      "final_norm": ((D,), ("embed",)),
  }
  if not cfg.tie_embeddings:
    tree["unembed"] = ((D, V), ("embed", "vocab"))
  return tree


def _is_spec(x) -> bool:
  return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple) and (
      all(isinstance(a, int) for a in x[0]))


def abstract_params(cfg: ModelConfig) -> Params:
  """`jax.ShapeDtypeStruct`s of every parameter (no memory)."""
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s[0], cfg.weight_dtype),
                      param_shapes(cfg), is_leaf=_is_spec)


def param_shardings(cfg: ModelConfig, sharder: Sharder) -> Params:
  return jax.tree.map(lambda s: sharder.sharding(s[1], s[0]), param_shapes(cfg),
                      is_leaf=_is_spec)


def init_params(cfg: ModelConfig, key: jax.Array) -> Params:
  """Random parameters (normal(0.02) matrices, identity norms, zero biases)."""
  specs, treedef = jax.tree.flatten(param_shapes(cfg), is_leaf=_is_spec)
  paths = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(param_shapes(cfg), is_leaf=_is_spec)[0]]
  keys = jax.random.split(key, len(specs))
  leaves = []
  for (shape, _), path, k in zip(specs, paths, keys):
    if "norm" in path:
      value = jnp.zeros(shape) if cfg.norm_plus_one else jnp.ones(shape)
    else:
      value = 0.02 * jax.random.normal(k, shape)
    leaves.append(value.astype(cfg.weight_dtype))
  return jax.tree.unflatten(treedef, leaves)


def init_params_sharded(cfg: ModelConfig, key: jax.Array, sharder: Sharder) -> Params:
  """Random parameters created directly in their shardings (no host copy)."""
  init = jax.jit(init_params, static_argnums=0,
                 out_shardings=param_shardings(cfg, sharder))
  return init(cfg, key)


# --- Building blocks -------------------------------------------------------------


def rms_norm(x: jax.Array, scale: jax.Array, cfg: ModelConfig) -> jax.Array:
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.norm_eps)
  w = scale.astype(jnp.float32)
  if cfg.norm_plus_one:
    w = 1.0 + w
  return (normed * w).astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig, theta: float) -> np.ndarray:
  """Inverse frequencies [H/2], in float32 as Hugging Face computes them."""
  h = cfg.head_dim
  exponent = np.arange(0, h, 2, dtype=np.int64).astype(np.float32) / np.float32(h)
  inv_freq = (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)
  s = cfg.rope_scaling
  if s is None:
    return inv_freq
  # Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth
  # interpolation between.
  old_ctx = s.original_max_position_embeddings
  low_wavelen = old_ctx / s.low_freq_factor
  high_wavelen = old_ctx / s.high_freq_factor
  wavelen = 2 * np.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
  smooth = (old_ctx / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
  smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_sin_cos(positions_BT: jax.Array, inv_freq: np.ndarray):
  freqs_BTh = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  emb_BTH = jnp.concatenate([freqs_BTh, freqs_BTh], axis=-1)
  return jnp.sin(emb_BTH), jnp.cos(emb_BTH)


def apply_rope(x_BTNH: jax.Array, sin_BTH: jax.Array, cos_BTH: jax.Array) -> jax.Array:
  """Rotate-half RoPE (the Hugging Face layout: halves, not interleaved pairs)."""
  x = x_BTNH.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  out = x * cos_BTH[:, :, None, :] + rotated * sin_BTH[:, :, None, :]
  return out.astype(x_BTNH.dtype)


def _activation(cfg: ModelConfig, x: jax.Array) -> jax.Array:
  if cfg.activation == "silu":
    return jax.nn.silu(x)
  return jax.nn.gelu(x, approximate=True)


def attention_mask(q_slot_T, q_pos_BT, k_pos_BS, window: int | None) -> jax.Array:
  """[B, T, S] bool: key is a real token, not in the future, inside the window.
  `q_slot_T`: the queries' cache slots, [T], or [B, T] when each row writes its own."""
  S = k_pos_BS.shape[1]
  k_slot_S = jnp.arange(S, dtype=jnp.int32)
  q_slot_BT = q_slot_T if q_slot_T.ndim == 2 else q_slot_T[None, :]
  mask = (k_pos_BS[:, None, :] >= 0) & (k_slot_S[None, None, :] <= q_slot_BT[:, :, None])
  if window is not None:
    mask &= (q_pos_BT[:, :, None] - k_pos_BS[:, None, :]) < window
  return mask


def _attention(lp, x_BTD, sin_cos, mask_BTS, layer_kv, index, cfg, sharder, keys_HS=False):
  """(output, this call's keys and values [B, K, T, H], the layer's updated cache).

  `layer_kv`: this layer's cache (keys, values) [B, K, S, H], or None (the T
  tokens attend to each other only; the updated cache is then None).
  keys_HS: the cached keys are [B, K, H, S] (see `_attend`); ignored without a cache.
  """
  dt = cfg.compute_dtype
  w = lambda name: lp["attn"][name].astype(dt)
  q_BTNH = jnp.einsum("BTD,DNH->BTNH", x_BTD, w("q"))
  k_BTKH = jnp.einsum("BTD,DKH->BTKH", x_BTD, w("k"))
  v_BTKH = jnp.einsum("BTD,DKH->BTKH", x_BTD, w("v"))
  if cfg.qkv_bias:
    q_BTNH += w("q_bias")
    k_BTKH += w("k_bias")
    v_BTKH += w("v_bias")
  if cfg.qk_norm:
    q_BTNH = rms_norm(q_BTNH, lp["attn"]["q_norm"], cfg)
    k_BTKH = rms_norm(k_BTKH, lp["attn"]["k_norm"], cfg)
  sin_BTH, cos_BTH = sin_cos
  q_BTNH = apply_rope(q_BTNH, sin_BTH, cos_BTH)
  k_BTKH = apply_rope(k_BTKH, sin_BTH, cos_BTH)
  q_BTNH = constrain(sharder, q_BTNH, ("batch", "seq", "heads", "head_dim"))

  # Keys and values are [B, K, S, H], the cache's own layout: the attention
  # dots' batch dims (B, K) lead.
  k_BKTH, v_BKTH = jnp.swapaxes(k_BTKH, 1, 2), jnp.swapaxes(v_BTKH, 1, 2)
  B, T, N, H = q_BTNH.shape
  K = cfg.num_kv_heads
  q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
  updated_kv = None
  if layer_kv is None:
    k_BKSH, v_BKSH = k_BKTH, v_BKTH
    keys_HS = False  # the layout of a cache; without one the keys are this call's
  else:
    cache_k, cache_v = layer_kv
    if keys_HS:
      new_k, k_start = jnp.swapaxes(k_BKTH, 2, 3), (0, 0, 0, index)
    else:
      new_k, k_start = k_BKTH, (0, 0, index, 0)
    if jnp.ndim(index):  # a write slot per row (the engine's slots)
      updated_kv = (write_rows(cache_k, new_k.astype(cache_k.dtype), index, 3 if keys_HS else 2),
                    write_rows(cache_v, v_BKTH.astype(cache_v.dtype), index, 2))
    else:
      updated_kv = (
          jax.lax.dynamic_update_slice(cache_k, new_k.astype(cache_k.dtype), k_start),
          jax.lax.dynamic_update_slice(cache_v, v_BKTH.astype(cache_v.dtype), (0, 0, index, 0)))
    k_BKSH, v_BKSH = (c.astype(dt) for c in updated_kv)  # keys: [B, K, H, S] if keys_HS
  C = cfg.attention_chunk
  if cfg.attention_impl == "splash" and layer_kv is None:
    segments_BT, is_local = mask_BTS  # hidden_states passes these instead of a mask
    out_BTNH = _attend_splash(q_BTNH, k_BKTH, v_BKTH, segments_BT, is_local, cfg, sharder)
  elif cfg.attention_impl == "cudnn" and layer_kv is None:
    out_BTNH = _attend_cudnn(q_BTNH, k_BTKH, v_BTKH, mask_BTS, cfg)
  elif C and T > C:
    # Query chunks under remat: the backward pass recomputes each chunk's
    # probabilities instead of keeping all of them. A length that C does not
    # divide gets fully masked query rows at the end (dropped again).
    pad = -T % C
    if pad:
      q_BTKGH = jnp.pad(q_BTKGH, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
      mask_BTS = jnp.pad(mask_BTS, ((0, 0), (0, pad), (0, 0)))
    n = (T + pad) // C
    chunk_fn = jax.checkpoint(lambda q, m: _attend(q, k_BKSH, v_BKSH, m, cfg, keys_HS))
    q_nBCKGH = jnp.moveaxis(q_BTKGH.reshape(B, n, C, K, N // K, H), 1, 0)
    mask_nBCS = jnp.moveaxis(mask_BTS.reshape(B, n, C, -1), 1, 0)
    out_nBCNH = jax.lax.map(lambda qm: chunk_fn(*qm), (q_nBCKGH, mask_nBCS))
    out_BTNH = jnp.moveaxis(out_nBCNH, 0, 1).reshape(B, n * C, N, H)[:, :T]
  else:
    out_BTNH = _attend(q_BTKGH, k_BKSH, v_BKSH, mask_BTS, cfg, keys_HS)
  # One [B, T, N*H] x [N*H, D] matmul: as a two-axis contraction XLA:CPU
  # transposed the weight on every call to match the activations' layout.
  out_BTD = jnp.einsum("BTE,ED->BTD", out_BTNH.reshape(B, T, N * H),
                       w("o").reshape(N * H, -1))
  return out_BTD, (k_BKTH, v_BKTH), updated_kv


def _attend_cudnn(q_BTNH, k_BSKH, v_BSKH, mask_BTS, cfg: ModelConfig) -> jax.Array:
  """cuDNN flash attention; the mask becomes an additive [B, 1, T, S] bias, GQA is native."""
  T, S = q_BTNH.shape[1], k_BSKH.shape[1]
  # cuDNN's training kernels with a bias need even lengths: pad with a masked
  # query row / key column and drop the row again.
  pad_t, pad_s = T % 2, S % 2
  if pad_t or pad_s:
    q_BTNH = jnp.pad(q_BTNH, ((0, 0), (0, pad_t), (0, 0), (0, 0)))
    k_BSKH = jnp.pad(k_BSKH, ((0, 0), (0, pad_s), (0, 0), (0, 0)))
    v_BSKH = jnp.pad(v_BSKH, ((0, 0), (0, pad_s), (0, 0), (0, 0)))
    mask_BTS = jnp.pad(mask_BTS, ((0, 0), (0, pad_t), (0, pad_s)))
  out_BTNH = jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_BTS[:, None],
                                          scale=cfg.scale, implementation="cudnn")
  return out_BTNH[:, :T]


SPLASH_BLOCKS = (512, 256, 128)  # the largest that divides the padded length is used


def _splash_kernel(T: int, N: int, window: int | None, cfg: ModelConfig):
  """JAX's Pallas splash attention for one [N, T, H] x [K, T, H] sequence, causal or
  causal within `window` (a query sees keys q - window < k <= q); interpret mode off
  a TPU."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (
      splash_attention_kernel as splash, splash_attention_mask as masks)
  head_mask = (masks.CausalMask((T, T)) if window is None else
               masks.LocalMask((T, T), window_size=(window - 1, 0), offset=0))
  b = next(b for b in SPLASH_BLOCKS if T % b == 0)
  blocks = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                             block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b,
                             block_kv_dq=b)
  return splash.make_splash_mha(masks.MultiHeadMask([head_mask] * N), block_sizes=blocks,
                                head_shards=1, q_seq_shards=1,
                                attn_logits_soft_cap=cfg.attn_logit_softcap,
                                interpret=jax.default_backend() != "tpu")


def _attend_splash(q_BTNH, k_BKTH, v_BKTH, segments_BT, is_local, cfg: ModelConfig,
                   sharder: Sharder | None) -> jax.Array:
  """Splash attention [B, T, N, H]: no [B, N, T, T] scores in either pass.

  Padding is a segment id (real tokens 1, padding 0), so a real query sees real
  keys only; the causal and sliding-window masks are on slots, which equal the
  RoPE positions' differences for left- or right-padded rows (every batch the
  stages build). T is padded to a multiple of 128 with its own segment (dropped
  again). The kernel runs per sequence (vmap over B) and, on a mesh, per shard of
  the batch and heads (shard_map: a Pallas call cannot be auto-partitioned).
  `is_local` may be traced (the layer scan): then both masks are built and
  `lax.cond` picks one.
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  B, T, N, H = q_BTNH.shape
  pad = -T % SPLASH_BLOCKS[-1]
  q_BNTH = jnp.swapaxes(q_BTNH * jnp.asarray(cfg.scale, q_BTNH.dtype), 1, 2)
  k_BKTH, v_BKTH = (jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) for x in (k_BKTH, v_BKTH))
  q_BNTH = jnp.pad(q_BNTH, ((0, 0), (0, 0), (0, pad), (0, 0)))
  seg_BT = jnp.pad(segments_BT.astype(jnp.int32), ((0, 0), (0, pad)), constant_values=2)
  shards = 1 if sharder is None else sharder.mesh.size
  heads_spec = None
  if shards > 1:
    q_heads = sharder.spec(("batch", "heads", None, None), q_BNTH.shape)
    kv_heads = sharder.spec(("batch", "kv_heads", None, None), k_BKTH.shape)
    batch, heads_spec = q_heads[0], q_heads[1] if q_heads[1] == kv_heads[1] else None
  n_local = N // (1 if heads_spec is None else math.prod(
      sharder.mesh.shape[a] for a in ((heads_spec,) if isinstance(heads_spec, str)
                                      else heads_spec)))

  def attend(q, k, v, seg, local):
    def run(window):
      kernel = _splash_kernel(T + pad, n_local, window, cfg)
      return jax.vmap(kernel)(q, k, v, splash.SegmentIds(seg, seg))
    if isinstance(local, bool):
      return run(cfg.sliding_window if local else None)
    return jax.lax.cond(local, lambda: run(cfg.sliding_window), lambda: run(None))

  if shards > 1:
    from jax.sharding import PartitionSpec as P
    qkv = P(batch, heads_spec, None, None)
    attend = jax.shard_map(attend, mesh=sharder.mesh, check_vma=False,
                           in_specs=(qkv, qkv, qkv, P(batch, None), P()), out_specs=qkv)
  out_BNTH = attend(q_BNTH, k_BKTH, v_BKTH, seg_BT, is_local)
  return jnp.swapaxes(out_BNTH[:, :, :T], 1, 2).astype(q_BTNH.dtype)


def _masked_softmax(scores: jax.Array, mask: jax.Array, cfg: ModelConfig) -> jax.Array:
  """fp32 softmax over the last axis of q.k scores: scale, soft-cap, mask."""
  logits = scores.astype(jnp.float32) * cfg.scale
  if cfg.attn_logit_softcap:
    cap = cfg.attn_logit_softcap
    logits = jnp.tanh(logits / cap) * cap
  return jax.nn.softmax(jnp.where(mask, logits, _MASK_VALUE), axis=-1)


def _attend(q_BTKGH, k_BKSH, v_BKSH, mask_BTS, cfg: ModelConfig,
            keys_HS: bool = False) -> jax.Array:
  """softmax(q.k * scale, masked) . v [B, T, N, H], with fp32 logits and softmax.

  The G query heads of a KV head and the T queries form one M = G*T axis, so
  both dots are plain matmuls batched over (B, K): with G and T apart,
  XLA:CPU fell back to a slow generic dot for the scores. keys_HS: keys are
  [B, K, H, S], which makes q.k a non-transposed matmul (faster on XLA:CPU).
  """
  B, T, K, G, H = q_BTKGH.shape
  S = v_BKSH.shape[2]
  q_BKMH = jnp.einsum("BTKGH->BKGTH", q_BTKGH).reshape(B, K, G * T, H)
  scores_BKMS = jnp.einsum("BKMH,BKHS->BKMS" if keys_HS else "BKMH,BKSH->BKMS", q_BKMH,
                           k_BKSH, preferred_element_type=jnp.float32)
  probs_BKGTS = _masked_softmax(scores_BKMS.reshape(B, K, G, T, S), mask_BTS[:, None, None], cfg)
  out_BKMH = jnp.einsum("BKMS,BKSH->BKMH", probs_BKGTS.reshape(B, K, G * T, S).astype(q_BTKGH.dtype),
                        v_BKSH)
  return jnp.einsum("BKGTH->BTKGH", out_BKMH.reshape(B, K, G, T, H)).reshape(B, T, K * G, H)


def _mlp(lp, x_BTD, cfg, sharder):
  dt = cfg.compute_dtype
  gate_BTF = jnp.einsum("BTD,DF->BTF", x_BTD, lp["mlp"]["gate"].astype(dt))
  up_BTF = jnp.einsum("BTD,DF->BTF", x_BTD, lp["mlp"]["up"].astype(dt))
  h_BTF = constrain(sharder, _activation(cfg, gate_BTF) * up_BTF, ("batch", "seq", "mlp"))
  return jnp.einsum("BTF,FD->BTD", h_BTF, lp["mlp"]["down"].astype(dt))


# --- The model -------------------------------------------------------------------


def write_rows(cache_x: jax.Array, new_x: jax.Array, index_B: jax.Array, axis: int,
               batch_axis: int = 0) -> jax.Array:
  """`cache_x` with row b's `new_x` written at slot `index_B[b]` of `axis` (an axis of the
  full array): each row its own write position, as the engine's slots have."""
  inner = axis - (axis > batch_axis)
  return jax.vmap(lambda c, n, i: jax.lax.dynamic_update_slice_in_dim(c, n, i, inner),
                  in_axes=(batch_axis, batch_axis, 0), out_axes=batch_axis)(
                      cache_x, new_x, index_B)


def unstack_layers(params: Params) -> Params:
  """`params` with "layers" as a tuple of per-layer trees (runs unrolled)."""
  layers = params["layers"]
  num = jax.tree.leaves(layers)[0].shape[0]
  return dict(params, layers=tuple(jax.tree.map(lambda x, i=i: x[i], layers)
                                   for i in range(num)))


def unstack_cache(cache: Cache, length: int | None = None) -> Cache:
  """`cache` with k and v as tuples of per-layer arrays, keys as [B, K, H, S].

  length: grow the cache to this many slots (new slots empty).
  """
  S = cache["pos"].shape[1]
  extra = (length or S) - S
  if extra < 0:
    raise ValueError(f"cannot shrink a cache of {S} slots to {length}")

  def grow(x_BKSH):
    if not extra:
      return x_BKSH
    B, K, _, H = x_BKSH.shape
    return jnp.concatenate([x_BKSH, jnp.zeros((B, K, extra, H), x_BKSH.dtype)], axis=2)

  pos = jnp.pad(cache["pos"], ((0, 0), (0, extra)), constant_values=-1)
  return dict(cache, k=tuple(jnp.swapaxes(grow(x), 2, 3) for x in cache["k"]),
              v=tuple(grow(x) for x in cache["v"]), pos=pos)


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> Cache:
  """An empty KV cache of `length` slots."""
  shape = (cfg.num_layers, batch, cfg.num_kv_heads, length, cfg.head_dim)
  dtype = dtype or cfg.compute_dtype
  return {
      "k": jnp.zeros(shape, dtype),
      "v": jnp.zeros(shape, dtype),
      "pos": jnp.full((batch, length), -1, jnp.int32),
      "index": jnp.zeros((), jnp.int32),
  }


def cache_axes() -> dict[str, tuple]:
  kv = ("layers", "batch", "kv_heads", "kv_seq", "head_dim")
  return {"k": kv, "v": kv, "pos": ("batch", "kv_seq"), "index": ()}


def hidden_states(params: Params, tokens_BT: jax.Array, cfg: ModelConfig, *,
                  mask_BT: jax.Array | None = None,
                  positions_BT: jax.Array | None = None,
                  cache: Cache | None = None,
                  sharder: Sharder | None = None,
                  segment_ids_BT: jax.Array | None = None) -> tuple[jax.Array, Cache | None]:
  """Final-normed hidden states [B, T, D] and the updated cache.

  Args:
    tokens_BT: token ids.
    mask_BT: True for real tokens, False for padding (default: all real).
    positions_BT: RoPE positions (default: count of real tokens before each).
    cache: a KV cache; the T tokens are written at slots [index, index + T)
      and attend to every earlier filled slot. Without a cache, the T tokens
      attend causally to each other.
    segment_ids_BT: packed rows (no cache): a token attends only to earlier tokens of
      its own segment (ids > 0; pass `positions_BT` restarting in each segment).
  """
  B, T = tokens_BT.shape
  dt = cfg.compute_dtype
  if mask_BT is None:
    mask_BT = jnp.ones((B, T), bool)
  if positions_BT is None:
    positions_BT = jnp.cumsum(mask_BT.astype(jnp.int32), axis=1) - 1
  positions_BT = positions_BT.astype(jnp.int32)
  new_pos_BT = jnp.where(mask_BT, positions_BT, -1)

  if cache is None:
    index = jnp.zeros((), jnp.int32)
    k_pos_BS = new_pos_BT
  elif cache["index"].ndim:  # [B]: each row writes at its own slot (the engine's slots)
    index = cache["index"]
    k_pos_BS = write_rows(cache["pos"], new_pos_BT, index, 1)
  else:
    index = cache["index"]
    k_pos_BS = jax.lax.dynamic_update_slice(cache["pos"], new_pos_BT, (0, index))
  q_slot_T = (index[:, None] if jnp.ndim(index) else index) + jnp.arange(T, dtype=jnp.int32)

  if segment_ids_BT is not None and cache is not None:
    raise ValueError("segment_ids_BT packs rows for training; a KV cache decodes one"
                     " sequence per row")
  if cfg.attention_impl == "splash" and cache is None:
    # The kernel builds its masks from the slots; it gets padding (or the packed
    # segments) as segment ids and whether the layer is local (see _attend_splash).
    seg = mask_BT if segment_ids_BT is None else jnp.where(mask_BT, segment_ids_BT, 0)
    global_mask, local_mask = (seg, False), (seg, True)
  else:
    global_mask = attention_mask(q_slot_T, positions_BT, k_pos_BS, None)
    local_mask = attention_mask(q_slot_T, positions_BT, k_pos_BS, cfg.sliding_window)
    if segment_ids_BT is not None:
      same_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
      global_mask, local_mask = global_mask & same_BTS, local_mask & same_BTS
  global_rope = rope_sin_cos(positions_BT, rope_inv_freq(cfg, cfg.rope_theta))
  local_rope = rope_sin_cos(
      positions_BT, rope_inv_freq(cfg.replace(rope_scaling=None),
                                  cfg.local_rope_theta or cfg.rope_theta))
  is_local_L = [t == "local" for t in cfg.resolved_layer_types]

  x_BTD = params["embed"].astype(dt)[tokens_BT]
  if cfg.scale_embeddings:
    x_BTD = x_BTD * jnp.asarray(cfg.dim**0.5, dtype=dt)
  x_BTD = constrain(sharder, x_BTD, ("batch", "seq", "act_embed"))

  def layer_fn(x, lp, layer_kv, mask, sin_cos, keys_HS=False):
    h = rms_norm(x, lp["attn_norm"], cfg)
    h, new_kv, updated_kv = _attention(lp, h, sin_cos, mask, layer_kv, index, cfg, sharder,
                                       keys_HS)
    if cfg.post_norms:
      h = rms_norm(h, lp["post_attn_norm"], cfg)
    x = x + h
    h = _mlp(lp, rms_norm(x, lp["mlp_norm"], cfg), cfg, sharder)
    if cfg.post_norms:
      h = rms_norm(h, lp["post_mlp_norm"], cfg)
    x = constrain(sharder, x + h, ("batch", "seq", "act_embed"))
    return x, new_kv, updated_kv

  layers = params["layers"]
  unrolled = isinstance(layers, (tuple, list))
  if cache is not None and unrolled != isinstance(cache["k"], (tuple, list)):
    raise ValueError("params and cache must both be stacked or both unstacked"
                     " (transformer.unstack_layers / unstack_cache)")
  new_cache = None
  if unrolled:
    updated = []
    for i, lp in enumerate(layers):
      layer_kv = None if cache is None else (cache["k"][i], cache["v"][i])
      # The layer type is known here: no select between the two masks.
      mask, sin_cos = (local_mask, local_rope) if is_local_L[i] else (global_mask, global_rope)
      fn = functools.partial(layer_fn, keys_HS=True)
      if cfg.remat == "full":
        fn = jax.checkpoint(fn)
      x_BTD, _, updated_kv = fn(x_BTD, lp, layer_kv, mask, sin_cos)
      updated.append(updated_kv)
    if cache is not None:
      new_cache = {"k": tuple(k for k, _ in updated), "v": tuple(v for _, v in updated),
                   "pos": k_pos_BS, "index": index + T}
  else:
    # The cache goes through the layer scan as per-layer slices (xs) and only
    # this call's keys and values come out (ys); one update writes them into
    # the stacked cache afterwards.
    def scan_fn(x, xs):
      lp, is_local, layer_kv = xs
      if isinstance(global_mask, tuple):  # splash: a static flag unless layer types mix
        mask = (global_mask[0], is_local if len(set(is_local_L)) > 1 else is_local_L[0])
      else:
        mask = jnp.where(is_local, local_mask, global_mask)
      sin_cos = jax.tree.map(lambda a, b: jnp.where(is_local, a, b), local_rope, global_rope)
      x, new_kv, _ = layer_fn(x, lp, layer_kv, mask, sin_cos)
      return x, (new_kv if cache is not None else None)

    if cfg.remat == "full":
      scan_fn = jax.checkpoint(scan_fn, prevent_cse=False)

    kv = None if cache is None else (cache["k"], cache["v"])
    x_BTD, new_kv = jax.lax.scan(scan_fn, x_BTD, (layers, jnp.asarray(is_local_L), kv))
    if cache is not None and jnp.ndim(index):  # [L, B, K, S, H], a slot per row
      new_cache = {"k": write_rows(cache["k"], new_kv[0].astype(cache["k"].dtype), index, 3, 1),
                   "v": write_rows(cache["v"], new_kv[1].astype(cache["v"].dtype), index, 3, 1),
                   "pos": k_pos_BS, "index": index + T}
    elif cache is not None:
      start = (0, 0, 0, index, 0)
      new_cache = {
          "k": jax.lax.dynamic_update_slice(cache["k"], new_kv[0].astype(cache["k"].dtype), start),
          "v": jax.lax.dynamic_update_slice(cache["v"], new_kv[1].astype(cache["v"].dtype), start),
          "pos": k_pos_BS, "index": index + T}
  x_BTD = rms_norm(x_BTD, params["final_norm"], cfg)
  return x_BTD, new_cache


def logits_from_hidden(params: Params, x_BTD: jax.Array, cfg: ModelConfig,
                       sharder: Sharder | None = None) -> jax.Array:
  """Vocabulary logits in float32."""
  dt = cfg.compute_dtype
  if cfg.tie_embeddings:
    logits = jnp.einsum("...D,VD->...V", x_BTD, params["embed"].astype(dt),
                        preferred_element_type=jnp.float32)
  else:
    logits = jnp.einsum("...D,DV->...V", x_BTD, params["unembed"].astype(dt),
                        preferred_element_type=jnp.float32)
  if cfg.final_logit_softcap:
    cap = cfg.final_logit_softcap
    logits = jnp.tanh(logits / cap) * cap
  if logits.ndim == 3:
    logits = constrain(sharder, logits, ("batch", "seq", "vocab"))
  return logits


def forward(params: Params, tokens_BT: jax.Array, cfg: ModelConfig, *,
            mask_BT: jax.Array | None = None,
            positions_BT: jax.Array | None = None,
            cache: Cache | None = None,
            sharder: Sharder | None = None) -> tuple[jax.Array, Cache | None]:
  """Logits [B, T, V] (float32) and the updated cache. See `hidden_states`."""
  x_BTD, cache = hidden_states(params, tokens_BT, cfg, mask_BT=mask_BT,
                               positions_BT=positions_BT, cache=cache, sharder=sharder)
  return logits_from_hidden(params, x_BTD, cfg, sharder), cache
