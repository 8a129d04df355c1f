"""The text layer: padding rules, length buckets, the batch-shard count, the chat rule."""

import numpy as np
import pytest

from cai_jax.model.sharding import DEFAULT_RULES, Sharder, make_mesh
from cai_jax.text import padding


def test_left_and_right_padding_with_filler_rows():
  rows = [[5, 6, 7], [8]]
  tokens, mask = padding.left_pad(rows, 4, pad_id=0, num_rows=3)
  assert tokens.tolist() == [[0, 5, 6, 7], [0, 0, 0, 8], [0, 0, 0, 0]]
  assert mask.tolist() == [[False, True, True, True], [False, False, False, True],
                           [False, False, False, True]]  # filler: one token, last column
  tokens, mask = padding.right_pad(rows, 4, pad_id=0, num_rows=3)
  assert tokens.tolist() == [[5, 6, 7, 0], [8, 0, 0, 0], [0, 0, 0, 0]]
  assert mask[:, 0].all() and mask.sum(axis=1).tolist() == [3, 1, 1]
  assert tokens.dtype == np.int32 and mask.dtype == bool


def test_buckets():
  assert [padding.bucket(n, (16, 32, 64)) for n in (1, 16, 17, 64)] == [16, 16, 32, 64]
  with pytest.raises(ValueError, match="largest bucket"):
    padding.bucket(65, (16, 32, 64))
  assert padding.buckets_of(np.array([1, 16, 17, 64]), (64, 16, 32)).tolist() == [16, 16, 32, 64]
  assert [padding.batch_bucket(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]
  assert [padding.batch_bucket(n, 8) for n in (1, 9)] == [8, 16]
  assert padding.batch_bucket(5, 6) == 12  # a multiple of the shards, at least a power of two


@pytest.mark.parametrize("shape,expect", [((8, 1, 1), 8), ((1, 8, 1), 8), ((1, 1, 8), 1),
                                          ((2, 2, 2), 4), ((4, 2, 1), 8)], ids=str)
def test_batch_shards_follow_the_rule_table(shape, expect):
  mesh = make_mesh(shape)
  assert Sharder(mesh).batch_shards == expect  # default: batch over data x fsdp
  data_only = tuple((k, ("data",) if k == "batch" else v) for k, v in DEFAULT_RULES)
  assert Sharder(mesh, data_only).batch_shards == shape[0]
