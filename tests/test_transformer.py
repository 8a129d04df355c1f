"""Logits parity against Hugging Face transformers (PyTorch, CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax.checkpoints import hf
from cai_jax.model import transformer
from conftest import TINY_PRESETS, WINDOWED_FAMILIES, left_pad

torch = pytest.importorskip("torch")


def _hf_logits(model, ids, mask):
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)),
                 position_ids=torch.tensor(positions)).logits.float().numpy()


def test_logits_match_transformers(tiny_hf):
  family, model, cfg, params = tiny_hf
  rs = np.random.RandomState(0)
  # Longer than the tiny sliding windows, and left-padded rows.
  ids, mask = left_pad([list(rs.randint(3, 256, size=n)) for n in (30, 19, 7)])
  ours, _ = jax.jit(transformer.forward, static_argnums=2)(
      params, jnp.asarray(ids), cfg, mask_BT=jnp.asarray(mask))
  ref = _hf_logits(model, ids, mask)
  diff = np.abs(np.asarray(ours) - ref)[mask]
  assert diff.max() <= 1e-4, f"{family}: max |logit diff| {diff.max()}"


def test_unjitted_equals_jitted(tiny_hf):
  _, _, cfg, params = tiny_hf
  tokens = jnp.asarray(np.random.RandomState(1).randint(0, 256, size=(2, 9)))
  eager, _ = transformer.forward(params, tokens, cfg)
  jitted, _ = jax.jit(transformer.forward, static_argnums=2)(params, tokens, cfg)
  np.testing.assert_allclose(eager, jitted, atol=1e-4, rtol=1e-5)


def test_bf16_error_no_worse_than_transformers_bf16(tiny_hf):
  """bf16 compute: our error against fp32 is of the size of transformers' own."""
  import copy
  family, model, cfg, params = tiny_hf
  ids, mask = left_pad([list(np.random.RandomState(2).randint(3, 256, size=12))] * 2)
  ref = _hf_logits(model, ids, mask)
  theirs = _hf_logits(copy.deepcopy(model).to(torch.bfloat16), ids, mask)
  ours, _ = transformer.forward(params, jnp.asarray(ids), cfg.replace(dtype="bfloat16"))
  assert ours.dtype == jnp.float32  # logits stay fp32
  err_ours = np.abs(np.asarray(ours) - ref).mean()
  err_theirs = np.abs(theirs.astype(np.float32) - ref).mean()
  assert 0 < err_ours <= 2 * err_theirs, f"{family}: {err_ours} vs transformers {err_theirs}"


def test_causal_mask_gradient():
  """d logits[t] / d tokens[t'] is zero for t' > t: no peeking at the future."""
  cfg = TINY_PRESETS["llama"]()
  params = transformer.init_params(cfg, jax.random.key(0))
  tokens = jnp.arange(3, 13)[None]
  x = params["embed"][tokens]

  def logits_at(emb, t):
    # Give each position its own embedding row, so the gradient per position shows.
    table = jnp.concatenate([params["embed"], emb[0]], axis=0)
    ids = cfg.vocab_size + jnp.arange(emb.shape[1])[None]
    out, _ = transformer.forward({**params, "embed": table}, ids,
                                 cfg.replace(vocab_size=table.shape[0]))
    return out[0, t, :cfg.vocab_size].sum()

  for t in (0, 4, 9):
    grad = jax.grad(logits_at)(x, t)
    norms = np.abs(np.asarray(grad[0])).sum(-1)
    assert np.all(norms[t + 1:] == 0), f"position {t} depends on the future"
    assert np.all(norms[:t + 1] > 0)


def test_config_round_trip_through_hf_json():
  for make in TINY_PRESETS.values():
    cfg = make()
    assert hf.config_from_hf(hf.config_to_hf(cfg)) == cfg


def test_param_count_matches_transformers(tiny_hf):
  _, model, cfg, params = tiny_hf
  ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  assert ours == cfg.num_params()
  theirs = sum(p.numel() for p in model.parameters())
  assert ours == theirs


@WINDOWED_FAMILIES
def test_chunked_attention_equals_full(tiny_hf):
  """Query-chunked attention: same logits and gradients as the plain path."""
  family, _, cfg, params = tiny_hf
  ids, mask = left_pad([list(np.random.RandomState(5).randint(3, 256, size=n)) for n in (32, 21)])
  ids, mask = jnp.asarray(ids), jnp.asarray(mask)

  def loss(p, c):
    logits, _ = transformer.forward(p, ids, c, mask_BT=mask)
    return jnp.sum(jnp.where(mask[..., None], jax.nn.log_softmax(logits), 0.0)[..., 7])

  plain, g_plain = jax.value_and_grad(loss)(params, cfg)
  for chunk in (8, 7):  # 7 does not divide 32: the last chunk is padded
    chunked, g_chunked = jax.value_and_grad(loss)(params, cfg.replace(attention_chunk=chunk))
    np.testing.assert_allclose(chunked, plain, rtol=1e-5, err_msg=f"{family} chunk {chunk}")
    for a, b in zip(jax.tree.leaves(g_chunked), jax.tree.leaves(g_plain)):
      a, b = np.asarray(a), np.asarray(b)
      assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(b), f"{family} chunk {chunk}"


