"""SFT's loss and train step (training/sft_step.py): chunked loss, microbatches,
memorisation, a sharded step against one device."""

import functools

import jax
import numpy as np
import pytest

from cai_jax import distributed
from cai_jax.model import transformer
from cai_jax.model.sharding import Sharder, make_mesh
from cai_jax.training import optim, sft_step

from cai_jax.configs import sft as sft_config
from test_sft import single_device_sharder, tiny_batch, tiny_model, tok


@pytest.mark.parametrize("chunk", [24, 32])
def test_chunked_loss_equals_plain(tok, chunk):
  sharder = single_device_sharder()
  cfg, params = tiny_model(tok, sharder)
  _, batch = tiny_batch(tok)

  def loss(params, chunk):
    s, c = sft_step.sft_loss_fn(params, batch, cfg=cfg, sharder=None, loss_chunk=chunk)
    return s / c["loss_tokens"]

  plain, g_plain = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, 0)
  chunked, g_chunked = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, chunk)
  np.testing.assert_allclose(chunked, plain, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g_chunked), jax.tree.leaves(g_plain)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_microbatches_equal_one_big_batch(tok):
  sharder = single_device_sharder()
  cfg, params = tiny_model(tok, sharder)
  _, batch = tiny_batch(tok)
  loss_fn = functools.partial(sft_step.sft_loss_fn, cfg=cfg, sharder=None, loss_chunk=0)
  acc = jax.jit(optim.accumulate_gradients, static_argnums=(0, 3))
  g1, s1 = acc(loss_fn, params, batch, 1)
  g4, s4 = acc(loss_fn, params, batch, 4)
  np.testing.assert_allclose(s4["loss_sum"], s1["loss_sum"], rtol=1e-6)
  assert s4["loss_tokens"] == s1["loss_tokens"]
  for a, b in zip(jax.tree.leaves(g4), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _train(tok, sharder, steps: int, lr: float, batch_np, microbatches: int = 1):
  """`steps` jitted SFT steps on one fixed batch; returns (state, losses)."""
  cfg, params = tiny_model(tok, sharder)
  c = sft_config.get_config("tiny").optim
  c.lr, c.warmup_steps, c.decay = lr, 0, "constant"
  abstract = transformer.abstract_params(cfg)
  param_sh = transformer.param_shardings(cfg, sharder)
  tx, schedule = optim.make_optimizer(c, steps, abstract)
  state_sh = optim.train_state_shardings(tx, abstract, param_sh, sharder)
  state = jax.jit(lambda p, k: optim.init_train_state(p, tx, k),
                  out_shardings=state_sh)(params, jax.random.key(1))
  batch_sh = sharder.sharding(("batch", "seq"))
  step = jax.jit(functools.partial(
      sft_step.train_step, cfg=cfg, tx=tx, schedule=schedule, sharder=sharder,
      microbatches=microbatches, loss_chunk=16),
      in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, sharder.replicated))
  batch = distributed.batch_to_global(batch_np, batch_sh)
  out = []
  for _ in range(steps):
    state, m = step(state, batch)
    out.append(float(m["loss"]))
  return state, out


def test_sft_memorises_a_small_set(tok):
  _, batch = tiny_batch(tok)
  _, loss = _train(tok, single_device_sharder(), steps=40, lr=1e-2, batch_np=batch)
  assert loss[-1] < 0.1 * loss[0], loss[::10]  # measured: 0.036 of the first loss


@pytest.fixture(scope="module")
def single_device_run(tok):
  """3 SFT steps on one device: the reference every mesh is compared with (run once)."""
  _, batch = tiny_batch(tok)
  return batch, _train(tok, single_device_sharder(), 3, 1e-3, batch)


# FSDP alone, tensor parallelism alone, and all three axes at once (data x fsdp x
# tensor); the data axis alone adds no code path the mixed mesh does not take.
@pytest.mark.parametrize("shape", [(1, 8, 1), (1, 1, 8), (2, 2, 2)], ids=str)
def test_sharded_step_equals_single_device(tok, shape, single_device_run):
  """(data, fsdp, tensor) meshes on 8 devices: 3 SFT steps equal one device."""
  batch, (single, l1) = single_device_run
  sharder = Sharder(make_mesh(shape))
  sharded, l8 = _train(tok, sharder, 3, 1e-3, batch, microbatches=2)
  q = sharded.params["layers"]["attn"]["q"]
  assert len(q.sharding.device_set) == 8
  assert not q.sharding.is_fully_replicated
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(sharded.params), jax.tree.leaves(single.params)):
    a, b = np.asarray(a), np.asarray(b)
    assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b)
