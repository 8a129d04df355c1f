"""cuDNN flash attention (attention_impl="cudnn") against our xla attention; GPU only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax.model import config as model_config
from cai_jax.model import transformer

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu",
                                reason="cuDNN attention needs an NVIDIA GPU")


@pytest.mark.parametrize("preset,T", [("smollm2_135m", 256), ("tiny_mistral", 256),
                                     ("smollm2_135m", 255)])  # odd: padded inside
def test_cudnn_attention_matches_xla(preset, T):
  cfg = model_config.PRESETS[preset](dtype="bfloat16", param_dtype="float32")
  params = transformer.init_params(cfg, jax.random.key(0))
  B = 4
  tokens = jax.random.randint(jax.random.key(1), (B, T), 0, cfg.vocab_size)
  # Left padding of different lengths: rows whose queries see no key at all.
  mask = jnp.arange(T)[None] >= jnp.array([0, 7, 64, 200])[:, None]

  def loss(p, impl):
    c = cfg.replace(attention_impl=impl)
    logits, _ = transformer.forward(p, tokens, c, mask_BT=mask)
    return jnp.sum(jnp.where(mask[..., None], jax.nn.log_softmax(logits), 0.0)) / mask.sum(), logits

  (l_x, logits_x), g_x = jax.jit(jax.value_and_grad(lambda p: loss(p, "xla"), has_aux=True))(params)
  (l_c, logits_c), g_c = jax.jit(jax.value_and_grad(lambda p: loss(p, "cudnn"), has_aux=True))(params)
  real = np.asarray(mask)
  diff = np.abs(np.asarray(logits_x, np.float32) - np.asarray(logits_c, np.float32))[real]
  scale = np.abs(np.asarray(logits_x, np.float32))[real].max()
  assert diff.max() <= 0.05 * scale, (diff.max(), scale)
  assert abs(float(l_x) - float(l_c)) <= 1e-2 * abs(float(l_x))
  for a, b in zip(jax.tree.leaves(g_x), jax.tree.leaves(g_c)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.isfinite(b).all()
    assert np.linalg.norm(a - b) <= 0.05 * np.linalg.norm(a) + 1e-6
