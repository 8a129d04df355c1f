"""Packed vs unpacked SFT steps on a real run's data: real tokens per second and the
padding share of each.

  python -m benchmarks.perf.packing --workdir=runs/cai   # -> benchmarks/results/cpu/packing.json

Stage 3's own data path (`p3_sft.load_data`: the run's stage-2 records, the `cpu`
preset's tokenization, buckets and batch order) gives one epoch of steps; each step runs
as stage 3 runs it (`sft.make_batch`, [batch, bucket] rows) and packed
(`sft.make_packed_batch`, the same conversations several to a row). One gradient step
(mean response-token NLL, value and grad, AdamW update) per batch; every distinct shape
is compiled in a warm-up pass first, then the two ways alternate step by step (A/B on a
noisy box). Real tokens are the model inputs of the conversations, padding excluded;
the packed and unpacked losses of each step are compared (they must agree).
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from benchmarks.common import outputs
from cai_jax.checkpoints.load import load_model
from cai_jax.configs import pipeline as pipeline_config
from cai_jax.data import batching, sft
from cai_jax.phases import p3_sft
from cai_jax.training import sft_step

_WORKDIR = flags.DEFINE_string("workdir", "runs/cai", "A run whose stage 2 has written records.")
_PRESET = flags.DEFINE_string("preset", "cpu", "The pipeline preset whose SFT config to use.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed passes over the epoch (best is reported).")
_OUT = flags.DEFINE_string("out", "", "Write results JSON here (default:"
                           " benchmarks/results/<machine>/packing.json).")


def main(argv):
  del argv
  c = pipeline_config.get_config(_PRESET.value).sft
  cfg, params, tok = load_model(c.model)
  train, held = p3_sft.load_data(c, _WORKDIR.value, tok)
  plan = batching.plan(train, held, c.data, c.train, c.seed, "examples")
  steps = [plan.order.batch(s) for s in range(plan.order.per_epoch)]
  tx = optax.adamw(1e-5)

  def loss(p, batch):
    total, stats = sft_step.sft_loss_fn(p, batch, cfg=cfg, sharder=None, loss_chunk=0)
    return total / stats["loss_tokens"]

  @jax.jit
  def step(p, opt, batch):
    value, grads = jax.value_and_grad(loss)(p, batch)
    updates, opt = tx.update(grads, opt, p)
    return optax.apply_updates(p, updates), opt, value

  ways = {"unpacked": lambda rows, T: sft.make_batch(train, rows, T, tok.pad_id),
          "packed": lambda rows, T: sft.make_packed_batch(train, rows, T, tok.pad_id)}
  batches = {w: [jax.tree.map(jnp.asarray, make(rows, T)) for T, rows in steps]
             for w, make in ways.items()}
  real = sum(float(b["input_mask"].sum()) for b in batches["unpacked"])
  opt = tx.init(params)
  losses = {w: [] for w in ways}
  for w in ways:  # warm-up: every shape compiles; the first-step losses are compared
    for b in batches[w]:
      _, _, v = step(params, opt, b)
      losses[w].append(float(v))
  best = {w: float("inf") for w in ways}
  for _ in range(_REPEATS.value):
    spent = {w: 0.0 for w in ways}
    for i in range(len(steps)):
      for w in ways:  # alternate A/B step by step; the params are not updated
        t = time.perf_counter()
        jax.block_until_ready(step(params, opt, batches[w][i]))
        spent[w] += time.perf_counter() - t
    best = {w: min(best[w], spent[w]) for w in ways}
  res = {"workdir": _WORKDIR.value, "preset": _PRESET.value, "steps": len(steps),
         "batch_size": c.train.batch_size, "real_tokens": real,
         "max_loss_difference": float(np.max(np.abs(np.subtract(losses["packed"],
                                                                losses["unpacked"])))),
         "ways": {}}
  for w in ways:
    padded = sum(int(np.prod(b["inputs"].shape)) for b in batches[w])
    res["ways"][w] = {"seconds": best[w], "real_tokens_per_s": real / best[w],
                      "padded_tokens": padded, "padding_share": 1 - real / padded,
                      "shapes": sorted({tuple(b["inputs"].shape) for b in batches[w]})}
  res["packed_over_unpacked"] = (res["ways"]["packed"]["real_tokens_per_s"]
                                 / res["ways"]["unpacked"]["real_tokens_per_s"])
  print(json.dumps({w: {k: v for k, v in r.items() if k != "shapes"}
                    for w, r in res["ways"].items()}))
  print("packed / unpacked", res["packed_over_unpacked"], "max |loss diff|",
        res["max_loss_difference"])
  print(outputs.write(outputs.path("packing", _OUT.value), res))


if __name__ == "__main__":
  app.run(main)
