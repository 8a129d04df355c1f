"""LoRA: low-rank adapters on the attention and MLP projections (Hu et al., 2021).

A targeted weight W (stacked over layers, [L, *in, *out]) becomes
W + (alpha / rank) * A @ B with A [L, *in, rank] and B [L, rank, *out]; B starts
at zero, so an untrained adapter leaves the model exactly as it was. Only the
adapters train: the optimizer holds state for them alone, and the frozen base is
an ordinary (unchanged, shareable) parameter tree.

`attach(base, adapters, spec)` is the adapted model as a parameter tree the one
forward pass (`transformer.hidden_states`) reads unchanged: each targeted leaf is
a `LoraWeight` whose `.astype(dtype)`, where the layer reads its weight, merges
that layer's W + s * A @ B. Inside the layer scan that is one layer's merged
weight at a time, never a second copy of the model; the base keeps no gradient
(`stop_gradient`). With the adapters switched off (`base` alone) the same weights
are the reference policy: no second copy for RL's reference.

`merge` folds the adapters into a plain tree (for export: `transformers` then
loads the adapted model as an ordinary checkpoint).
"""

from __future__ import annotations

import dataclasses
import math

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from cai_jax.model import transformer
from cai_jax.model.config import ModelConfig
from cai_jax.model.sharding import Sharder

Params = dict

# Targetable weights: (group, name) -> how many of the layer-stripped axes are inputs.
TARGETS = {"q": ("attn", 1), "k": ("attn", 1), "v": ("attn", 1), "o": ("attn", 2),
           "gate": ("mlp", 1), "up": ("mlp", 1), "down": ("mlp", 1)}


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  rank: int
  alpha: float
  targets: tuple[str, ...]

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f"lora.rank={self.rank}: must be >= 1 (0 turns LoRA off)")
    bad = sorted(set(self.targets) - set(TARGETS))
    if bad or not self.targets:
      raise ValueError(f"lora.targets={tuple(self.targets)}: choose from {tuple(TARGETS)}")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  @classmethod
  def from_config(cls, c: ml_collections.ConfigDict | None) -> "LoraSpec | None":
    """The config's `lora` section, or None where it is absent or rank is 0."""
    if c is None or not c.get("rank", 0):
      return None
    return cls(int(c.rank), float(c.alpha), tuple(c.targets))

  def identity(self, base: str) -> dict:
    """What a checkpoint of these adapters must match to resume (base = its spec)."""
    return {"lora_rank": self.rank, "lora_alpha": self.alpha,
            "lora_targets": list(self.targets), "lora_base": base}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraWeight:
  """A frozen weight and its adapter; reads as the merged weight via `astype`."""

  base: jax.Array  # [..., *in, *out]
  a: jax.Array  # [..., *in, rank]
  b: jax.Array  # [..., rank, *out]
  scale: float = dataclasses.field(metadata=dict(static=True))
  in_ndim: int = dataclasses.field(metadata=dict(static=True))

  @property
  def shape(self):
    return self.base.shape

  @property
  def dtype(self):
    return self.base.dtype

  def astype(self, dtype) -> jax.Array:
    return _merged(self.base, self.a, self.b, self.scale, self.in_ndim).astype(dtype)


def _merged(base, a, b, scale: float, in_ndim: int) -> jax.Array:
  """base + scale * a @ b in float32; base [*lead, *in, *out], a [*lead, *in, r],
  b [*lead, r, *out] (lead: the stacked layer axis, or none inside the scan)."""
  lead_ndim = a.ndim - in_ndim - 1
  out_ndim = b.ndim - lead_ndim - 1
  lead, ins, outs = "LM"[:lead_ndim], "ijk"[:in_ndim], "xyz"[:out_ndim]
  delta = jnp.einsum(f"{lead}{ins}r,{lead}r{outs}->{lead}{ins}{outs}", a.astype(jnp.float32),
                     b.astype(jnp.float32))
  return jax.lax.stop_gradient(base).astype(jnp.float32) + scale * delta


def adapter_shapes(cfg: ModelConfig, spec: LoraSpec) -> Params:
  """{"layers": {group: {name: {"a": (shape, axes), "b": (shape, axes)}}}}, stacked
  like the base's layers; A's axes follow W's inputs, B's its outputs."""
  from cai_jax.model import transformer
  layers = transformer.param_shapes(cfg)["layers"]
  out: Params = {}
  for name in spec.targets:
    group, in_ndim = TARGETS[name]
    shape, axes = layers[group][name]
    lead, ins, outs = shape[:1], shape[1:1 + in_ndim], shape[1 + in_ndim:]
    lead_ax, ins_ax, outs_ax = axes[:1], axes[1:1 + in_ndim], axes[1 + in_ndim:]
    out.setdefault(group, {})[name] = {
        "a": ((*lead, *ins, spec.rank), (*lead_ax, *ins_ax, None)),
        "b": ((*lead, spec.rank, *outs), (*lead_ax, None, *outs_ax))}
  return {"layers": out}


