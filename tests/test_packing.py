"""Sequence packing for SFT (data/sft.py `make_packed_batch`, segment ids in
`transformer.hidden_states`): the packed step's loss and gradients equal the unpacked
step's, no token attends across a conversation boundary, and the packer's rows are
first-fit decreasing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax.data import sft
from cai_jax.model import transformer
from cai_jax.training import sft_step
from conftest import TINY_PRESETS


def _data(lengths, prompt_lens, seq_len=32, seed=0):
  rs = np.random.RandomState(seed)
  tokens = np.zeros((len(lengths), seq_len + 1), np.int32)
  for e, n in enumerate(lengths):
    tokens[e, :n] = rs.randint(3, 256, size=n)
  return sft.TokenizedData(tokens, np.asarray(lengths, np.int32),
                           np.asarray(prompt_lens, np.int32))


def test_first_fit_decreasing_rows():
  assert sft.pack([5, 9, 3, 7, 2], 10) == [[1], [2, 3], [0, 4]]  # 9 | 7+3 | 5+2
  # Every index once, no row over T.
  lengths = list(np.random.RandomState(1).randint(1, 30, size=40))
  rows = sft.pack(lengths, 32)
  assert sorted(i for r in rows for i in r) == list(range(40))
  assert all(sum(lengths[i] for i in r) <= 32 for r in rows)


def test_packed_loss_and_gradients_equal_the_unpacked_ones():
  # (The segment mask joins the causal and, in local layers, the window mask in one
  # function for every family; one family is enough here.)
  cfg = TINY_PRESETS["llama"]()
  params = transformer.init_params(cfg, jax.random.key(0))
  data = _data([12, 7, 20, 5, 9, 15, 3, 11], [4, 3, 6, 2, 5, 7, 2, 4])
  rows, T = np.arange(8), 32
  plain = sft.make_batch(data, rows, T, 0)
  packed = sft.make_packed_batch(data, rows, T, 0)
  assert packed["inputs"].shape[0] < 8  # fewer rows: the point
  assert packed["input_mask"].sum() == plain["input_mask"].sum()
  assert packed["loss_mask"].sum() == plain["loss_mask"].sum()

  def loss(p, batch):
    total, stats = sft_step.sft_loss_fn(p, jax.tree.map(jnp.asarray, batch), cfg=cfg,
                                        sharder=None, loss_chunk=0)
    return total / stats["loss_tokens"]

  (a, ga), (b, gb) = (jax.value_and_grad(loss)(params, x) for x in (plain, packed))
  np.testing.assert_allclose(b, a, rtol=1e-5)
  for x, y in zip(jax.tree.leaves(gb), jax.tree.leaves(ga)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_no_token_attends_across_a_conversation_boundary():
  # Change every token of one conversation: the hidden states of the others in its row
  # do not move (and its own do).
  cfg = TINY_PRESETS["llama"]()
  params = transformer.init_params(cfg, jax.random.key(1))
  data = _data([6, 5, 8], [2, 2, 2], seq_len=24)
  batch = sft.make_packed_batch(data, np.arange(3), 24, 0)
  assert batch["inputs"].shape[0] == 1 and set(np.unique(batch["segments"])) == {0, 1, 2, 3}

  def hidden(inputs):
    h, _ = transformer.hidden_states(params, jnp.asarray(inputs), cfg,
                                     mask_BT=jnp.asarray(batch["input_mask"]),
                                     positions_BT=jnp.asarray(batch["positions"]),
                                     segment_ids_BT=jnp.asarray(batch["segments"]))
    return np.asarray(h)

  base = hidden(batch["inputs"])
  changed = batch["inputs"].copy()
  seg2 = batch["segments"] == 2
  changed[seg2] = (changed[seg2] + 7) % 250 + 3
  moved = hidden(changed)
  others = (batch["segments"] != 2) & batch["input_mask"]
  np.testing.assert_array_equal(moved[others], base[others])
  assert not np.allclose(moved[seg2], base[seg2])
