"""LoRA (cai_jax.model.lora): untrained adapters are the base model exactly, the merged
weights are base + (alpha / r) A B, and only the adapters train (their gradients are the
chain rule of the weight's). SFT with LoRA end to end: e2e/test_p3_sft.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax.model import lora, transformer
from conftest import TINY_PRESETS, left_pad

SPEC = lora.LoraSpec(rank=4, alpha=8.0, targets=tuple(lora.TARGETS))


def _inputs():
  ids, mask = left_pad([list(np.random.RandomState(1).randint(3, 256, size=n))
                        for n in (14, 9)])
  return jnp.asarray(ids), jnp.asarray(mask)


def _trained_adapters(cfg, key):
  """Adapters with B != 0, as after some training."""
  adapters = lora.init_adapters(cfg, SPEC, key)
  return jax.tree_util.tree_map_with_path(
      lambda p, x: (0.05 * jax.random.normal(jax.random.fold_in(key, len(str(p))), x.shape)
                    if jax.tree_util.keystr(p).endswith("['b']") else x), adapters)


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # gemma3: o has two input axes
def test_untrained_adapters_are_the_base_model_exactly(family):
  cfg = TINY_PRESETS[family]()
  base = transformer.init_params(cfg, jax.random.key(0))
  adapted = lora.attach(base, lora.init_adapters(cfg, SPEC, jax.random.key(1)), SPEC)
  ids, mask = _inputs()
  want, _ = transformer.forward(base, ids, cfg, mask_BT=mask)
  got, _ = transformer.forward(adapted, ids, cfg, mask_BT=mask)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # The sampler's path: unrolled layers prefilling a KV cache.
  cache = lambda: transformer.unstack_cache(transformer.init_cache(cfg, *ids.shape))
  want, _ = transformer.forward(transformer.unstack_layers(base), ids, cfg, mask_BT=mask,
                                cache=cache())
  got, _ = transformer.forward(transformer.unstack_layers(adapted), ids, cfg, mask_BT=mask,
                               cache=cache())
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_merged_weights_are_base_plus_scaled_product():
  cfg = TINY_PRESETS["gemma3"]()
  base = transformer.init_params(cfg, jax.random.key(0))
  adapters = _trained_adapters(cfg, jax.random.key(2))
  merged = lora.merge(base, adapters, SPEC)
  for group, name in (("attn", "q"), ("attn", "o"), ("mlp", "down")):
    a = np.asarray(adapters["layers"][group][name]["a"], np.float64)
    b = np.asarray(adapters["layers"][group][name]["b"], np.float64)
    W = np.asarray(base["layers"][group][name], np.float64)
    L, r = a.shape[0], a.shape[-1]
    delta = np.stack([(a[l].reshape(-1, r) @ b[l].reshape(r, -1)).reshape(W.shape[1:])
                      for l in range(L)])
    np.testing.assert_allclose(merged["layers"][group][name], W + 2.0 * delta, atol=1e-6)
  assert merged["embed"] is base["embed"]  # untargeted weights are the base's own
  ids, mask = _inputs()
  got, _ = transformer.forward(lora.attach(base, adapters, SPEC), ids, cfg, mask_BT=mask)
  want, _ = transformer.forward(merged, ids, cfg, mask_BT=mask)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_gradients_reach_the_adapters_and_not_the_base():
  cfg = TINY_PRESETS["qwen2"]()
  base = transformer.init_params(cfg, jax.random.key(0))
  ids, mask = _inputs()

  def loss(adapters, base):
    logits, _ = transformer.forward(lora.attach(base, adapters, SPEC), ids, cfg, mask_BT=mask)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 5])

  adapters = lora.init_adapters(cfg, SPEC, jax.random.key(1))
  g_adapters, g_base = jax.grad(loss, argnums=(0, 1))(adapters, base)
  # The targeted base weights are frozen (stop_gradient); training differentiates the
  # adapters only, so the untargeted ones (embeddings, norms) get no update either.
  for name, (group, _) in lora.TARGETS.items():
    assert float(jnp.abs(g_base["layers"][group][name]).max()) == 0, name
  assert float(jnp.abs(g_base["embed"]).max()) > 0
  for name, ab in g_adapters["layers"]["attn"].items():
    assert float(jnp.abs(ab["b"]).max()) > 0, name  # B = 0: A's gradient is zero at first
  with pytest.raises(ValueError, match="lora.targets"):
    lora.LoraSpec(rank=2, alpha=1.0, targets=("qkv",))


def test_adapter_gradients_are_the_chain_rule_of_the_weight_gradient():
  """dL/dB = s A^T dL/dW and dL/dA = s dL/dW B^T at W = base + s A B (s = alpha / r),
  for weights with one (q, down) and two (o) input axes."""
  cfg = TINY_PRESETS["llama"]()
  base = transformer.init_params(cfg, jax.random.key(0))
  adapters = _trained_adapters(cfg, jax.random.key(2))
  ids = jnp.asarray(np.random.RandomState(0).randint(3, 250, (2, 12)))
  loss = lambda p: jnp.mean(jax.nn.log_softmax(transformer.forward(p, ids, cfg)[0])[..., 7])
  g_W = jax.grad(loss)(lora.merge(base, adapters, SPEC))
  g = jax.grad(lambda a: loss(lora.attach(base, a, SPEC)))(adapters)
  for group, name, ins in (("attn", "q", "i"), ("attn", "o", "ij"), ("mlp", "down", "i")):
    a, b = (np.asarray(adapters["layers"][group][name][k], np.float64) for k in "ab")
    W = np.asarray(g_W["layers"][group][name], np.float64)
    outs = "xyz"[:W.ndim - 1 - len(ins)]
    want_b = SPEC.scale * np.einsum(f"L{ins}r,L{ins}{outs}->Lr{outs}", a, W)
    want_a = SPEC.scale * np.einsum(f"L{ins}{outs},Lr{outs}->L{ins}r", W, b)
    np.testing.assert_allclose(g["layers"][group][name]["b"], want_b, atol=1e-6)
    np.testing.assert_allclose(g["layers"][group][name]["a"], want_a, atol=1e-6)
