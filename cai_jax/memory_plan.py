"""A memory plan: what each training stage's compiled step needs per device, from
XLA's own analysis, for a model config and mesh, with nothing allocated
(`benchmarks/perf/memory_plan.py` prints and writes it).

For each (model, stage, mesh) the stage's jitted train step (the same function
and shardings the stage uses: `training.sft_step.train_step`, the PM's
`preference.model.train_step`, `rl.dpo.train_step`, `rl.learner.train_step`
with a value head) is lowered on `ShapeDtypeStruct`s (params + two AdamW moments in
the checkpoint's dtype, the batch) and compiled; `compiled.memory_analysis()` gives the
bytes of arguments, outputs, aliased (donated) buffers and temporaries, and
per device

  peak ~= arguments + outputs - aliased + temporaries

PPO also needs the frozen reference (one more copy of the backbone's params,
not trained) and, during the rollout, the KV cache; the plan adds the
reference's bytes to the PPO row and does not model the cache. `lora_rank` > 0
plans SFT, the PM, DPO and PPO with LoRA adapters (`cai_jax.model.lora`, every projection
targeted): the state is the adapters (PM, PPO: and the head) and their moments,
the frozen base one more argument, which for DPO and PPO is also the reference (no second
copy). Compiled for the backend this runs on: on CPU the fusion decisions and
temporaries differ from a GPU's or TPU's (no cuDNN / Pallas attention, so attention
here is the `xla` path that keeps [B, N, T, T] scores for the backward), so a CPU plan
is an estimate of the device one, to be checked on the device when one is lent.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from cai_jax.model import config as model_config_lib
from cai_jax.model import heads, lora, transformer
from cai_jax.model.sharding import Sharder, make_mesh
from cai_jax.preference import model as pm
from cai_jax.rl import dpo, learner
from cai_jax.training import optim, sft_step

GIB = 2**30
# Per-device memory of the accelerators a plan is read against (GiB).
DEVICES_GIB = {"H100 80GB": 80.0, "H200 141GB": 141.0, "TPU v5e (16 GiB HBM)": 16.0,
               "TPU v5p (95 GiB HBM)": 95.0}


def model_config(name: str, dtype: str, remat: str, param_dtype: str, attention_chunk: int = 0
                 ) -> model_config_lib.ModelConfig:
  """The preset `name` of `cai_jax.model.config` (or Llama-3-70B's shapes) with these
  compute settings; `param_dtype` "" keeps the preset's (the checkpoint's)."""
  if name == "llama3_70b":  # Llama-3-70B's shapes (no preset: nothing is downloaded)
    cfg = model_config_lib.llama3_8b(num_layers=80, dim=8192, num_heads=64,
                                     num_kv_heads=8, mlp_dim=28672)
  else:
    cfg = getattr(model_config_lib, name)()
  return dataclasses.replace(cfg, dtype=dtype, remat=remat, attention_chunk=attention_chunk,
                             param_dtype=param_dtype or cfg.param_dtype)


def plan_stage(name: str, stage: str, mesh_shape: tuple[int, ...], *,
               rules: Mapping[str, Sequence], optim_config: ml_collections.ConfigDict,
               batch: int, seq: int, dtype: str, remat: str, param_dtype: str,
               microbatches: int, attention_chunk: int = 0, lora_rank: int = 0) -> dict:
  """One row of the plan: the compiled step's bytes per device (GiB) of the model preset
  `name` for `stage` (sft, pm, dpo, ppo) on a (data, fsdp, tensor) mesh of this
  backend's devices, sharded by the logical-axis `rules`, with the AdamW state of
  `optim_config` (a stage's `optim` section), and the accelerators it fits."""
  cfg = model_config(name, dtype, remat, param_dtype, attention_chunk)
  n = math.prod(mesh_shape)
  sharder = Sharder(make_mesh(mesh_shape, jax.devices()[:n]),
                    tuple((k, tuple(v)) for k, v in rules.items()))
  optim_config = ml_collections.ConfigDict(optim_config.to_dict())
  scalar = stage in ("pm", "ppo")
  abstract = heads.abstract_scalar_params(cfg) if scalar else transformer.abstract_params(cfg)
  param_sh = (heads.scalar_model_shardings(cfg, sharder) if scalar
              else transformer.param_shardings(cfg, sharder))
  spec, frozen = None, None
  if lora_rank:
    if stage not in ("sft", "pm", "dpo", "ppo"):
      raise ValueError(f"lora_rank: LoRA is implemented for sft, pm, dpo and ppo, not {stage}")
    spec = lora.LoraSpec(lora_rank, 16.0, tuple(lora.TARGETS))
    frozen = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                          transformer.abstract_params(cfg), transformer.param_shardings(cfg, sharder))
    if stage in ("sft", "dpo"):  # DPO: the frozen base is also the reference
      abstract, param_sh = (lora.abstract_adapters(cfg, spec),
                            lora.adapter_shardings(cfg, spec, sharder))
    else:  # adapters and the (value) head; for PPO the frozen base is also the reference
      abstract = learner.abstract_policy(cfg, True, spec)
      param_sh = learner.policy_shardings(cfg, sharder, True, spec)
  tx, schedule = optim.make_optimizer(optim_config, 1000, abstract)
  state_sh = optim.train_state_shardings(tx, abstract, param_sh, sharder)
  state = optim.abstract_train_state(tx, abstract, state_sh)
  B, T = batch, seq
  S = lambda shape, dt, axes: jax.ShapeDtypeStruct(shape, dt, sharding=sharder.sharding(axes))

  if stage == "sft":
    row = ("batch", "seq")
    data = {"inputs": S((B, T), jnp.int32, row), "targets": S((B, T), jnp.int32, row),
            "input_mask": S((B, T), jnp.bool_, row), "loss_mask": S((B, T), jnp.bool_, row)}
    fn = functools.partial(sft_step.train_step, cfg=cfg, tx=tx, schedule=schedule,
                           sharder=sharder, microbatches=microbatches, loss_chunk=512,
                           lora=spec)
  elif stage in ("pm", "dpo"):
    pair = ("batch", None, "seq")
    data = {"tokens": S((B, 2, T), jnp.int32, pair), "mask": S((B, 2, T), jnp.bool_, pair),
            "p_a": S((B,), jnp.float32, ("batch",)), "valid": S((B,), jnp.bool_, ("batch",))}
    if stage == "pm":
      fn = functools.partial(pm.train_step, cfg=cfg, tx=tx, schedule=schedule, sharder=sharder,
                             microbatches=microbatches, lora=spec)
    else:
      data["response_mask"] = S((B, 2, T), jnp.bool_, pair)
      data["ref_logp"] = S((B, 2), jnp.float32, ("batch", None))
      fn = functools.partial(dpo.train_step, cfg=cfg, tx=tx, schedule=schedule,
                             sharder=sharder, microbatches=microbatches, beta=0.1,
                             loss_type="sigmoid", chunk=512, lora=spec)
  elif stage == "ppo":
    P = M = T // 2  # prompt and response halves of the sequence
    row = ("batch", None)
    data = {"inputs": S((B, P + M - 1), jnp.int32, row),
            "input_mask": S((B, P + M - 1), jnp.bool_, row),
            "targets": S((B, M), jnp.int32, row), "mask": S((B, M), jnp.float32, row),
            **{k: S((B, M), jnp.float32, row)
               for k in ("old_logp", "old_values", "adv", "returns")}}
    fn = functools.partial(learner.train_step, tx=tx, microbatches=microbatches,
                           sharder=sharder, cfg=cfg, prompt_len=P, temperature=1.0,
                           chunk=512, clip_eps=0.2, value_clip=0.2, vf_coef=0.1, ent_coef=0.0,
                           lora=spec)
  else:
    raise ValueError(f"unknown stage {stage!r}")

  t0 = time.perf_counter()
  compiled = jax.jit(fn, donate_argnums=0, out_shardings=(state_sh, sharder.replicated)
                     ).lower(state, data, *([frozen] if spec else [])).compile()
  seconds = time.perf_counter() - t0
  m = compiled.memory_analysis()
  row_out = {"model": name, "stage": stage, "mesh": list(mesh_shape), "devices": n,
             "params_b": cfg.num_params() / 1e9, "batch": B, "seq": T, "dtype": dtype,
             "param_dtype": cfg.param_dtype, "attention_chunk": attention_chunk,
             "remat": remat, "microbatches": microbatches, "lora_rank": lora_rank,
             "trainable_b": sum(x.size for x in jax.tree.leaves(abstract)) / 1e9,
             "compile_s": round(seconds, 1),
             "argument_gib": m.argument_size_in_bytes / GIB,
             "output_gib": m.output_size_in_bytes / GIB,
             "alias_gib": m.alias_size_in_bytes / GIB,
             "temp_gib": m.temp_size_in_bytes / GIB}
  peak = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
          + m.temp_size_in_bytes)
  if stage == "ppo" and spec is None:  # the frozen reference backbone, sharded like the policy's
    # (with LoRA the reference is the base already among the step's arguments)
    ref = sum(x.size * jnp.dtype(x.dtype).itemsize
              for x in jax.tree.leaves(transformer.abstract_params(cfg))) / n
    row_out["reference_gib"] = ref / GIB
    peak += ref
  row_out["peak_gib"] = peak / GIB
  row_out["fits"] = [d for d, cap in DEVICES_GIB.items() if peak / GIB <= cap]
  return row_out
