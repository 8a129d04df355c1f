"""DPO training step: ours (`cai_jax.rl.dpo.train_step`) vs TRL's DPOTrainer.

  python -m benchmarks.perf.dpo_step  # -> benchmarks/results/cpu/dpo_step.json

Same model (SmolLM2-135M-Instruct, fp32, no remat), same token pairs (B pairs of a
P-token prompt and two R-token responses, so 2B sequences of P + R tokens per
step), sigmoid loss, beta 0.1, AdamW with clipping. Each implementation runs in its
own subprocess, one after the other, so peak RSS (ru_maxrss) is its own.

Implementations (--impls):
  jax          ours: reference log-probs computed once before training (as stage 7's
               DPO does), log-probs in chunks of --logits_chunk positions
  trl          trl.DPOTrainer with precompute_ref_log_probs=True: the same work per step
  trl_default  trl.DPOTrainer as it comes: the reference model's forward every step

Timed: the steps after --warmup (ours: compile and the reference pass excluded;
TRL: its reference precompute and first steps excluded). Tokens/s counts every
token of both sequences of a pair.

On a GPU (`--device=gpu`, with `--dtype=bfloat16`): JAX and PyTorch both on the GPU,
fp32 master weights in both, bf16 compute (ours: compute dtype; TRL: `bf16=True`),
and each implementation's peak device memory beside its peak RSS:

  python -m benchmarks.perf.dpo_step --model=random:smollm2_135m --device=gpu \
      --dtype=bfloat16 --batch=8 --steps=20 --warmup=3 --out=/tmp/dpo_gpu.json

Quick check of the script itself (not a measurement):
  python -m benchmarks.perf.dpo_step --batch=2 --prompt_len=16 --response_len=16 \
      --steps=2 --warmup=1 --out=/tmp/dpo_check.json
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from absl import app, flags

from benchmarks.common import outputs, peaks, workers
from benchmarks.common.trainer_clock import clock

_OUT = flags.DEFINE_string("out", "", "Where to write the results (JSON; default:"
                           " benchmarks/results/<machine>/dpo_step.json).")
_MODEL = flags.DEFINE_string("model", "smollm2-135m-instruct",
                             "Bundled asset name or random:<preset>.")
_BATCH = flags.DEFINE_integer("batch", 8, "Pairs per step.")
_PROMPT = flags.DEFINE_integer("prompt_len", 128, "Prompt tokens.")
_RESPONSE = flags.DEFINE_integer("response_len", 128, "Tokens of each response.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps first.")
_BETA = flags.DEFINE_float("beta", 0.1, "DPO beta.")
_LR = flags.DEFINE_float("lr", 1e-6, "Learning rate (constant).")
_CHUNK = flags.DEFINE_integer("logits_chunk", 64, "Our positions per log-prob chunk.")
_IMPLS = flags.DEFINE_list("impls", ["jax", "trl", "trl_default"], "What to run.")
_WORKER = flags.DEFINE_string("worker", None, "Internal: run one implementation.")
_DATA = flags.DEFINE_string("data", None, "Internal: the token pairs (.npz).")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "Internal: the model's HF directory.")
_RESULT = flags.DEFINE_string("result", None, "Internal: the worker's JSON output.")
_DEVICE = flags.DEFINE_enum("device", "cpu", ["cpu", "gpu"], "Where every implementation runs.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Compute dtype (fp32 master weights either way).")


def worker_jax(prompts, chosen, rejected, B: int, steps: int, warmup: int, hf_dir: str
               ) -> dict:
  import functools

  import jax
  import ml_collections
  import numpy as np

  from cai_jax.checkpoints.load import load_model
  from cai_jax.model import transformer
  from cai_jax.model.sharding import Sharder, make_mesh
  from cai_jax.rl import dpo
  from cai_jax.training import optim

  sharder = Sharder(make_mesh((1, 1, 1), jax.devices()[:1]))
  cfg, params, _ = load_model(hf_dir, sharder, param_dtype="float32", dtype=_DTYPE.value,
                              remat="none")
  c = ml_collections.ConfigDict(dict(lr=_LR.value, warmup_steps=0, decay="constant",
                                     end_lr_ratio=1.0, b1=0.9, b2=0.999, eps=1e-8,
                                     weight_decay=0.0, clip_norm=1.0))
  abstract = transformer.abstract_params(cfg)
  tx, schedule = optim.make_optimizer(c, warmup + steps, abstract)
  state_sh = optim.train_state_shardings(
      tx, abstract, transformer.param_shardings(cfg, sharder), sharder)
  P = prompts.shape[1]
  tokens = np.stack([np.concatenate([prompts, chosen], 1),
                     np.concatenate([prompts, rejected], 1)], 1).astype(np.int32)  # [E, 2, T]
  E, _, T = tokens.shape
  mask = np.ones((E, 2, T), bool)
  response = np.broadcast_to(np.arange(T) >= P, (E, 2, T))
  batch_sh = dpo.batch_shardings(sharder)
  kw = dict(cfg=cfg, sharder=sharder, chunk=_CHUNK.value)
  ref_fn = jax.jit(lambda p, b: dpo.response_logps(p, b["tokens"], b["mask"],
                                                   b["response_mask"], **kw))

  def batch_at(i, ref=None):
    rows = (i * B + np.arange(B)) % E
    b = {"tokens": tokens[rows], "mask": mask[rows], "response_mask": response[rows],
         "p_a": np.ones(B, np.float32), "valid": np.ones(B, bool),
         "ref_logp": ref[rows] if ref is not None else np.zeros((B, 2), np.float32)}
    return b

  t_ref = time.perf_counter()
  ref = np.zeros((E, 2), np.float32)
  for i in range(-(-E // B)):
    rows = (i * B + np.arange(B)) % E
    b = batch_at(i)
    ref[rows] = np.asarray(ref_fn(params, jax.device_put(b, batch_sh)))
  ref_s = time.perf_counter() - t_ref
  state = jax.jit(lambda p, k: optim.init_train_state(p, tx, k), out_shardings=state_sh,
                  donate_argnums=0)(params, jax.random.key(0))
  del params
  step = jax.jit(functools.partial(dpo.train_step, tx=tx, schedule=schedule, microbatches=1,
                                   beta=_BETA.value, loss_type="sigmoid", **kw),
                 in_shardings=(state_sh, batch_sh),
                 out_shardings=(state_sh, sharder.replicated), donate_argnums=0)
  losses, t0 = [], None
  for i in range(warmup + steps):
    if i == warmup:
      jax.block_until_ready(state)
      t0 = time.perf_counter()
    state, m = step(state, jax.device_put(batch_at(i, ref), batch_sh))
    losses.append(m["loss"])
  jax.block_until_ready(state)
  secs = time.perf_counter() - t0
  return {"seconds": secs, "losses": [float(x) for x in losses], "reference_pass_s": ref_s,
          "peak_rss_mib": peaks.peak_rss_mib(), "peak_device_mib": peaks.jax_peak_device_mib(),
          "device": jax.devices()[0].device_kind, "version": f"jax {jax.__version__}"}


def worker_trl(prompts, chosen, rejected, B: int, steps: int, warmup: int, hf_dir: str,
               precompute: bool) -> dict:
  import datasets
  import numpy as np
  import torch
  import transformers
  import trl

  torch.manual_seed(0)
  load = lambda: transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
  model, ref = load(), load()
  if _DEVICE.value == "gpu":
    model, ref = model.cuda(), ref.cuda()
  tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
  n = (warmup + steps) * B
  idx = np.arange(n) % len(prompts)
  data = datasets.Dataset.from_dict({"prompt_ids": prompts[idx].tolist(),
                                     "chosen_ids": chosen[idx].tolist(),
                                     "rejected_ids": rejected[idx].tolist()})
  callback, stamps, losses = clock()

  class Pretokenized(trl.DPOTrainer):
    """The token pairs as given (no chat template, no EOS), in order."""

    def _prepare_dataset(self, dataset, *args, **kwargs):
      return dataset

    def _get_train_sampler(self, train_dataset=None):
      return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)

  with tempfile.TemporaryDirectory() as out:
    args = trl.DPOConfig(
        output_dir=out, per_device_train_batch_size=B, max_length=None, beta=_BETA.value,
        loss_type=["sigmoid"], precompute_ref_log_probs=precompute,
        max_steps=warmup + steps, learning_rate=_LR.value, lr_scheduler_type="constant",
        weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch_fused", logging_steps=1,
        gradient_checkpointing=False, save_strategy="no", report_to="none",
        use_cpu=_DEVICE.value == "cpu", bf16=_DTYPE.value == "bfloat16", fp16=False,
        dataloader_num_workers=0, disable_tqdm=True, seed=0)
    t_init = time.perf_counter()
    trainer = Pretokenized(model=model, ref_model=ref, args=args, train_dataset=data,
                           processing_class=tok, callbacks=[callback])
    init_s = time.perf_counter() - t_init
    trainer.train()
  first = stamps[warmup - 1]
  return {"seconds": stamps[-1] - first, "losses": losses, "init_s": init_s,
          "peak_rss_mib": peaks.peak_rss_mib(), "peak_device_mib": peaks.torch_peak_device_mib(),
          "threads": torch.get_num_threads(),
          "precompute_ref_log_probs": precompute,
          "version": f"trl {trl.__version__}, transformers {transformers.__version__}"}


def run_worker(name: str) -> None:
  import numpy as np
  d = np.load(_DATA.value)
  args = (d["prompts"], d["chosen"], d["rejected"], _BATCH.value, _STEPS.value, _WARMUP.value,
          _HF_DIR.value)
  if name == "jax":
    result = worker_jax(*args)
  else:
    result = worker_trl(*args, precompute=name == "trl")
  with open(_RESULT.value, "w") as f:
    json.dump(result, f)


def main(argv) -> None:
  del argv
  if _WORKER.value:
    run_worker(_WORKER.value)
    return
  out = outputs.path("dpo_step", _OUT.value, device_kind=(outputs.local_gpu() or "gpu")
                     if _DEVICE.value == "gpu" else "cpu")
  import jax
  jax.config.update("jax_platforms", "cpu")
  import numpy as np

  from benchmarks.common.hf_dirs import model_hf_dir
  from cai_jax.checkpoints.hf import read_hf_config

  B, P, R, steps = _BATCH.value, _PROMPT.value, _RESPONSE.value, _STEPS.value
  with tempfile.TemporaryDirectory() as tmp:
    hf_dir = model_hf_dir(_MODEL.value, tmp)
    cfg = read_hf_config(hf_dir)
    rng = np.random.default_rng(0)
    E = (_WARMUP.value + steps) * B
    ids = lambda n: rng.integers(100, cfg.vocab_size, (E, n), np.int32)
    prompts, chosen, rejected = ids(P), ids(R), ids(R)
    data = os.path.join(tmp, "pairs.npz")
    np.savez(data, prompts=prompts, chosen=chosen, rejected=rejected)
    results: dict = {"model": _MODEL.value, "pairs_per_step": B, "prompt_len": P,
                     "response_len": R, "steps": steps, "warmup": _WARMUP.value,
                     "beta": _BETA.value, "dtype": _DTYPE.value, "device": _DEVICE.value,
                     "cpu_count": os.cpu_count(),
                     "impls": {}}
    for name in _IMPLS.value:
      r = results["impls"][name] = workers.run("benchmarks.perf.dpo_step", name, [
          f"--data={data}", f"--batch={B}", f"--steps={steps}", f"--warmup={_WARMUP.value}",
          f"--beta={_BETA.value}", f"--lr={_LR.value}", f"--logits_chunk={_CHUNK.value}",
          f"--hf_dir={hf_dir}", f"--device={_DEVICE.value}", f"--dtype={_DTYPE.value}"],
          tmp, gpu=_DEVICE.value == "gpu")
      if "error" in r:
        continue
      r["tokens_per_s"] = 2 * B * (P + R) * steps / r["seconds"]
      r["pairs_per_s"] = B * steps / r["seconds"]
      print(f"{name}: {r['pairs_per_s']:.2f} pairs/s ({r['tokens_per_s']:.0f} tokens/s), peak"
            f" RSS {r['peak_rss_mib']:.0f} MiB, first loss {r['losses'][0]:.4f}", flush=True)
      outputs.write(out, results)  # after every implementation: a cut run keeps its rows
  ok = {k: v for k, v in results["impls"].items() if "tokens_per_s" in v}
  for other in ("trl", "trl_default"):
    if "jax" in ok and other in ok:
      results[f"time_ratio_jax_over_{other}"] = ok["jax"]["seconds"] / ok[other]["seconds"]
      results[f"peak_rss_ratio_jax_over_{other}"] = (ok["jax"]["peak_rss_mib"]
                                                     / ok[other]["peak_rss_mib"])
      if ok["jax"].get("peak_device_mib") and ok[other].get("peak_device_mib"):
        results[f"peak_device_ratio_jax_over_{other}"] = (ok["jax"]["peak_device_mib"]
                                                          / ok[other]["peak_device_mib"])
  print(outputs.write(out, results))
  print(json.dumps({k: v for k, v in results.items() if k != "impls"}, indent=1))


if __name__ == "__main__":
  app.run(main)