def _is_spec(x) -> bool:
  return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple)


def init_adapters(cfg: ModelConfig, spec: LoraSpec, key: jax.Array) -> Params:
  """A ~ normal(0, 1 / sqrt(fan_in)) (PEFT's scale), B = 0: the adapted model is the base."""
  shapes = adapter_shapes(cfg, spec)
  flat, treedef = jax.tree.flatten(shapes, is_leaf=_is_spec)
  paths = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(shapes, is_leaf=_is_spec)[0]]
  leaves = []
  for (shape, _), path, k in zip(flat, paths, jax.random.split(key, len(flat))):
    if path.endswith("['b']"):
      leaves.append(jnp.zeros(shape, jnp.float32))
    else:
      fan_in = math.prod(shape[1:-1])
      leaves.append(jax.random.normal(k, shape, jnp.float32) / math.sqrt(fan_in))
  return jax.tree.unflatten(treedef, leaves)


def abstract_adapters(cfg: ModelConfig, spec: LoraSpec) -> Params:
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s[0], jnp.float32),
                      adapter_shapes(cfg, spec), is_leaf=_is_spec)


def adapter_shardings(cfg: ModelConfig, spec: LoraSpec, sharder: Sharder) -> Params:
  return jax.tree.map(lambda s: sharder.sharding(s[1], s[0]), adapter_shapes(cfg, spec),
                      is_leaf=_is_spec)


def trainable_params(cfg: ModelConfig, spec: LoraSpec | None, params: Params,
                     param_sh: Params, sharder: Sharder, key: jax.Array
                     ) -> tuple[Params, Params, Params, Params | None]:
  """(abstract, shardings, trainable, frozen) of what a causal-LM stage trains: every
  weight of `params` (spec None; nothing frozen), or fresh adapters from `key` on the
  frozen `params` (`param_sh` their shardings)."""
  if spec is None:
    return transformer.abstract_params(cfg), param_sh, params, None
  train_sh = adapter_shardings(cfg, spec, sharder)
  adapters = jax.jit(lambda k: init_adapters(cfg, spec, k), out_shardings=train_sh)(key)
  logging.info("LoRA rank %d on %s: %.2fM trainable params", spec.rank,
               ",".join(spec.targets), num_params(adapters) / 1e6)
  return abstract_adapters(cfg, spec), train_sh, adapters, params


def attach(base: Params, adapters: Params, spec: LoraSpec) -> Params:
  """The adapted model: `base` with each targeted weight a `LoraWeight`."""
  layers = dict(base["layers"])
  for group, names in adapters["layers"].items():
    layers[group] = dict(layers[group])
    for name, ab in names.items():
      layers[group][name] = LoraWeight(layers[group][name], ab["a"], ab["b"], spec.scale,
                                       TARGETS[name][1])
  return {**base, "layers": layers}


def merge(base: Params, adapters: Params, spec: LoraSpec) -> Params:
  """A plain parameter tree (base dtype) with the adapters folded in."""
  attached = attach(base, adapters, spec)
  return jax.tree.map(lambda w: w.astype(w.dtype) if isinstance(w, LoraWeight) else w,
                      attached, is_leaf=lambda x: isinstance(x, LoraWeight))


def num_params(adapters: Params) -> int:
  return sum(x.size for x in jax.tree.leaves(adapters))


def model_view(trainable: Params, frozen: Params | None, spec: LoraSpec | None) -> Params:
  """The model a step trains: `trainable` itself, or the frozen base with the trainable
  adapters attached."""
  return trainable if spec is None else attach(frozen, trainable, spec)


def scalar_view(trainable: Params, frozen: Params | None, spec: LoraSpec | None) -> Params:
  """A `{"backbone"(, "head")}` model (the PM, the RL policy): `trainable` itself, or
  `{"adapters"(, "head")}` on the frozen backbone as `{"backbone": attached, ...}`."""
  if spec is None:
    return trainable
  return {"backbone": attach(frozen, trainable["adapters"], spec),
          **{k: v for k, v in trainable.items() if k != "adapters"}}

