"""SFT training throughput: our jitted step vs TRL's SFTTrainer vs a plain PyTorch loop.

  python -m benchmarks.perf.sft_throughput  # -> benchmarks/results/cpu/sft_throughput.json

Same model (SmolLM2-135M-Instruct, fp32, no remat), same token batches
(seq 512, batch 8; loss on the second half of each row, like a response),
AdamW with clipping in all three. Each implementation runs in its own
subprocess, one after the other, so peak RSS (ru_maxrss) is its own. FLOP
utilisation is the training FLOPs (3 x forward, attention over the full T, as
in PaLM's MFU) per second over the best fp32 matmul rate this script measures
on this machine, with JAX for our step and with PyTorch for the other two.

Implementations (--impls):
  jax          sft_step.train_step, plain [B, T, V] logits (loss_chunk=0)
  jax_chunked  sft_step.train_step, logits in chunks of --loss_chunk tokens
  torch        transformers model, forward/backward, torch.optim.AdamW(fused)
  trl          trl.SFTTrainer on the pre-tokenized rows (labels -100 on prompts),
               gradient checkpointing off like the others
  trl_default  the same with TRL's own default, gradient checkpointing on
  jax_lora     jax_chunked with LoRA adapters of rank --lora_rank on every projection
               (`cai_jax.model.lora`, the stages' own LoRA step: adapters and their
               AdamW moments are the state, the base a frozen argument). Its MFU uses the
               same 3 x forward FLOPs as full fine-tuning, though the backward skips the
               frozen weights' gradients: read its tokens/s against jax_chunked.

`--remat` is our `ModelConfig.remat` (none / full / ...) for the jax implementations.

On a GPU (`--device=gpu`: JAX and PyTorch both on the GPU), use
`--dtype=bfloat16`: all three keep fp32 master weights and compute in bf16
(ours: compute dtype; PyTorch: autocast; TRL: `bf16=True`), and utilisation
is also given against the device's dense bf16 datasheet peak. `--model` takes
a bundled asset or `random:<preset>` (random weights written once to a HF
directory that every implementation loads):

  python -m benchmarks.perf.sft_throughput --model=random:smollm2_135m --device=gpu \
      --dtype=bfloat16 --batch=16 --seq=1024 --steps=20 --warmup=3 --out=/tmp/sft_gpu.json

Quick check of the script itself (not a measurement):
  python -m benchmarks.perf.sft_throughput --batch=2 --seq=64 --steps=2 \
      --warmup=1 --out=/tmp/sft_check.json
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from absl import app, flags

from benchmarks.common import outputs, peaks, workers
from benchmarks.common.hf_dirs import model_hf_dir
from benchmarks.common.trainer_clock import clock

_OUT = flags.DEFINE_string("out", "", "Where to write the results (JSON; default:"
                           " benchmarks/results/<machine>/sft_throughput.json).")
_MODEL = flags.DEFINE_string("model", "smollm2-135m-instruct",
                             "Bundled asset name or random:<preset>.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Compute dtype (master weights stay fp32).")
_BATCH = flags.DEFINE_integer("batch", 8, "Sequences per step.")
_SEQ = flags.DEFINE_integer("seq", 512, "Tokens per sequence.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps first (compilation, allocator).")
_IMPLS = flags.DEFINE_list("impls", ["jax", "jax_chunked", "torch", "trl"], "What to run.")
_LOSS_CHUNK = flags.DEFINE_integer("loss_chunk", 128, "Tokens per logits chunk (jax_chunked).")
_LR = flags.DEFINE_float("lr", 1e-5, "Learning rate (constant).")
_WORKER = flags.DEFINE_string("worker", None, "Internal: run one implementation.")
_DATA = flags.DEFINE_string("data", None, "Internal: the token rows (.npz).")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "Internal: the model's HF directory.")
_ATTN = flags.DEFINE_enum("attention_impl", "xla", ["xla", "cudnn", "splash"],
                          "Our attention: einsum (xla), cuDNN flash attention (GPU, bf16) or"
                          " the Pallas splash kernel (TPU).")
_DEVICE = flags.DEFINE_enum("device", "cpu", ["cpu", "gpu"], "Where every implementation runs.")
_RESULT = flags.DEFINE_string("result", None, "Internal: the worker's JSON output.")
_REMAT = flags.DEFINE_string("remat", "none", "Our remat policy (the jax implementations).")
_LORA_RANK = flags.DEFINE_integer("lora_rank", 16, "Adapter rank of jax_lora.")

CPU_MATMUL_SIZES = (512, 1024, 2048)
GPU_MATMUL_SIZES = (4096, 8192)


def response_mask(T: int):
  """[T] over input positions t: the target token t+1 is in the second half.

  The last target (token T, which a transformers model never predicts) is
  left out, so every implementation trains on the same T/2 - 1 tokens a row.
  """
  import numpy as np
  t = np.arange(T)
  return (t + 1 >= T // 2) & (t + 1 <= T - 1)


# --- Workers (each in its own process) -------------------------------------------------------


def on_gpu() -> bool:
  return _DEVICE.value == "gpu"


def matmul_sizes() -> tuple[int, ...]:
  return GPU_MATMUL_SIZES if on_gpu() else CPU_MATMUL_SIZES


def torch_device() -> str:
  return "cuda" if on_gpu() else "cpu"


def worker_jax(rows, B: int, T: int, steps: int, warmup: int, loss_chunk: int,
               hf_dir: str, lora_rank: int = 0) -> dict:
  import functools

  import jax
  import ml_collections
  import numpy as np

  from cai_jax.checkpoints.load import load_model
  from cai_jax.model.sharding import Sharder, make_mesh
  from cai_jax.model import lora, transformer
  from cai_jax.training import sft_step
  from cai_jax.training import optim

  sharder = Sharder(make_mesh((1, 1, 1), jax.devices()[:1]))
  cfg, params, _ = load_model(hf_dir, sharder, param_dtype="float32",
                              dtype=_DTYPE.value, remat=_REMAT.value,
                              attention_impl=_ATTN.value)
  c = ml_collections.ConfigDict(dict(lr=_LR.value, warmup_steps=0, decay="constant",
                                     end_lr_ratio=1.0, b1=0.9, b2=0.999, eps=1e-8,
                                     weight_decay=0.0, clip_norm=1.0))
  spec = lora.LoraSpec(lora_rank, 16.0, tuple(lora.TARGETS)) if lora_rank else None
  param_sh = transformer.param_shardings(cfg, sharder)
  abstract, train_sh, trainable, frozen = lora.trainable_params(
      cfg, spec, params, param_sh, sharder, jax.random.key(1))
  del params
  tx, schedule = optim.make_optimizer(c, warmup + steps, abstract)
  state_sh = optim.train_state_shardings(tx, abstract, train_sh, sharder)
  state = jax.jit(lambda p, k: optim.init_train_state(p, tx, k), out_shardings=state_sh,
                  donate_argnums=0)(trainable, jax.random.key(0))
  del trainable
  batch_sh = sharder.sharding(("batch", "seq"))
  step = jax.jit(functools.partial(sft_step.train_step, cfg=cfg, tx=tx, schedule=schedule,
                                   sharder=sharder, microbatches=1, loss_chunk=loss_chunk,
                                   lora=spec),
                 in_shardings=(state_sh, batch_sh, param_sh if spec else None),
                 out_shardings=(state_sh, sharder.replicated), donate_argnums=0)
  mask = np.broadcast_to(response_mask(T), (B, T))

  def batch_at(i):
    r = rows[(i * B + np.arange(B)) % len(rows)]
    b = {"inputs": r[:, :T], "targets": r[:, 1:T + 1], "input_mask": np.ones((B, T), bool),
         "loss_mask": mask}
    return jax.device_put(b, batch_sh)

  losses, t0 = [], None
  for i in range(warmup + steps):
    if i == warmup:
      jax.block_until_ready(state)
      t0 = time.perf_counter()
    state, m = step(state, batch_at(i), frozen)
    losses.append(m["loss"])
  jax.block_until_ready(state)
  secs = time.perf_counter() - t0

  return {"seconds": secs, "losses": [float(x) for x in losses],
          "peak_rss_mib": peaks.peak_rss_mib(),
          "matmul_flops": peaks.jax_matmul_flops(_DTYPE.value, matmul_sizes()),
          "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
          "peak_device_mib": peaks.jax_peak_device_mib(),
          "version": f"jax {jax.__version__}"}


def _torch_model(hf_dir: str):
  import torch
  import transformers
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
  model.config.use_cache = False
  return model.to(torch_device()).train()


def _labels(rows, T: int):
  import numpy as np
  labels = rows[:, :T].astype(np.int64).copy()
  # transformers shifts: labels[t] is predicted at t - 1, i.e. our target t - 1.
  keep = np.concatenate([[False], response_mask(T)[:-1]])
  labels[:, ~keep] = -100
  return labels


def _torch_matmul_rate() -> float:
  return peaks.torch_matmul_flops(_DTYPE.value, matmul_sizes(), torch_device())


def worker_torch(rows, B: int, T: int, steps: int, warmup: int, hf_dir: str) -> dict:
  import numpy as np
  import torch

  model = _torch_model(hf_dir)
  try:
    opt = torch.optim.AdamW(model.parameters(), lr=_LR.value, weight_decay=0.0, fused=True)
    fused = True
  except (RuntimeError, TypeError):
    opt = torch.optim.AdamW(model.parameters(), lr=_LR.value, weight_decay=0.0, foreach=True)
    fused = False
  labels = _labels(rows, T)
  device = torch_device()
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=_DTYPE.value == "bfloat16")
  losses, t0 = [], None
  for i in range(warmup + steps):
    if i == warmup:
      t0 = time.perf_counter()
    idx = (i * B + np.arange(B)) % len(rows)
    ids = torch.from_numpy(rows[idx, :T].astype(np.int64)).to(device)
    with autocast:
      out = model(input_ids=ids, labels=torch.from_numpy(labels[idx]).to(device))
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    losses.append(out.loss.item())  # a host sync each step, like the others' metrics
  secs = time.perf_counter() - t0
  return {"seconds": secs, "losses": losses, "peak_rss_mib": peaks.peak_rss_mib(),
          "peak_device_mib": peaks.torch_peak_device_mib(), "device": device,
          "matmul_flops": _torch_matmul_rate(), "fused_adamw": fused,
          "threads": torch.get_num_threads(), "version": f"torch {torch.__version__}",
          "attn_implementation": model.config._attn_implementation}


def worker_trl(rows, B: int, T: int, steps: int, warmup: int, hf_dir: str,
               checkpointing: bool = False) -> dict:
  import datasets
  import numpy as np
  import torch
  import transformers
  import trl

  model = _torch_model(hf_dir)
  tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
  n = (warmup + steps) * B
  idx = np.arange(n) % len(rows)
  data = datasets.Dataset.from_dict({"input_ids": rows[idx, :T].astype(np.int64).tolist(),
                                     "labels": _labels(rows, T)[idx].tolist()})
  callback, stamps, losses = clock()

  class InOrder(trl.SFTTrainer):
    """The rows in the order the other implementations see them (no shuffling)."""

    def _get_train_sampler(self, train_dataset=None):
      return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)

  with tempfile.TemporaryDirectory() as out:
    args = trl.SFTConfig(
        output_dir=out, per_device_train_batch_size=B, max_length=T, packing=False,
        max_steps=warmup + steps, learning_rate=_LR.value, lr_scheduler_type="constant",
        weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch_fused", logging_steps=1,
        gradient_checkpointing=checkpointing,  # TRL's default is on; the race is without
        save_strategy="no", report_to="none", use_cpu=torch_device() == "cpu",
        bf16=_DTYPE.value == "bfloat16", fp16=False,
        dataloader_num_workers=0, disable_tqdm=True, seed=0, shuffle_dataset=False)
    trainer = InOrder(model=model, args=args, train_dataset=data, processing_class=tok,
                      callbacks=[callback])
    start = time.perf_counter()
    trainer.train()
  # Seconds from the end of the last warmup step to the end of the last step.
  first = stamps[warmup - 1] if warmup else start
  return {"seconds": stamps[-1] - first, "losses": losses, "peak_rss_mib": peaks.peak_rss_mib(),
          "peak_device_mib": peaks.torch_peak_device_mib(),
          "matmul_flops": _torch_matmul_rate(), "threads": torch.get_num_threads(),
          "version": f"trl {trl.__version__}, transformers {transformers.__version__}"}


def run_worker(name: str) -> None:
  import numpy as np
  rows = np.load(_DATA.value)["rows"]
  B, T, steps, warmup = _BATCH.value, _SEQ.value, _STEPS.value, _WARMUP.value
  if name in ("jax", "jax_chunked", "jax_lora"):
    chunk = 0 if name == "jax" else _LOSS_CHUNK.value
    result = worker_jax(rows, B, T, steps, warmup, chunk, _HF_DIR.value,
                        _LORA_RANK.value if name == "jax_lora" else 0)
  else:
    if name == "torch":
      result = worker_torch(rows, B, T, steps, warmup, _HF_DIR.value)
    else:
      result = worker_trl(rows, B, T, steps, warmup, _HF_DIR.value,
                          checkpointing=name == "trl_default")
  with open(_RESULT.value, "w") as f:
    json.dump(result, f)


# --- The comparison ------------------------------------------------------------------------


def _summarize_and_write(results: dict, cfg, T: int, out: str) -> None:
  """The ratios and MFU of what has run so far, written to --out (after every
  implementation, so a run cut short keeps its finished rows)."""
  ok = {k: v for k, v in results["impls"].items() if "tokens_per_s" in v}
  kind = next((v["device"] for k, v in ok.items() if k.startswith("jax")), "")
  datasheet = peaks.datasheet_bf16_tflops(kind) if on_gpu() else None
  if datasheet:  # the GPU figure: MFU against the dense bf16 datasheet peak
    results["device"], results["datasheet_bf16_tflops"] = kind, datasheet
    for k, v in ok.items():
      v["mfu_vs_bf16_datasheet"] = v["model_flops_per_s"] / (datasheet * 1e12)
      if k == "jax_lora":  # the field alone would read as LoRA's own FLOP count
        v["mfu_flops_counted"] = ("full fine-tuning's (3x forward); LoRA skips the frozen"
                                  " weights' gradients, so this overstates its MFU")
  for ours in ("jax", "jax_chunked", "jax_lora"):
    for other in ("torch", "trl", "trl_default", "jax_chunked"):
      if ours == other:
        continue
      if ours in ok and other in ok:
        results[f"speedup_{ours}_vs_{other}"] = (ok[ours]["tokens_per_s"]
                                                 / ok[other]["tokens_per_s"])
  results["train_flops_per_token"] = 3 * cfg.flops_per_token(T)
  outputs.write(out, results)


def main(argv) -> None:
  del argv
  if _WORKER.value:
    run_worker(_WORKER.value)
    return
  out = outputs.path("sft_throughput", _OUT.value,
                     device_kind=(outputs.local_gpu() or "gpu") if on_gpu() else "cpu")
  import jax
  jax.config.update("jax_platforms", "cpu")  # this process only writes the weights
  import numpy as np

  from cai_jax.checkpoints.hf import read_hf_config

  B, T, steps = _BATCH.value, _SEQ.value, _STEPS.value
  with tempfile.TemporaryDirectory() as tmp:
    hf_dir = model_hf_dir(_MODEL.value, tmp)  # convert once, outside the timings
    cfg = read_hf_config(hf_dir)
    # Token ids the model knows (not special ones), the same rows for everyone.
    rows = np.random.default_rng(0).integers(100, cfg.vocab_size, (max(4 * B, 32), T + 1),
                                             np.int32)
    results: dict = {"model": _MODEL.value, "batch": B, "seq": T, "steps": steps,
                     "warmup": _WARMUP.value, "dtype": _DTYPE.value, "remat": _REMAT.value,
                     "lora_rank": _LORA_RANK.value if "jax_lora" in _IMPLS.value else 0,
                     "attention_impl": _ATTN.value,
                     "cpu_count": os.cpu_count(), "impls": {}}
    data = os.path.join(tmp, "rows.npz")
    np.savez(data, rows=rows)
    for name in _IMPLS.value:
      r = results["impls"][name] = workers.run("benchmarks.perf.sft_throughput", name, [
          f"--data={data}", f"--batch={B}", f"--seq={T}", f"--steps={steps}",
          f"--warmup={_WARMUP.value}", f"--loss_chunk={_LOSS_CHUNK.value}", f"--lr={_LR.value}",
          f"--model={_MODEL.value}", f"--hf_dir={hf_dir}", f"--dtype={_DTYPE.value}",
          f"--device={_DEVICE.value}", f"--attention_impl={_ATTN.value}",
          f"--remat={_REMAT.value}", f"--lora_rank={_LORA_RANK.value}"], tmp, gpu=on_gpu())
      if "error" in r:
        continue
      r["tokens_per_s"] = B * T * steps / r["seconds"]
      r["model_flops_per_s"] = r["tokens_per_s"] * 3 * cfg.flops_per_token(T)
      r["flop_utilization"] = r["model_flops_per_s"] / r["matmul_flops"]
      print(f"{name}: {r['tokens_per_s']:.0f} tokens/s, peak RSS {r['peak_rss_mib']:.0f} MiB,"
            f" {100 * r['flop_utilization']:.1f}% of {r['matmul_flops'] / 1e9:.0f} GFLOP/s"
            f" matmul, first loss {r['losses'][0] if r['losses'] else float('nan'):.4f}",
            flush=True)
      _summarize_and_write(results, cfg, T, out)
  _summarize_and_write(results, cfg, T, out)
  print(out)
  print(json.dumps({k: v for k, v in results.items() if k != "impls"}, indent=1))


if __name__ == "__main__":
  app.run(main)
