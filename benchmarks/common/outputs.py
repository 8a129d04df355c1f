"""Where a benchmark writes its figures: one current file per script and machine,

  benchmarks/results/<machine>/<script>.json          e.g. benchmarks/results/cpu/decode.json
  benchmarks/results/<machine>/<script>-<variant>.json  e.g. .../cpu/memory_plan-lora16.json

<machine> is `cpu`, `h100` or `h200`, the kind of device measured on (`machine`).
A script's `--out` names another file instead; earlier figures live in git and in the
experiment folders (experiments/README.md).
"""

from __future__ import annotations

import json
import os
import re
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join("benchmarks", "results")
MACHINES = ("h100", "h200")  # accelerators with a folder; any CPU is `cpu`


def machine(device_kind: str = "") -> str:
  """The results folder of a device kind (JAX's `device_kind`, e.g. "NVIDIA H100 80GB
  HBM3"; "" asks JAX for its first device): `cpu`, `h100` or `h200`; another kind in
  lower case with `_` between its words."""
  if not device_kind:
    import jax
    device_kind = jax.devices()[0].device_kind
  kind = device_kind.lower()
  for name in MACHINES:
    if name in kind:
      return name
  return re.sub(r"[^a-z0-9]+", "_", kind).strip("_") or "cpu"


def local_gpu() -> str:
  """The first GPU's name as `nvidia-smi` gives it, "" where there is none. Starts no JAX
  backend, so a parent process leaves the accelerator to the workers it times."""
  try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30)
  except (OSError, subprocess.TimeoutExpired):
    return ""
  return out.stdout.splitlines()[0].strip() if out.returncode == 0 and out.stdout else ""


def path(script: str, out: str = "", variant: str = "", device_kind: str = "") -> str:
  """`out` when given, else benchmarks/results/<machine>/<script>[-<variant>].json."""
  if out:
    return out
  name = script + (f"-{variant}" if variant else "")
  return os.path.join(RESULTS, machine(device_kind), name + ".json")


def write(path: str, result, **dump_kw) -> str:
  """Writes `result` as JSON (indent 1 unless `dump_kw` says otherwise) atomically,
  making the folder; returns the path."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(result, f, **{"indent": 1, **dump_kw})
  os.replace(path + ".tmp", path)
  return path
