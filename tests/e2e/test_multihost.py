"""A 2-process jax.distributed job on localhost equals the 1-process run."""

import os
import socket
import subprocess
import sys

import jax

from cai_jax import paths
from cai_jax.phases import p2_critique_revision
from resume_helpers import shard_bytes
from test_p2_critique_revision import _config, _write_prompts

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_write_the_records_of_one(tiny_model_dir, tmp_path):
  assert len(jax.devices()) == 8  # 1 process x 8 devices vs 2 processes x 4
  single, multi = tmp_path / "single", tmp_path / "multi"
  for d in (single, multi):
    _write_prompts(d)
  p2_critique_revision.run(_config(tiny_model_dir), str(single))

  coordinator = f"localhost:{_free_port()}"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen([sys.executable, WORKER, coordinator, "2", str(i), str(multi),
                             tiny_model_dir], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  assert shard_bytes(paths.stage_dir(str(multi), paths.CRITIQUE_REVISION)) == shard_bytes(
      paths.stage_dir(str(single), paths.CRITIQUE_REVISION))
