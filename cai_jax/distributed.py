"""Multi-host: initialisation, host <-> global arrays, and who writes files.

Every process runs the same program on the same global batch; each provides
only the shards its own devices hold (`to_global`), results are gathered back
(`to_host`), and only process 0 writes shared outputs (`is_leader`), with a
barrier so no process reads a file before it exists.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.experimental import multihost_utils


def initialize(mode: str = "auto", coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None) -> None:
  """Starts `jax.distributed` when the job spans several processes.

  mode:
    "off"   single process, never initialise.
    "on"    initialise; with no address, JAX detects the cluster (TPU pod
            metadata, SLURM's environment, ...).
    "auto"  initialise when an address is given, or when the environment
            says there are several processes (SLURM_NTASKS > 1,
            JAX_COORDINATOR_ADDRESS, a multi-worker TPU VM); else single.
  """
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"--distributed must be auto, on or off, got {mode!r}")
  if mode == "off":
    return
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  multi = (coordinator_address is not None
           or int(os.environ.get("SLURM_NTASKS", "1")) > 1
           or len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1)
  if mode == "auto" and not multi:
    return
  kwargs = {}
  if coordinator_address:
    kwargs["coordinator_address"] = coordinator_address
  if num_processes is not None:
    kwargs["num_processes"] = num_processes
  if process_id is not None:
    kwargs["process_id"] = process_id
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def is_leader() -> bool:
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits for every process (no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def to_global(x: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
  """A global array from the same host array on every process (each puts its shards)."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def to_host(x: jax.Array) -> np.ndarray:
  """The whole array on every host, gathered across processes when needed."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def batch_to_global(batch: dict[str, np.ndarray],
                    shardings: jax.sharding.Sharding | dict[str, jax.sharding.Sharding]
                    ) -> dict[str, jax.Array]:
  """A host batch (every process holds all of it) -> global arrays.

  `shardings`: one sharding for every key, or one per key.
  """
  get = shardings.get if isinstance(shardings, dict) else (lambda k: shardings)
  return {k: to_global(v, get(k)) for k, v in batch.items()}
