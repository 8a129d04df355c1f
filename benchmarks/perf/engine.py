"""Continuous batching vs a static batch: useful tokens per second on uneven lengths.

  python -m benchmarks.perf.engine --workdir=runs/cai --slots=8
  # -> benchmarks/results/cpu/engine.json

Workloads (each request: prompt token ids and the number of tokens it generates):
- `stage8` / `stage2` (with `--workdir`): the prompts and answer lengths a real run's
  stage 8 (the first `--max_requests` / models answers of each model) and stage 2
  (revisions) produced, in the order written;
- `longtail`: `--longtail_requests` random prompts of 16-96 tokens with output lengths
  drawn log-normal (median 48) and capped at `--longtail_max` (512 by default).

Every side generates exactly each request's length (no stop token, the same weights):
- the engine (`cai_jax.sampling.engine.Engine`) with `--slots` slots, each request's own
  `max_new_tokens`;
- the static sampler (`Sampler`), the requests in batches of `--slots` in the same order,
  each batch decoding to its longest request: what a static batch does when its sequences
  stop at those lengths;
- transformers `generate` on the same batches (`--torch`).
Useful tokens are the requests' lengths; each side's compile / warm-up pass is run first
and not timed. Also reported: each side's idle share (slot-steps that carried no live
sequence) and the engine's model FLOP/s (2 x parameters per token, attention excluded) as
a fraction of the machine's measured float32 matmul rate.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import jax
import numpy as np
from absl import app, flags

from benchmarks.common import outputs, peaks
from cai_jax import paths, records
from cai_jax.checkpoints import hf
from cai_jax.checkpoints.load import load_model
from cai_jax.evaluation import answers as ans
from cai_jax.sampling.engine import Engine
from cai_jax.sampling.sampler import Sampler, sequence_keys
from cai_jax.text.chat import user_turn

_MODEL = flags.DEFINE_string("model", "smollm2-135m-instruct", "Model spec.")
_WORKDIR = flags.DEFINE_string("workdir", "", "A run's workdir for the stage2/stage8 workloads.")
_WORKLOADS = flags.DEFINE_list("workloads", ["stage8", "stage2", "longtail"], "Which.")
_SLOTS = flags.DEFINE_integer("slots", 8, "Engine slots = static batch size.")
_STEPS = flags.DEFINE_integer("steps_per_call", 16, "Engine decode steps per device call.")
_MAX_REQUESTS = flags.DEFINE_integer("max_requests", 96, "Requests per real workload (first N).")
_LONGTAIL_N = flags.DEFINE_integer("longtail_requests", 32, "Requests of the long-tail workload.")
_LONGTAIL_MAX = flags.DEFINE_integer("longtail_max", 512, "Longest output of the long tail.")
_TORCH = flags.DEFINE_bool("torch", True, "Also time transformers generate.")
_OUT = flags.DEFINE_string("out", "", "Write results JSON here (default:"
                           " benchmarks/results/<machine>/engine.json).")


def _real(workdir: str, stage: str, tok, n: int) -> tuple[list[list[int]], list[int]]:
  """(prompt ids, output lengths) of a run's stage-8 answers or stage-2 revisions."""
  if stage == "stage8":  # the same share of each model's answers, in the order written
    root = os.path.join(paths.stage_dir(workdir, paths.EVALUATION), "answers")
    names = sorted(os.listdir(root))
    rows = [(r.prompt, r.response) for name in names
            for r in records.read_records(os.path.join(root, name),
                                          ans.AnswerRecord)[:-(-n // len(names))]]
  else:
    rows = [(r.prompt, r.response_at(-1)) for r in records.read_records(
        paths.stage_dir(workdir, paths.CRITIQUE_REVISION), records.CritiqueRevisionRecord)
        if r.rounds]
  rows = rows[:n]
  prompts = [tok.encode(tok.apply_chat_template(user_turn(p))) for p, _ in rows]
  lengths = [len(tok.encode(a, add_bos=False)) + 1 for _, a in rows]  # + the end token
  return prompts, lengths


def _longtail(n: int, cap: int, vocab: int) -> tuple[list[list[int]], list[int]]:
  rs = np.random.RandomState(0)
  prompts = [list(rs.randint(100, min(vocab, 30000), size=rs.randint(16, 97))) for _ in range(n)]
  lengths = np.clip(np.round(np.exp(rs.normal(np.log(48), 1.0, size=n))), 1, cap)
  return prompts, [int(x) for x in lengths]


def _batches(n: int, size: int) -> list[range]:
  return [range(i, min(i + size, n)) for i in range(0, n, size)]


def time_engine(cfg, params, prompts, lengths, slots, steps) -> dict:
  M = max(lengths)
  eng = Engine(cfg, slots=slots, max_new_tokens=M, stop_ids=(), pad_id=0,
               steps_per_call=steps)
  keys = sequence_keys(0, range(len(prompts)))
  eng.generate(params, prompts, keys, max_new_tokens=lengths)  # compile
  t = time.perf_counter()
  out = eng.generate(params, prompts, keys, max_new_tokens=lengths)
  secs = time.perf_counter() - t
  assert list(out.lengths) == list(lengths)
  s = eng.stats
  return {"seconds": secs, "decode_steps": s.decode_steps, "device_calls": s.generate_calls,
          "prefills": s.prefills,
          # wall time outside the waits for the device: the host loop's scheduling
          "host_share": max(0.0, 1 - s.wait_seconds / secs),
          "idle_share": 1 - s.busy_slot_steps / max(s.decode_steps * slots, 1)}


def time_static(cfg, params, prompts, lengths, slots) -> dict:
  batches = _batches(len(prompts), slots)
  samplers = {}
  for b in batches:  # compile every batch's length first
    m = max(lengths[i] for i in b)
    samplers.setdefault(m, Sampler(cfg, max_new_tokens=m, stop_ids=(), pad_id=0))
  for b in batches:
    samplers[max(lengths[i] for i in b)].generate(
        params, [prompts[i] for i in b], sequence_keys(0, b))
  t = time.perf_counter()
  steps = 0
  for b in batches:
    m = max(lengths[i] for i in b)
    samplers[m].generate(params, [prompts[i] for i in b], sequence_keys(0, b))
    steps += m * slots
  secs = time.perf_counter() - t
  return {"seconds": secs, "batches": len(batches), "compiled_lengths": len(samplers),
          "idle_share": 1 - sum(lengths) / steps}


def time_torch(model, prompts, lengths, slots) -> dict:
  import torch
  model.generation_config.eos_token_id = None  # no early stop, as on our side

  def run():
    for b in _batches(len(prompts), slots):
      rows = [prompts[i] for i in b]
      T = max(len(r) for r in rows)
      ids = torch.tensor([[0] * (T - len(r)) + list(r) for r in rows])
      mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
      with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=mask, do_sample=False, use_cache=True,
                       max_new_tokens=max(lengths[i] for i in b), pad_token_id=0)
  run()  # warm-up
  t = time.perf_counter()
  run()
  return {"seconds": time.perf_counter() - t}


def main(argv):
  del argv
  cfg, params, tok = load_model(_MODEL.value)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  matmul = peaks.jax_matmul_flops("float32", (512, 1024, 2048))
  results = {"model": _MODEL.value, "device": str(jax.devices()[0].device_kind),
             "cpu_count": os.cpu_count(), "slots": _SLOTS.value,
             "steps_per_call": _STEPS.value, "matmul_flops": matmul, "workloads": {}}
  loads = {}
  for w in _WORKLOADS.value:
    if w == "longtail":
      loads[w] = _longtail(_LONGTAIL_N.value, _LONGTAIL_MAX.value, cfg.vocab_size)
    elif _WORKDIR.value:
      loads[w] = _real(_WORKDIR.value, w, tok, _MAX_REQUESTS.value)
  # All JAX runs first, then transformers' (its OpenMP threads keep spinning after).
  for w, (prompts, lengths) in loads.items():
    useful = sum(lengths)
    e = time_engine(cfg, params, prompts, lengths, _SLOTS.value, _STEPS.value)
    s = time_static(cfg, params, prompts, lengths, _SLOTS.value)
    row = {"requests": len(prompts), "useful_tokens": useful,
           "mean_length": useful / len(lengths), "longest": max(lengths),
           "engine": {**e, "tokens_per_s": useful / e["seconds"]},
           "static": {**s, "tokens_per_s": useful / s["seconds"]}}
    row["engine_over_static"] = row["engine"]["tokens_per_s"] / row["static"]["tokens_per_s"]
    row["engine_fraction_of_matmul_rate"] = 2 * n_params * row["engine"]["tokens_per_s"] / matmul
    results["workloads"][w] = row
  if _TORCH.value:
    import torch
    import transformers
    with tempfile.TemporaryDirectory() as d:
      hf.save_hf(params, cfg, d)
      model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    for w, (prompts, lengths) in loads.items():
      row = results["workloads"][w]
      t = time_torch(model, prompts, lengths, _SLOTS.value)
      row["transformers"] = {**t, "tokens_per_s": row["useful_tokens"] / t["seconds"]}
      row["engine_over_transformers"] = (row["engine"]["tokens_per_s"]
                                         / row["transformers"]["tokens_per_s"])
  for w, row in results["workloads"].items():
    print(w, json.dumps({k: v for k, v in row.items() if not isinstance(v, dict)}))
  print(outputs.write(outputs.path("engine", _OUT.value), results))


if __name__ == "__main__":
  app.run(main)
