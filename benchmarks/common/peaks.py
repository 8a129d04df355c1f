"""Machine limits the benchmarks compare against: datasheet peaks and measured rates."""

from __future__ import annotations

import resource
import time

# Dense bf16 datasheet peaks, TFLOP/s per device (matched against device_kind).
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0,
                    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0,
                    "TPU v5p": 459.0, "TPU v6 lite": 918.0}


def datasheet_bf16_tflops(device_kind: str) -> float | None:
  for name, peak in PEAK_BF16_TFLOPS.items():
    if name.lower() in device_kind.lower():
      return peak
  return None


def best_rate(run_once, sizes, reps: int = 5) -> float:
  """Best FLOP/s of an n x n x n matmul over `sizes`, as `run_once(n)` (seconds) times it."""
  best = 0.0
  for n in sizes:
    run_once(n)  # warm up (compile, allocate)
    secs = min(run_once(n) for _ in range(reps))
    best = max(best, 2 * n**3 / secs)
  return best


def jax_matmul_flops(dtype: str, sizes) -> float:
  import jax
  import jax.numpy as jnp
  f = jax.jit(lambda x, y: x @ y)

  def run_once(n):
    a = jax.random.normal(jax.random.key(n), (n, n), jnp.float32).astype(dtype)
    jax.block_until_ready(f(a, a))
    start = time.perf_counter()
    jax.block_until_ready(f(a, a))
    return time.perf_counter() - start
  return best_rate(run_once, sizes)


def torch_matmul_flops(dtype: str, sizes, device: str = "cpu") -> float:
  import torch
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def run_once(n):
    a = torch.randn(n, n, device=device).to(getattr(torch, dtype))
    torch.mm(a, a)
    sync()
    start = time.perf_counter()
    torch.mm(a, a)
    sync()
    return time.perf_counter() - start
  return best_rate(run_once, sizes)


def best_seconds(run, repeats: int) -> float:
  """Fastest of `repeats` timed calls of `run` (after one untimed call)."""
  run()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    best = min(best, time.perf_counter() - start)
  return best


def read_bandwidth_gbs(size_bytes: int = 1 << 30, repeats: int = 5) -> float:
  """Best read bandwidth of the default JAX device, GB/s: a jitted sum over a
  large array (all cores on a CPU); on a CPU also numpy's single-threaded sum,
  taking the larger."""
  import jax
  import numpy as np
  if jax.default_backend() != "cpu":
    size_bytes *= 4  # larger than any GPU cache
  x = jax.device_put(np.ones(size_bytes // 4, np.float32))
  total = jax.jit(lambda a: a.sum())
  secs = best_seconds(lambda: total(x).block_until_ready(), repeats)
  if jax.default_backend() == "cpu":
    host = np.ones(size_bytes // 8, np.float64)
    secs = min(secs, best_seconds(host.sum, repeats))
  return size_bytes / secs / 1e9


# --- Peak memory of this process (each benchmark runs an implementation per process) ---


def peak_rss_mib() -> float:
  """Peak resident set size of this process (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def jax_peak_device_mib() -> float | None:
  """JAX's peak bytes in use on the first device, where its allocator reports one (GPU,
  TPU; not the CPU)."""
  import jax
  peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
  return peak / 2**20 if peak is not None else None


def torch_peak_device_mib() -> float | None:
  """PyTorch's `max_memory_allocated` on CUDA (the same notion as JAX's peak in use);
  None when this process never used CUDA."""
  import torch
  return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_initialized() else None
