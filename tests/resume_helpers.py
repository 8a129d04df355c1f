"""What the kill-and-resume tests share: a callback that SIGTERMs a training stage at a
step, a generation stage killed after its first shard, and the bytes to compare bit for
bit (a pytree's, two train states', a stage's record shards)."""

import contextlib
import hashlib
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from cai_jax import records


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


def shard_bytes(directory: str) -> dict[str, bytes]:
  """The bytes of each record shard in a generation stage's output `directory`."""
  return {f: open(os.path.join(directory, f), "rb").read()
          for f in sorted(os.listdir(directory)) if f.startswith("shard-")}


@contextlib.contextmanager
def killed_after_one_shard(monkeypatch):
  """Inside the block `records.write_shard` writes one shard, then leaves a half-written
  temporary file and raises KeyboardInterrupt, as a kill mid-write would; the block must
  end by that interrupt, and the real writer is back after it."""
  real_write = records.write_shard
  calls = []

  def dies_after_one_shard(directory, index, recs):
    if calls:
      with open(records.shard_path(directory, index) + ".tmp", "w") as f:
        f.write('{"truncated": ')
      raise KeyboardInterrupt("killed")
    calls.append(index)
    real_write(directory, index, recs)

  monkeypatch.setattr(records, "write_shard", dies_after_one_shard)
  try:
    with pytest.raises(KeyboardInterrupt):
      yield
  finally:
    monkeypatch.setattr(records, "write_shard", real_write)


def run_phase_binary(module: str, *args: str) -> str:
  """`python -m cai_jax.phases.<module> <args>` from the repository root, as a user runs
  it; asserts it finished and returns its stdout."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "PYTHONPATH": repo, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-m", f"cai_jax.phases.{module}", *args], cwd=repo,
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "status='done'" in proc.stdout
  return proc.stdout
