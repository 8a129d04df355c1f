"""What the kill-and-resume tests share: a callback that SIGTERMs the run at a step,
the bytes of a pytree to compare bit for bit, and the comparison of two train states."""

import hashlib
import os
import signal

import jax
import numpy as np


def tree_hashes(tree) -> list[str]:
  """sha256 of every leaf's bytes (on the host), in tree order."""
  leaves = jax.tree.leaves(jax.device_get(tree))
  return [hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest() for x in leaves]


def sigterm_at(stop_step: int):
  """A stage's `should_stop` that sends this process SIGTERM at `stop_step`: the stage's
  own StopFlag catches it, saves and returns, as it would under a cluster's preemption."""
  def should_stop(step: int) -> bool:
    if step == stop_step:
      os.kill(os.getpid(), signal.SIGTERM)
    return False
  return should_stop


def assert_same_state(a, b, names=("params", "opt_state", "key")) -> None:
  """Train states `a` and `b` hold the same bytes in each of `names`."""
  for name in names:
    x, y = getattr(a, name), getattr(b, name)
    if name == "key":
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    assert tree_hashes(x) == tree_hashes(y), name
