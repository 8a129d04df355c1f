"""Batch order, mixing and held-out splits (`data.batching`)."""

import pytest

from cai_jax.data.batching import split_held_out


def test_held_out_split_is_a_seeded_random_subset():
  """(train, held-out) partition the items in their order; the held-out set is a seeded
  random subset (not the first items), the same for the same seed."""
  items = [f"item-{i}" for i in range(100)]
  train, held = split_held_out(items, 10, seed=3, what="items")
  assert len(held) == 10 and sorted(train + held) == sorted(items)
  assert train == [x for x in items if x not in held] and held == [x for x in items if x in held]
  assert held != items[:10] and held != items[-10:]
  assert split_held_out(items, 10, seed=3, what="items") == (train, held)
  assert split_held_out(items, 10, seed=4, what="items")[1] != held
  with pytest.raises(ValueError, match="data.eval_size=100 leaves no training items"):
    split_held_out(items, 100, seed=3, what="items")
