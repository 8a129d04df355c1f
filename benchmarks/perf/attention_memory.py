"""Training-step memory and speed of the default `xla` attention against query-chunked
attention (`ModelConfig.attention_chunk`), on CPU, SmolLM2-135M's architecture.

  python -m benchmarks.perf.attention_memory --shapes=8x512,16x1024 \
      --chunks=0,128 --repeats=2  # -> benchmarks/results/cpu/attention_memory.json

The `xla` path (chunk 0) keeps the [B, N, T, T] float32 scores of every layer for
the backward pass; with `attention_chunk=C` the queries go in chunks of C, each
rematerialised in the backward, so the scores held are [B, N, C, T]: linear in T.
Each (shape, chunk) is one SFT step (`training.sft_step.train_step`, the stage's
function: fp32, no remat, logits in chunks of 128 tokens, AdamW) in its own
subprocess, so its peak RSS is its own:

- the compiled step's memory from XLA's `memory_analysis()` (arguments + outputs −
  aliased + temporaries), for every shape, nothing allocated;
- then, where that plan fits under `--max_timed_gib` of this machine's RAM, `--steps`
  timed steps after one untimed one (random weights and tokens; the same rows for
  every variant) and the process's peak RSS.

`--lora_ranks=0,16` adds LoRA variants (`cai_jax.model.lora` on every projection: the
adapters and their AdamW moments are the state, the base a frozen argument), the
stage's own LoRA step.

Variants (chunk × rank) run in the order A, B, A, B, ... (`--repeats`), so on this noisy
shared box a ratio is read from one run, alternated; each row keeps its repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

from benchmarks.common import outputs

GIB = 2**30


def worker(B: int, T: int, chunk: int, rank: int, steps: int, max_timed_gib: float) -> dict:
  import functools

  import jax
  import ml_collections
  import numpy as np

  from cai_jax.checkpoints.load import byte_tokenizer, random_model
  from cai_jax.model import lora, transformer
  from cai_jax.model.sharding import Sharder, make_mesh
  from cai_jax.training import optim, sft_step

  sharder = Sharder(make_mesh((1, 1, 1), jax.devices()[:1]))
  cfg, params = random_model("smollm2_135m", byte_tokenizer(), sharder, jax.random.key(0),
                             dtype="float32", remat="none", attention_chunk=chunk)
  c = ml_collections.ConfigDict(dict(lr=1e-5, warmup_steps=0, decay="constant",
                                     end_lr_ratio=1.0, b1=0.9, b2=0.95, eps=1e-8,
                                     weight_decay=0.0, clip_norm=1.0))
  spec = lora.LoraSpec(rank, 16.0, tuple(lora.TARGETS)) if rank else None
  if spec:  # the stage's LoRA: adapters train, the base is a frozen argument
    abstract, param_sh = lora.abstract_adapters(cfg, spec), lora.adapter_shardings(cfg, spec,
                                                                                  sharder)
    frozen, params = params, lora.init_adapters(cfg, spec, jax.random.key(1))
  else:
    abstract, param_sh = transformer.abstract_params(cfg), transformer.param_shardings(cfg,
                                                                                     sharder)
    frozen = None
  tx, schedule = optim.make_optimizer(c, steps + 1, abstract)
  state_sh = optim.train_state_shardings(tx, abstract, param_sh, sharder)
  frozen_sh = transformer.param_shardings(cfg, sharder) if spec else None
  batch_sh = sharder.sharding(("batch", "seq"))
  step = jax.jit(functools.partial(sft_step.train_step, cfg=cfg, tx=tx, schedule=schedule,
                                   sharder=sharder, microbatches=1, loss_chunk=128,
                                   lora=spec),
                 in_shardings=(state_sh, batch_sh, frozen_sh),
                 out_shardings=(state_sh, sharder.replicated), donate_argnums=0)
  rows = np.random.default_rng(0).integers(3, 256, (2 * B, T + 1), np.int32)
  loss_mask = np.zeros((B, T), bool)
  loss_mask[:, T // 2:] = True  # the second half is the "response", as in sft_throughput

  def batch_at(i):
    r = rows[(i * B + np.arange(B)) % len(rows)]
    return jax.device_put({"inputs": r[:, :T], "targets": r[:, 1:], "input_mask":
                           np.ones((B, T), bool), "loss_mask": loss_mask}, batch_sh)

  state = jax.jit(lambda p, k: optim.init_train_state(p, tx, k), out_shardings=state_sh,
                  donate_argnums=0)(params, jax.random.key(0))
  del params
  t0 = time.perf_counter()
  compiled = step.lower(state, batch_at(0), frozen).compile()
  out = {"compile_s": time.perf_counter() - t0}
  m = compiled.memory_analysis()
  out.update(argument_gib=m.argument_size_in_bytes / GIB, temp_gib=m.temp_size_in_bytes / GIB,
             peak_plan_gib=(m.argument_size_in_bytes + m.output_size_in_bytes
                            - m.alias_size_in_bytes + m.temp_size_in_bytes) / GIB)
  if out["peak_plan_gib"] > max_timed_gib:
    out["timed"] = f"not run: the plan ({out['peak_plan_gib']:.1f} GiB) exceeds --max_timed_gib"
    return out
  state, m0 = compiled(state, batch_at(0), frozen)  # untimed: first touch of every buffer
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  losses = [float(m0["loss"])]
  for i in range(1, steps + 1):
    state, mi = compiled(state, batch_at(i), frozen)
    losses.append(mi["loss"])
  jax.block_until_ready(state)
  secs = time.perf_counter() - t0
  out.update(timed=True, step_s=secs / steps, tokens_per_s=B * T * steps / secs,
             losses=[float(x) for x in losses],
             peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB)
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--shapes", default="8x512,16x1024", help="BxT,...")
  ap.add_argument("--chunks", default="0,128", help="attention_chunk values; 0 = xla path")
  ap.add_argument("--lora_ranks", default="0",
                  help="LoRA ranks (every projection, alpha 16); 0 = full fine-tuning")
  ap.add_argument("--steps", type=int, default=2, help="timed steps per process")
  ap.add_argument("--repeats", type=int, default=2, help="alternated processes per variant")
  ap.add_argument("--max_timed_gib", type=float, default=18.0,
                  help="time only steps whose compiled plan is below this (GiB of RAM)")
  ap.add_argument("--out", default="",
                  help="results JSON (default: benchmarks/results/cpu/attention_memory.json)")
  ap.add_argument("--worker", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.worker:
    B, T, chunk, rank = (int(x) for x in args.worker.split(","))
    print(json.dumps(worker(B, T, chunk, rank, args.steps, args.max_timed_gib)))
    return
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = outputs.REPO
  shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
  chunks = [(int(c), int(r)) for c in args.chunks.split(",")
            for r in args.lora_ranks.split(",")]
  results = {"command": "python -m benchmarks.perf.attention_memory " + " ".join(sys.argv[1:]),
             "model": "random:smollm2_135m", "dtype": "float32", "remat": "none",
             "loss_chunk": 128, "machine": {"platform": platform.platform(),
                                            "cpus": os.cpu_count(),
                                            "load_avg_start": os.getloadavg()},
             "rows": []}
  for B, T in shapes:
    runs: dict[tuple, list[dict]] = {c: [] for c in chunks}
    for rep in range(args.repeats):
      for c in chunks:
        if rep and runs[c] and runs[c][-1].get("timed") is not True:
          continue  # a plan alone: the same on every repeat
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "benchmarks.perf.attention_memory",
                               f"--worker={B},{T},{c[0]},{c[1]}", f"--steps={args.steps}",
                               f"--max_timed_gib={args.max_timed_gib}"],
                              env=env, capture_output=True, text=True)
        if proc.returncode:
          r = {"error": proc.stderr[-2000:]}
        else:
          r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["wall_s"] = time.perf_counter() - t0
        runs[c].append(r)
        print(f"{B}x{T} chunk {c[0]} lora {c[1]} repeat {rep}: {json.dumps(r)[:400]}", flush=True)
    for c in chunks:
      results["rows"].append({"batch": B, "seq": T, "attention_chunk": c[0], "lora_rank": c[1],
                              "runs": runs[c]})
  results["machine"]["load_avg_end"] = os.getloadavg()
  print(outputs.write(outputs.path("attention_memory", args.out, device_kind="cpu"), results))


if __name__ == "__main__":
  main()
