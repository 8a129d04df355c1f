"""Stage 7's prompts (data/rollout_prompts.py): the order of each iteration's prompts and
the prompt width."""

import numpy as np

from cai_jax.data.rollout_prompts import prompt_rows


def test_prompt_rows_are_epochs_of_seeded_permutations():
  """Each epoch's iterations take distinct prompts (the remainder dropped), epochs are
  shuffled anew, and the order depends on the seed only."""
  n, batch = 10, 4
  epochs = [np.concatenate([prompt_rows(n, batch, 7, e * 2 + i) for i in range(2)])
            for e in range(3)]
  for rows in epochs:
    assert len(set(rows.tolist())) == 8 and set(rows.tolist()) <= set(range(n))
  assert len({tuple(rows) for rows in epochs}) == 3  # a new order every epoch
  np.testing.assert_array_equal(prompt_rows(n, batch, 7, 5), prompt_rows(n, batch, 7, 5))
  assert not np.array_equal(prompt_rows(n, batch, 8, 0), prompt_rows(n, batch, 7, 0))


def test_prompt_width_is_the_longest_prompt_rounded_up():
  from cai_jax.data.rollout_prompts import PromptSet
  ps = PromptSet(["a", "b"], [[1] * 20, [1] * 33])
  assert ps.width(128) == 48  # 33 rounded up to 16
  assert ps.width(40) == 40  # never above the allowed maximum
  assert PromptSet(["a"], [[1] * 32]).width(128) == 32
