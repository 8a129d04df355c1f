"""Meshes and logical-axis sharding.

Every parameter and the main activations carry logical axis names ("vocab",
"embed", "heads", ...). A config maps each logical name to zero or more mesh
axes ("data", "fsdp", "tensor"). `Sharder` turns logical names into
`NamedSharding`s on an explicit mesh and applies activation constraints.

A mesh axis is dropped from a dimension it does not divide (e.g. 3 KV heads on
a tensor axis of 8): that dimension is then replicated over that axis. This is
what lets one rule set serve SmolLM2 (9 heads) and Llama (32 heads).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. Batch over data and fsdp; weights' model dimension
# over fsdp (ZeRO-3 style); heads, MLP hidden and vocabulary over tensor.
DEFAULT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", ("fsdp",)),
    ("vocab", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("layers", ()),
    ("head_dim", ()),
    ("seq", ()),
    ("kv_seq", ()),
    ("act_embed", ()),
)


def make_mesh(shape: Mapping[str, int] | Sequence[int],
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh; one size may be -1 (takes the rest)."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = [shape[a] for a in MESH_AXES] if isinstance(shape, Mapping) else list(shape)
  if len(sizes) != len(MESH_AXES):
    raise ValueError(f"mesh shape {sizes} must give sizes for {MESH_AXES}")
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh shape {sizes}: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(
          f"mesh shape {sizes} does not fit {len(devices)} devices: the fixed"
          f" axes multiply to {known}, which does not divide {len(devices)}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(
        f"mesh shape {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)}"
        f" devices but {len(devices)} are available; change the config's mesh"
        " (use -1 for one axis to take the rest)")
  device_array = np.asarray(devices).reshape(sizes)
  return Mesh(device_array, MESH_AXES)


@dataclasses.dataclass(frozen=True)
class Sharder:
  """Logical axis names -> shardings on one mesh, by a rule table."""

  mesh: Mesh
  rules: tuple[tuple[str, tuple[str, ...]], ...] = DEFAULT_RULES

  def spec(self, axes: Sequence[str | None], shape: Sequence[int] | None = None
           ) -> PartitionSpec:
    """PartitionSpec for logical `axes`; with `shape`, drops non-dividing axes."""
    table = dict(self.rules)
    used: set[str] = set()
    out = []
    for i, name in enumerate(axes):
      mesh_axes = [] if name is None else list(table.get(name, ()))
      if name is not None and name not in table:
        raise KeyError(f"logical axis {name!r} has no sharding rule; add it to"
                       " the config's sharding rules")
      kept = []
      for ax in mesh_axes:
        size = self.mesh.shape[ax]
        if ax in used or size == 1:
          continue
        if shape is not None:
          divisor = size * math.prod(self.mesh.shape[a] for a in kept)
          if shape[i] % divisor:
            continue
        kept.append(ax)
      used.update(kept)
      out.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
    return PartitionSpec(*out)

  def sharding(self, axes: Sequence[str | None], shape: Sequence[int] | None = None
               ) -> NamedSharding:
    return NamedSharding(self.mesh, self.spec(axes, shape))

  def constrain(self, x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    return jax.lax.with_sharding_constraint(x, self.sharding(axes, x.shape))

  @property
  def batch_shards(self) -> int:
    """How many shards the logical "batch" axis is split over, by the rule table.

    Every batch a jitted step takes must have a multiple of this many rows.
    """
    return math.prod(self.mesh.shape[a] for a in dict(self.rules).get("batch", ()))

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())


def constrain(sharder: Sharder | None, x: jax.Array, axes: Sequence[str | None]):
  """Activation constraint when a sharder is given; single-device otherwise."""
  return x if sharder is None else sharder.constrain(x, axes)


def sharder_from_config(config) -> Sharder:
  """A stage config's (data, fsdp, tensor) `mesh` over its devices (`num_devices`: the
  first n of this process's view; 0 or absent: all), with its `sharding_rules`."""
  n = int(config.get("num_devices", 0) or 0)
  devices = jax.devices()
  if not 0 <= n <= len(devices):
    raise ValueError(f"config num_devices={n}: {len(devices)} devices are available; use"
                     f" 0 (all) or 1..{len(devices)}")
  mesh = make_mesh(tuple(config.mesh), devices[:n] if n else devices)
  rules = tuple((k, tuple(v)) for k, v in config.get("sharding_rules", {}).items())
  return Sharder(mesh, rules) if rules else Sharder(mesh)
