"""Decode throughput: our jit sampler vs transformers `generate`, same weights.

  python -m benchmarks.perf.decode --model=smollm2-135m-instruct --batch_sizes=1,8,32 \
      --prompt_len=64 --new_tokens=128  # -> benchmarks/results/cpu/decode.json

  # on a GPU (transformers on CUDA), bf16 weights, a 1B model too:
  python -m benchmarks.perf.decode --model=random:llama3_2_1b --dtype=bfloat16 \
      --batch_sizes=1,8,32,128 --out=/tmp/decode_gpu.json

Both sides run greedy decoding with a KV cache, the same weights (`--dtype`;
fp32 by default), the same prompt tokens and exactly `new_tokens` new tokens
per sequence (no early stop). transformers runs on CUDA when JAX's default
backend is a GPU, else on the CPU. The batch-1 rate is also given as a
fraction of the memory-bandwidth limit: each decode step must read every
weight once, so the limit is bandwidth / weight bytes tokens per second;
bandwidth is measured here (`benchmarks/common/peaks.py`: the faster of a jitted and
a numpy sum over 1 GiB on a CPU, a jitted sum over 4 GiB on an accelerator).
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time

import jax
import numpy as np
from absl import app, flags

from benchmarks.common import outputs, peaks

from cai_jax.checkpoints import hf
from cai_jax.checkpoints.load import load_model
from cai_jax.sampling.sampler import Sampler, sequence_keys

_MODEL = flags.DEFINE_string("model", "smollm2-135m-instruct", "Model spec.")
_BATCHES = flags.DEFINE_list("batch_sizes", ["1", "8", "32"], "Batch sizes.")
_PROMPT = flags.DEFINE_integer("prompt_len", 64, "Prompt tokens per sequence.")
_NEW = flags.DEFINE_integer("new_tokens", 128, "New tokens per sequence.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats (best is reported).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Weight and compute dtype (both sides).")
_DECODE_LAYERS = flags.DEFINE_list(
    "decode_layers", ["unrolled"], "Our decode loop (ModelConfig.decode_layers): unrolled"
    " and/or scan; with both, each is timed in the same run and the first is the headline.")
_TORCH = flags.DEFINE_bool("torch", True, "Also time transformers generate.")
_THREADS = flags.DEFINE_integer("torch_threads", os.cpu_count() or 1, "torch threads.")
_OUT = flags.DEFINE_string("out", "", "Write results JSON here (default:"
                           " benchmarks/results/<machine>/decode.json).")


def _prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
  rs = np.random.RandomState(0)
  return [list(rs.randint(100, min(vocab, 30000), size=length)) for _ in range(batch)]


def time_ours(cfg, params, batch: int, prompt_len: int, new: int, repeats: int) -> dict:
  sampler = Sampler(cfg, max_new_tokens=new, stop_ids=(), pad_id=0,
                    length_buckets=(prompt_len,))
  prompts = _prompts(batch, prompt_len, cfg.vocab_size)
  keys = sequence_keys(0, range(batch))
  t = time.perf_counter()
  out = sampler.generate(params, prompts, keys)
  first = time.perf_counter() - t
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    out = sampler.generate(params, prompts, keys)
    best = min(best, time.perf_counter() - t)
  assert (out.lengths == new).all()
  return {"seconds": best, "tokens_per_s": batch * new / best,
          "compile_seconds": max(first - best, 0.0), "tokens": out.tokens}


def time_torch(model, batch: int, prompt_len: int, new: int, repeats: int, vocab: int) -> dict:
  import torch
  ids = torch.tensor(_prompts(batch, prompt_len, vocab), device=model.device)
  mask = torch.ones_like(ids)
  sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
  model.generation_config.eos_token_id = None  # no early stop, as on our side
  kw = dict(max_new_tokens=new, do_sample=False, use_cache=True, pad_token_id=0)
  with torch.inference_mode():
    model.generate(input_ids=ids, attention_mask=mask, **kw)  # warm-up
    best = float("inf")
    for _ in range(repeats):
      t = time.perf_counter()
      out = model.generate(input_ids=ids, attention_mask=mask, **kw)
      sync()
      best = min(best, time.perf_counter() - t)
  return {"seconds": best, "tokens_per_s": batch * new / best,
          "tokens": out[:, prompt_len:].cpu().numpy()}


def main(argv):
  del argv
  cfg, params, tok = load_model(_MODEL.value, param_dtype=_DTYPE.value, dtype=_DTYPE.value)
  weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  bandwidth = peaks.read_bandwidth_gbs()
  results = {"model": _MODEL.value, "device": str(jax.devices()[0].device_kind),
             "platform": platform.platform(), "cpu_count": os.cpu_count(),
             "xla_flags": os.environ.get("XLA_FLAGS", ""),
             "prompt_len": _PROMPT.value, "new_tokens": _NEW.value, "dtype": _DTYPE.value,
             "weight_bytes": weight_bytes, "bandwidth_gbs": bandwidth,
             "bandwidth_limit_tokens_per_s": bandwidth * 1e9 / weight_bytes, "runs": []}
  model = None
  if _TORCH.value:
    import torch
    import transformers
    torch.set_num_threads(_THREADS.value)
    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as d:
      hf.save_hf(params, cfg, d)  # the same weights for both sides
      model = transformers.AutoModelForCausalLM.from_pretrained(
          d, dtype=getattr(torch, _DTYPE.value)).to(device).eval()
    results["torch_device"] = device
  # All our runs first, then all of transformers': PyTorch's OpenMP workers
  # keep spinning for a while after each parallel region, which would steal
  # the cores from whichever JAX run came next.
  batches = [int(x) for x in _BATCHES.value]
  variants = _DECODE_LAYERS.value  # the first one gives the row's headline numbers
  ours = {(b, u): time_ours(cfg.replace(decode_layers=u), params, b, _PROMPT.value, _NEW.value,
                            _REPEATS.value)
          for b in batches for u in variants}
  for b in batches:
    first = ours[b, variants[0]]
    row = {"batch": b, "decode_layers": variants[0], "ours_tokens_per_s": first["tokens_per_s"],
           "ours_compile_s": first["compile_seconds"]}
    if len(variants) > 1:
      row["ours_by_decode_layers"] = {
          u: {"tokens_per_s": ours[b, u]["tokens_per_s"],
              "compile_s": ours[b, u]["compile_seconds"]} for u in variants}
    if model is not None:
      ref = time_torch(model, b, _PROMPT.value, _NEW.value, _REPEATS.value, cfg.vocab_size)
      row["hf_tokens_per_s"] = ref["tokens_per_s"]
      row["ratio"] = first["tokens_per_s"] / ref["tokens_per_s"]
      row["greedy_tokens_agree"] = float(np.mean(first["tokens"] == ref["tokens"]))
    if b == 1:
      row["fraction_of_bandwidth_limit"] = (
          first["tokens_per_s"] / results["bandwidth_limit_tokens_per_s"])
    results["runs"].append(row)
    print(json.dumps(row))
  print(f"bandwidth {bandwidth:.1f} GB/s; weights {weight_bytes / 1e6:.0f} MB;"
        f" limit {results['bandwidth_limit_tokens_per_s']:.1f} tok/s at batch 1")
  print(outputs.write(outputs.path("decode", _OUT.value), results))


if __name__ == "__main__":
  app.run(main)
