"""The optimizer and the train state (training/optim.py): the decay mask, a step keeping
the state's dtypes."""

import dataclasses
import functools

import jax
import pytest

from cai_jax.model import config as model_config
from cai_jax.model import transformer
from cai_jax.training import optim, sft_step


def test_decay_mask_skips_norms_and_biases():
  cfg = model_config.tiny_qwen2()
  mask = optim.decay_mask(transformer.abstract_params(cfg))
  assert mask["embed"] and mask["layers"]["attn"]["q"] and mask["layers"]["mlp"]["up"]
  assert not mask["final_norm"] and not mask["layers"]["attn_norm"]
  assert not mask["layers"]["attn"]["q_bias"]


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_a_step_keeps_the_train_state_dtypes(param_dtype):
  """bfloat16 checkpoints (the `full` presets) train with bfloat16 Adam moments:
  after a step every leaf of the state has the dtype it started with."""
  import jax.numpy as jnp
  import ml_collections
  from cai_jax.configs import sft as sft_config
  cfg = dataclasses.replace(model_config.tiny_llama(), param_dtype=param_dtype)
  abstract = transformer.abstract_params(cfg)
  tx, schedule = optim.make_optimizer(
      ml_collections.ConfigDict(sft_config.get_config("cpu").optim.to_dict()), 10, abstract)
  state = optim.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract,
                           opt_state=jax.eval_shape(tx.init, abstract),
                           key=jax.eval_shape(lambda: jax.random.key(0)))
  batch = {k: jax.ShapeDtypeStruct((2, 16), d) for k, d in (
      ("inputs", jnp.int32), ("targets", jnp.int32), ("input_mask", jnp.bool_),
      ("loss_mask", jnp.bool_))}
  out, _ = jax.eval_shape(functools.partial(
      sft_step.train_step, cfg=cfg, tx=tx, schedule=schedule, sharder=None, microbatches=1,
      loss_chunk=8), state, batch)
  changed = [(jax.tree_util.keystr(p), a.dtype, b.dtype) for (p, a), b in zip(
      jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(out)) if a.dtype != b.dtype]
  assert not changed, changed
