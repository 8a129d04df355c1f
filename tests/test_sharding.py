"""Sharding: rules as pure functions; sharded runs equal single-device runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cai_jax.model import transformer
from cai_jax.model.sharding import Sharder, make_mesh
from cai_jax.sampling.sampler import Sampler, sequence_keys
from conftest import TINY_PRESETS

MESH_SHAPES = [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2), (4, 2, 1)]


def test_eight_devices_available():
  assert len(jax.devices()) == 8, "conftest forces 8 host devices"


def test_rules_map_logical_axes_to_mesh_axes():
  s = Sharder(make_mesh((2, 2, 2)))
  assert s.spec(("vocab", "embed")) == P("tensor", "fsdp")
  assert s.spec(("batch", "seq", "act_embed")) == P(("data", "fsdp"), None, None)
  assert s.spec(("layers", "embed", "heads", "head_dim")) == P(None, "fsdp", "tensor", None)


def test_rules_drop_axes_that_do_not_divide():
  s = Sharder(make_mesh((1, 1, 8)))
  # SmolLM2: 9 heads, 3 KV heads do not split 8 ways -> replicated.
  assert s.spec(("embed", "heads"), (576, 9)) == P(None, None)
  assert s.spec(("embed", "mlp"), (576, 1536)) == P(None, "tensor")
  s = Sharder(make_mesh((2, 4, 1)))
  assert s.spec(("batch",), (4,)) == P("data")  # 4 % (2*4) != 0: keep data only
  assert s.spec(("batch",), (8,)) == P(("data", "fsdp"))


def test_mesh_errors_say_what_to_change():
  with pytest.raises(ValueError, match="needs 16 devices"):
    make_mesh((4, 4, 1))
  with pytest.raises(ValueError, match="at most one axis"):
    make_mesh((-1, -1, 1))
  assert make_mesh((2, -1, 1)).shape["fsdp"] == 4
  with pytest.raises(KeyError, match="no sharding rule"):
    Sharder(make_mesh((8, 1, 1))).spec(("nonsense",))



def test_num_devices_builds_the_mesh_on_the_first_n():
  import ml_collections
  from cai_jax.model.sharding import sharder_from_config
  c = ml_collections.ConfigDict({"mesh": (1, -1, 1), "num_devices": 2})
  mesh = sharder_from_config(c).mesh
  assert mesh.shape["fsdp"] == 2 and list(mesh.devices.flat) == jax.devices()[:2]
  c.num_devices = 0
  assert sharder_from_config(c).mesh.shape["fsdp"] == len(jax.devices())
  c.num_devices = 9
  with pytest.raises(ValueError, match="num_devices=9: 8 devices are available"):
    sharder_from_config(c)


@pytest.mark.parametrize("shape", MESH_SHAPES, ids=str)
def test_sharded_forward_equals_single_device(shape):
  cfg = TINY_PRESETS["gemma3"]()
  params = transformer.init_params(cfg, jax.random.key(0))
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 256, size=(8, 16)))
  ref, _ = jax.jit(transformer.forward, static_argnums=2)(params, tokens, cfg)

  sharder = Sharder(make_mesh(shape))
  sharded_params = transformer.init_params_sharded(cfg, jax.random.key(0), sharder)
  for leaf in jax.tree.leaves(sharded_params):
    assert len(leaf.sharding.device_set) == 8
  fwd = jax.jit(lambda p, t: transformer.forward(p, t, cfg, sharder=sharder)[0],
                in_shardings=(transformer.param_shardings(cfg, sharder),
                              sharder.sharding(("batch", None))))
  out = fwd(sharded_params, tokens)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 1, 8), (2, 2, 2)], ids=str)
def test_sharded_greedy_sampling_equals_single_device(shape):
  cfg = TINY_PRESETS["llama"]()
  params = transformer.init_params(cfg, jax.random.key(1))
  rs = np.random.RandomState(2)
  prompts = [list(rs.randint(3, 256, size=n)) for n in (4, 9, 13, 2, 7, 5, 3, 11)]
  keys = sequence_keys(0, range(8))
  ref = Sampler(cfg, max_new_tokens=12, stop_ids=(), pad_id=0).generate(params, prompts, keys)
  sharder = Sharder(make_mesh(shape))
  sharded = jax.device_put(params, transformer.param_shardings(cfg, sharder))
  out = Sampler(cfg, max_new_tokens=12, stop_ids=(), pad_id=0, sharder=sharder).generate(
      sharded, prompts, keys)
  np.testing.assert_array_equal(out.tokens, ref.tokens)
  np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-4)
