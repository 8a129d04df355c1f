"""One implementation per process: a comparison runs each of its implementations as a
worker process of its own script, so each one's peak RSS (`ru_maxrss`) is its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from benchmarks.common import outputs


def env(gpu: bool) -> dict[str, str]:
  """A worker's environment: one device (no forced host devices), JAX on the CPU unless
  `gpu`, and this repository importable."""
  out = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  if not gpu:
    out["JAX_PLATFORMS"] = "cpu"
  out["PYTHONPATH"] = os.pathsep.join([outputs.REPO, out.get("PYTHONPATH", "")])
  return out


def run(module: str, name: str, args: list[str], tmp: str, gpu: bool) -> dict:
  """Runs `python -m <module> --worker=<name> --result=<json in tmp> <args>` and returns
  the JSON the worker wrote, with `wall_s_including_load`; {"error": the end of its
  stderr} where it failed."""
  result_path = os.path.join(tmp, f"{name}.json")
  print(f"running {name} ...", flush=True)
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, "-m", module, f"--worker={name}",
                         f"--result={result_path}", *args], env=env(gpu),
                        capture_output=True, text=True)
  if proc.returncode != 0:
    print(f"{name} failed:\n{proc.stderr[-4000:]}", flush=True)
    return {"error": proc.stderr[-4000:]}
  with open(result_path) as f:
    r = json.load(f)
  r["wall_s_including_load"] = time.perf_counter() - start
  return r