def _splash_loss(ids, mask):
  def loss(p, c):
    logits, _ = transformer.forward(p, ids, c, mask_BT=mask)
    return jnp.sum(jnp.where(mask[..., None], jax.nn.log_softmax(logits), 0.0)[..., 7])
  return loss


def _assert_grads_close(got, want, what):
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    a, b = np.asarray(a), np.asarray(b)
    assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(b), what


@WINDOWED_FAMILIES
def test_splash_attention_equals_full(tiny_hf):
  """The Pallas splash kernel (interpret mode on CPU): the plain path's logits and
  gradients, with left and right padding, sliding-window layers (mistral, gemma3),
  soft-capped attention logits (set on gemma3, Gemma 2's cap), stacked and unrolled
  layers."""
  family, _, cfg, params = tiny_hf
  if family == "gemma3":
    cfg = cfg.replace(attn_logit_softcap=5.0)
  rs = np.random.RandomState(5)
  rows = [list(rs.randint(3, 256, size=n)) for n in (32, 21)]
  ids, mask = left_pad(rows)
  right_ids, right_mask = ids.copy(), mask.copy()
  for i, r in enumerate(rows):  # the same rows, right-padded
    right_ids[i] = 0
    right_ids[i, :len(r)], right_mask[i] = r, np.arange(ids.shape[1]) < len(r)
  splash = cfg.replace(attention_impl="splash")
  for name, (i, m) in {"left": (ids, mask), "right": (right_ids, right_mask)}.items():
    i, m = jnp.asarray(i), jnp.asarray(m)
    plain_logits, _ = transformer.forward(params, i, cfg, mask_BT=m)
    for layers, p in (("stacked", params), ("unrolled", transformer.unstack_layers(params))):
      got, _ = transformer.forward(p, i, splash, mask_BT=m)
      diff = np.abs(np.asarray(got) - np.asarray(plain_logits))[np.asarray(m)]
      assert diff.max() <= 1e-4, f"{family} {name} {layers}: {diff.max()}"
    loss = _splash_loss(i, m)
    plain, g_plain = jax.value_and_grad(loss)(params, cfg)
    got, g_got = jax.value_and_grad(loss)(params, splash)
    np.testing.assert_allclose(got, plain, rtol=1e-5, err_msg=f"{family} {name}")
    _assert_grads_close(g_got, g_plain, f"{family} {name} gradients")


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma3"])
def test_unrolled_layers_without_a_cache_equal_stacked(family):
  """`unstack_layers` params run a full-sequence pass (no KV cache) to the stacked
  logits, plain and query-chunked: the cache's [B, K, H, S] key layout is not
  applied to this call's own keys (it was, and the einsum failed)."""
  ids, mask = left_pad([list(np.random.RandomState(7).randint(3, 256, size=n))
                        for n in (13, 9)])
  ids, mask = jnp.asarray(ids), jnp.asarray(mask)
  for chunk in (0, 4):
    cfg = TINY_PRESETS[family]().replace(attention_chunk=chunk)
    params = transformer.init_params(cfg, jax.random.key(2))
    want, _ = transformer.forward(params, ids, cfg, mask_BT=mask)
    got, _ = transformer.forward(transformer.unstack_layers(params), ids, cfg, mask_BT=mask)
    np.testing.assert_allclose(np.asarray(got)[np.asarray(mask)],
                               np.asarray(want)[np.asarray(mask)], atol=1e-5,
                               err_msg=f"{family} chunk {chunk}")


def test_splash_attention_on_a_mesh_equals_one_device():
  """Under a (2, 2, 2) mesh the kernel runs per shard of batch and heads (shard_map):
  the one-device logits and gradients."""
  from cai_jax.model.sharding import Sharder, make_mesh
  cfg = TINY_PRESETS["qwen2"]().replace(attention_impl="splash")
  params = transformer.init_params(cfg, jax.random.key(3))
  ids, mask = left_pad([list(np.random.RandomState(6).randint(3, 256, size=n))
                        for n in (20, 17, 9, 12)])
  ids, mask = jnp.asarray(ids), jnp.asarray(mask)
  sharder = Sharder(make_mesh((2, 2, 2)))
  assert sharder.mesh.size == 8

  def loss(p, s):
    logits, _ = transformer.forward(p, ids, cfg, mask_BT=mask, sharder=s)
    return jnp.sum(jnp.where(mask[..., None], jax.nn.log_softmax(logits), 0.0)[..., 7])

  want, g_want = jax.value_and_grad(loss)(params, None)
  sharded = jax.device_put(params, transformer.param_shardings(cfg, sharder))
  got, g_got = jax.jit(jax.value_and_grad(lambda p: loss(p, sharder)))(sharded)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  _assert_grads_close(g_got, g_want, "mesh gradients")
