"""Orbax checkpoints of the train state (training/checkpoint.py): restore onto another
mesh, the SIGTERM flag, damaged and unsealed steps."""

import dataclasses
import os
import signal

import jax
import numpy as np
import pytest

from cai_jax.model import transformer
from cai_jax.model.sharding import Sharder, make_mesh
from cai_jax.training import checkpoint, optim

from cai_jax.faults import damage
from cai_jax.configs import sft as sft_config
from resume_helpers import tree_hashes
from test_sft import single_device_sharder, tiny_model, tok


def test_checkpoint_restores_onto_another_mesh(tmp_path, tok):
  a, b = Sharder(make_mesh((1, 8, 1))), Sharder(make_mesh((2, 2, 2)))
  cfg, params = tiny_model(tok, a)
  c = sft_config.get_config("tiny").optim
  abstract = transformer.abstract_params(cfg)
  tx, _ = optim.make_optimizer(c, 10, abstract)
  state = optim.init_train_state(params, tx, jax.random.key(7))
  with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(state, {"epoch": 0, "step": 0}, force=True)
  shardings = optim.train_state_shardings(
      tx, abstract, transformer.param_shardings(cfg, b), b)
  with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
    restored, data = ckpt.restore(optim.abstract_train_state(tx, abstract, shardings))
  assert data == {"epoch": 0, "step": 0}
  assert tree_hashes(restored.params) == tree_hashes(params)
  assert tree_hashes(restored.opt_state) == tree_hashes(state.opt_state)
  np.testing.assert_array_equal(jax.random.key_data(restored.key),
                                jax.random.key_data(state.key))
  q = restored.params["layers"]["attn"]["q"]
  assert q.sharding == transformer.param_shardings(cfg, b)["layers"]["attn"]["q"]
  only = checkpoint.restore_params(str(tmp_path), jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
      transformer.param_shardings(cfg, b)))
  assert tree_hashes(only) == tree_hashes(params)


def test_stop_flag_catches_sigterm():
  with checkpoint.StopFlag() as flag:
    assert not flag.requested
    os.kill(os.getpid(), signal.SIGTERM)
    assert flag.requested and flag.signum == signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_unsealed_checkpoint_that_fails_to_restore_is_skipped(tmp_path, tok):
  cfg, params = tiny_model(tok, single_device_sharder())
  c = sft_config.get_config("tiny").optim
  abstract = transformer.abstract_params(cfg)
  tx, _ = optim.make_optimizer(c, 10, abstract)
  state = optim.init_train_state(params, tx, jax.random.key(7))
  with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
    for step in (1, 2):
      ckpt.save(dataclasses.replace(state, step=np.int32(step)), {"n": step}, force=True)
  os.remove(os.path.join(tmp_path, "2", checkpoint.CHECKSUMS))  # killed before its seal
  for r, _, fs in os.walk(os.path.join(tmp_path, "2", "params")):
    for f in fs:
      open(os.path.join(r, f), "wb").close()  # and then truncated
  shardings = optim.train_state_shardings(tx, abstract, transformer.param_shardings(
      cfg, single_device_sharder()), single_device_sharder())
  target = optim.abstract_train_state(tx, abstract, shardings)
  with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
    assert ckpt.latest_step() == 2 and not ckpt.verified(2)  # unsealed: tried, not judged
    restored = checkpoint.restore_or_init(ckpt, target, lambda: None, {"n": 1})
    assert int(restored.step) == 1 and ckpt.moved == [2]
  assert tree_hashes(restored.params) == tree_hashes(params)
  # A sealed checkpoint that does not fit the run is a config error, never "damage".
  with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
    wrong = jax.tree.map(lambda x: jax.ShapeDtypeStruct((3,) + x.shape, x.dtype,
                                                        sharding=x.sharding), target)
    with pytest.raises(ValueError, match="step 1 is intact but does not fit"):
      checkpoint.restore_or_init(ckpt, wrong, lambda: None, {"n": 1})
    assert ckpt.latest_step() == 1 and not ckpt.moved


def test_restore_params_refuses_a_damaged_step(tmp_path, tok):
  cfg, params = tiny_model(tok, single_device_sharder())
  abstract = transformer.abstract_params(cfg)
  tx, _ = optim.make_optimizer(sft_config.get_config("tiny").optim, 10, abstract)
  with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(optim.init_train_state(params, tx, jax.random.key(0)), {}, force=True)
  damage(os.path.join(tmp_path, "0"))
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract, transformer.param_shardings(cfg, single_device_sharder()))
  with pytest.raises(ValueError, match="step 0 is damaged .*rerun the stage"):
    checkpoint.restore_params(str(tmp_path), target)
