"""Step throughput across mesh shapes: the SFT, PM and PPO train steps and decode.

  # 8 CPU devices (as in CI):
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m benchmarks.perf.mesh_throughput \
      --model=random:smollm2_135m --meshes='8,1,1;1,8,1;1,1,8;2,2,2;4,2,1'
  # -> benchmarks/results/cpu/mesh_throughput.json (and .csv)
  # one GPU:
  python -m benchmarks.perf.mesh_throughput --model=smollm2-135m-instruct --meshes='1,1,1' \
      --batch=32 --seq_len=1024 --dtype=bfloat16

Workloads: `sft` (sft_step.train_step, batch x seq tokens), `pm`
(preference.model.train_step on batch pairs, so 2 x batch x seq tokens),
`ppo` (learner.train_step on a minibatch of batch rollouts, prompt seq/4 and
response 3seq/4, value head on the shared backbone) and `decode` (the sampler,
prompt seq/4, --new_tokens new tokens).

For every (workload, mesh): compile seconds, steady-state seconds per step,
tokens/s, tokens/s per device and MFU = model FLOPs per second / (peak FLOP/s
x devices). Peak: the device's bf16 datasheet number on GPU/TPU, and on CPU
the best fp32 matmul rate measured here (so CPU MFU says how close the step
is to what this machine's matmuls can do).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import gc
import json
import os
import time
from collections.abc import Callable

import jax
import numpy as np
from absl import app, flags

from cai_jax.checkpoints.load import load_model
from cai_jax.model import transformer
from cai_jax.model.sharding import Sharder, make_mesh
from benchmarks.common import outputs, peaks
from cai_jax.model import heads
from cai_jax import distributed
from cai_jax.data import comparisons
from cai_jax.preference import model as pm
from cai_jax.rl import learner
from cai_jax.training import sft_step
from cai_jax.sampling.sampler import Sampler, sequence_keys
from cai_jax.training import optim

_MODEL = flags.DEFINE_string("model", "random:smollm2_135m", "load_model spec.")
_MESHES = flags.DEFINE_string("meshes", "8,1,1;1,8,1;1,1,8;2,2,2;4,2,1",
                              "';'-separated (data,fsdp,tensor) shapes.")
_WORKLOADS = flags.DEFINE_list("workloads", ["sft", "pm", "ppo", "decode"],
                               "Any of sft, pm, ppo, decode.")
_BATCH = flags.DEFINE_integer("batch", 8, "Sequences per step.")
_SEQ = flags.DEFINE_integer("seq_len", 256, "Training sequence length.")
_NEW = flags.DEFINE_integer("new_tokens", 32, "Decode: new tokens (prompt = seq_len / 4).")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps (after one warm-up).")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Compute dtype.")
_ATTN = flags.DEFINE_enum("attention_impl", "xla", ["xla", "cudnn"],
                          "Training steps' attention (cudnn: GPU flash attention, bf16).")
_REMAT = flags.DEFINE_enum("remat", "none", ["none", "full"], "Layer rematerialisation.")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Per-device peak; 0: datasheet/measured.")
_OUT = flags.DEFINE_string("out", "", "JSON results path, a CSV beside it (default:"
                           " benchmarks/results/<machine>/mesh_throughput.json).")

def measured_matmul_tflops() -> float:
  """Best fp32 matmul rate of one device here (the CPU's practical peak)."""
  return peaks.jax_matmul_flops("float32", (512, 1024)) / 1e12


def device_peak_tflops() -> tuple[float, str]:
  if _PEAK.value:
    return _PEAK.value, "flag"
  kind = jax.devices()[0].device_kind
  peak = peaks.datasheet_bf16_tflops(kind)
  if peak:
    return peak, f"{kind} bf16 datasheet"
  # CPU: the forced host devices share the same cores, so the whole machine's
  # rate is the budget of all of them together.
  return measured_matmul_tflops() / len(jax.devices()), "measured fp32 matmul / devices"


@dataclasses.dataclass
class Workload:
  name: str
  step: Callable[[], object]  # runs one step, returns something to block on
  tokens_per_step: int
  flops_per_step: float


def train_state(params, abstract, param_sh, sharder: Sharder):
  """(AdamW, schedule, state shardings, state) for `params`, laid out on the mesh."""
  import ml_collections
  ocfg = ml_collections.ConfigDict(dict(lr=1e-5, pretrain_lr=1e-5, warmup_steps=1,
                                        decay="constant", end_lr_ratio=1.0, b1=0.9,
                                        b2=0.95, eps=1e-8, weight_decay=0.0, clip_norm=1.0))
  tx, schedule = optim.make_optimizer(ocfg, 100, abstract)
  state_sh = optim.train_state_shardings(tx, abstract, param_sh, sharder)
  state = jax.jit(lambda p: optim.init_train_state(p, tx, jax.random.key(0)),
                  out_shardings=state_sh)(params)
  return tx, schedule, state_sh, state


def with_head(cfg, params, sharder: Sharder):
  """(abstract, shardings, params) of the backbone plus a scalar head (PM, value)."""
  head = jax.jit(functools.partial(heads.init_head, cfg),
                 out_shardings=heads.head_shardings(cfg, sharder))(jax.random.key(1))
  abstract = {"backbone": transformer.abstract_params(cfg), "head": jax.eval_shape(lambda: head)}
  return abstract, heads.scalar_model_shardings(cfg, sharder), {"backbone": params,
                                                                 "head": head}


def stepper(step, state):
  holder = {"state": state}

  def run():
    holder["state"], metrics = step(holder["state"])
    return metrics
  return run


def sft_workload(cfg, params, sharder: Sharder) -> Workload:
  B, T = _BATCH.value, _SEQ.value
  cfg = cfg.replace(dtype=_DTYPE.value, remat=_REMAT.value, attention_impl=_ATTN.value)
  abstract = transformer.abstract_params(cfg)
  param_sh = transformer.param_shardings(cfg, sharder)
  tx, schedule, state_sh, state = train_state(params, abstract, param_sh, sharder)
  batch_sh = sharder.sharding(("batch", "seq"))
  rs = np.random.RandomState(0)
  tokens = rs.randint(0, cfg.vocab_size, size=(B, T + 1)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "input_mask": np.ones((B, T), bool), "loss_mask": np.ones((B, T), bool)}
  batch = {k: jax.device_put(v, batch_sh) for k, v in batch.items()}
  step = jax.jit(functools.partial(sft_step.train_step, cfg=cfg, tx=tx, schedule=schedule,
                                   sharder=sharder, microbatches=1, loss_chunk=128),
                 in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, sharder.replicated),
                 donate_argnums=0)
  # Forward + backward = 3x the forward FLOPs.
  return Workload("sft", stepper(lambda s: step(s, batch), state), B * T,
                  3 * B * T * cfg.flops_per_token(T // 2))


def pm_workload(cfg, params, sharder: Sharder) -> Workload:
  B, T = _BATCH.value, _SEQ.value
  cfg = cfg.replace(dtype=_DTYPE.value, remat=_REMAT.value, attention_impl=_ATTN.value)
  abstract, param_sh, model = with_head(cfg, params, sharder)
  tx, schedule, state_sh, state = train_state(model, abstract, param_sh, sharder)
  rs = np.random.RandomState(0)
  lengths = rs.randint(T // 2, T + 1, size=(B, 2))
  batch = {"tokens": rs.randint(0, cfg.vocab_size, size=(B, 2, T)).astype(np.int32),
           "mask": np.arange(T)[None, None] < lengths[..., None],
           "p_a": rs.rand(B).astype(np.float32), "valid": np.ones(B, bool)}
  batch_sh = comparisons.batch_shardings(sharder)
  batch = distributed.batch_to_global(batch, batch_sh)
  step = jax.jit(functools.partial(pm.train_step, cfg=cfg, tx=tx,
                                   schedule=schedule, sharder=sharder, microbatches=1),
                 in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, sharder.replicated),
                 donate_argnums=0)
  return Workload("pm", stepper(lambda s: step(s, batch), state), 2 * B * T,
                  3 * 2 * B * T * cfg.flops_per_token(T // 2))


def ppo_workload(cfg, params, sharder: Sharder) -> Workload:
  B, T = _BATCH.value, _SEQ.value
  P = max(T // 4, 1)
  M = T - P
  cfg = cfg.replace(dtype=_DTYPE.value, remat=_REMAT.value, attention_impl=_ATTN.value)
  abstract, param_sh, model = with_head(cfg, params, sharder)
  tx, _, state_sh, state = train_state(model, abstract, param_sh, sharder)
  rs = np.random.RandomState(0)
  seq = rs.randint(0, cfg.vocab_size, size=(B, P + M)).astype(np.int32)
  lengths = rs.randint(M // 2, M + 1, size=B)
  mask = (np.arange(M)[None] < lengths[:, None]).astype(np.float32)
  mb = {"inputs": seq[:, :-1], "input_mask": np.ones((B, P + M - 1), bool),
        "targets": seq[:, P:], "mask": mask,
        "old_logp": -rs.rand(B, M).astype(np.float32) * 5,
        "old_values": rs.randn(B, M).astype(np.float32),
        "adv": rs.randn(B, M).astype(np.float32),
        "returns": rs.randn(B, M).astype(np.float32)}
  row_sh = sharder.sharding(("batch", None))
  mb = {k: jax.device_put(v, row_sh) for k, v in mb.items()}
  step = jax.jit(functools.partial(learner.train_step, tx=tx, microbatches=1, sharder=sharder,
                                   cfg=cfg, prompt_len=P, temperature=1.0, chunk=128,
                                   clip_eps=0.2, value_clip=0.2, vf_coef=0.1, ent_coef=0.0),
                 in_shardings=(state_sh, row_sh), out_shardings=(state_sh, sharder.replicated),
                 donate_argnums=0)
  return Workload("ppo", stepper(lambda s: step(s, mb), state), B * (P + M - 1),
                  3 * B * (P + M - 1) * cfg.flops_per_token((P + M) // 2))


def decode_workload(cfg, params, sharder: Sharder) -> Workload:
  B, M = _BATCH.value, _NEW.value
  P = max(_SEQ.value // 4, 1)
  cfg = cfg.replace(dtype=_DTYPE.value)
  sampler = Sampler(cfg, max_new_tokens=M, stop_ids=(), pad_id=0, sharder=sharder,
                    length_buckets=(P,))
  prompts = [list(range(1, P + 1))] * B
  keys = sequence_keys(0, range(B))
  return Workload("decode", lambda: sampler.generate(params, prompts, keys).tokens, B * M,
                  B * (P * cfg.flops_per_token(P // 2) + M * cfg.flops_per_token(P + M // 2)))


WORKLOADS = {"sft": sft_workload, "pm": pm_workload, "ppo": ppo_workload,
             "decode": decode_workload}


def measure(w: Workload) -> tuple[float, float]:
  t = time.perf_counter()
  jax.block_until_ready(w.step())
  first = time.perf_counter() - t
  times = []
  for _ in range(_STEPS.value):
    t = time.perf_counter()
    jax.block_until_ready(w.step())
    times.append(time.perf_counter() - t)
  step = float(np.median(times))
  return max(first - step, 0.0), step


def main(argv):
  del argv
  peak, peak_source = device_peak_tflops()
  rows = []
  for shape_text in _MESHES.value.split(";"):
    shape = tuple(int(x) for x in shape_text.split(","))
    sharder = Sharder(make_mesh(shape, jax.devices()[:int(np.prod(shape))]))
    n = sharder.mesh.devices.size
    cfg, params, _ = load_model(_MODEL.value, sharder)
    for name in _WORKLOADS.value:
      w = WORKLOADS[name](cfg, params, sharder)
      compile_s, step_s = measure(w)
      tps = w.tokens_per_step / step_s
      row = {"workload": name, "mesh": "x".join(map(str, shape)), "devices": n,
             "compile_s": round(compile_s, 2), "step_s": round(step_s, 4),
             "tokens_per_s": round(tps, 1), "tokens_per_s_per_device": round(tps / n, 1),
             "mfu": round(w.flops_per_step / step_s / (peak * 1e12 * n), 4)}
      rows.append(row)
      print(json.dumps(row), flush=True)
      del w  # its train state: free it before the next workload builds one
      gc.collect()
    del params
    jax.clear_caches()
  header = ["workload", "mesh", "devices", "compile_s", "step_s", "tokens_per_s",
            "tokens_per_s_per_device", "mfu"]
  print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
  for r in rows:
    print("| " + " | ".join(str(r[h]) for h in header) + " |")
  print(f"\npeak per device: {peak:.3f} TFLOP/s ({peak_source}); device:"
        f" {jax.devices()[0].device_kind}; model {_MODEL.value}")
  out = outputs.write(outputs.path("mesh_throughput", _OUT.value), {
      "peak_tflops_per_device": peak, "peak_source": peak_source,
      "device": jax.devices()[0].device_kind, "model": _MODEL.value,
      "batch": _BATCH.value, "seq_len": _SEQ.value, "dtype": _DTYPE.value,
      "attention_impl": _ATTN.value, "rows": rows})
  with open(os.path.splitext(out)[0] + ".csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=header)
    writer.writeheader()
    writer.writerows(rows)
  print(out)


if __name__ == "__main__":
  app.run(main)
