"""Where a `generate` call's time goes: a jax.profiler trace, summed per HLO op.

  python -m benchmarks.perf.profile_decode --batch=32 --decode_layers=scan --top=25

Prints each executed XLA op (thunk) with its total time over one call and
its count, labelled with the jax op it came from (the HLO op_name metadata),
e.g. `ynn_fusion BTD,DF->BTF/dot_general`. Ops that run concurrently on
different threads each count their full time, so the column can add up to
more than the wall time. This is how the scan's per-step weight and cache
slice copies (`dynamic-slice` fusions) were found.
"""

from __future__ import annotations

import collections
import glob
import re
import tempfile
import time

import jax
import numpy as np
from absl import app, flags

from cai_jax.checkpoints.load import load_model
from cai_jax.sampling import sampler as sampler_lib

_MODEL = flags.DEFINE_string("model", "smollm2-135m-instruct", "Model spec.")
_BATCH = flags.DEFINE_integer("batch", 32, "Sequences.")
_PROMPT = flags.DEFINE_integer("prompt_len", 64, "Prompt tokens per sequence.")
_NEW = flags.DEFINE_integer("new_tokens", 128, "New tokens per sequence.")
_DECODE_LAYERS = flags.DEFINE_enum("decode_layers", "unrolled", ["unrolled", "scan"],
                                   "ModelConfig.decode_layers.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weights and compute.")
_TOP = flags.DEFINE_integer("top", 30, "Ops to print.")


def op_names(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> the jax op it came from (shortened op_name)."""
  names = {}
  for m in re.finditer(r'^\s*(?:ROOT )?%([\w.-]+) = .*?op_name="([^"]*)"', hlo_text, re.M):
    names[m.group(1)] = re.sub(r"jit\(\w+\)/|while/body/|closed_call/", "", m.group(2))[:60]
  return names


def main(argv):
  del argv
  cfg, params, _ = load_model(_MODEL.value, param_dtype=_DTYPE.value, dtype=_DTYPE.value,
                              decode_layers=_DECODE_LAYERS.value)
  B, T = _BATCH.value, _PROMPT.value
  sampler = sampler_lib.Sampler(cfg, max_new_tokens=_NEW.value, stop_ids=(), pad_id=0,
                                length_buckets=(T,))
  rs = np.random.RandomState(0)
  prompts = [list(rs.randint(100, min(cfg.vocab_size, 30000), size=T)) for _ in range(B)]
  keys = sampler_lib.sequence_keys(0, range(B))
  sampler.generate(params, prompts, keys)  # compile
  t = time.perf_counter()
  sampler.generate(params, prompts, keys)
  wall = time.perf_counter() - t

  compiled = sampler_lib._compiled_sample(*sampler._key(sampler_lib.SamplingParams()))
  key_data = np.asarray(jax.random.key_data(keys))
  hlo = compiled.lower(params, np.zeros((B, T), np.int32), np.ones((B, T), bool),
                       key_data).compile().as_text()
  names = op_names(hlo)
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d)
    sampler.generate(params, prompts, keys)
    jax.profiler.stop_trace()
    trace = jax.profiler.ProfileData.from_file(
        glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0])
  total, count = collections.Counter(), collections.Counter()
  for plane in trace.planes:
    for line in plane.lines:
      for event in line.events:
        if event.name not in names:
          continue  # runtime bookkeeping, not an XLA op
        label = re.sub(r"\.\d+$", "", event.name) + "  " + names[event.name]
        total[label] += event.duration_ns
        count[label] += 1
  print(f"{_MODEL.value}, batch {B}, prompt {T}, {_NEW.value} new tokens,"
        f" decode_layers={_DECODE_LAYERS.value}: {wall:.2f} s"
        f" ({B * _NEW.value / wall:.1f} tok/s) without the profiler")
  print(f"{'ms':>9}  {'calls':>6}  op")
  for label, ns in total.most_common(_TOP.value):
    print(f"{ns / 1e6:9.1f}  {count[label]:6d}  {label}")


if __name__ == "__main__":
  app.run(main)
