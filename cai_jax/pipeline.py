"""Runs the pipeline stages in order; each skips what is complete and resumes
what is partial, so rerunning after a kill picks up where it stopped.

  python -m cai_jax.pipeline --config=configs/pipeline.py:cpu --workdir=runs/cai

Writes `<workdir>/pipeline_timings.json` (wall seconds per stage, summed over
every attempt: a resumed run adds the time of the attempt that finished a stage
to what earlier attempts spent on it; only a killed attempt's unfinished stage is
not counted) and `<workdir>/pipeline_memory.json` (the process's resident memory
after each stage, once the stage's models and compiled programs are let go, and
the highest peak of any attempt so far), and `<workdir>/pipeline_config.json` (each
stage's config as it last ran; the report's "Choices" section names them).

All stages run in one process. Between stages what a stage held is released:
its return value and models (garbage-collected) and the heap pages the
allocator keeps (`malloc_trim`). Compiled programs stay cached, so a later
stage on the same model (the sampler of stages 2, 4 and 8) does not compile
again; `jax.clear_caches()` would free them too but made the tiny pipeline
test 1.7x slower (203 s vs 122 s).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import logging
import os
import resource
import time

import ml_collections

from cai_jax import paths
from cai_jax.phases import (cli, p1_prompts, p2_critique_revision, p3_sft, p4_pairs,
                            p5_ai_labels, p6_preference_model, p7_dpo, p7_ppo,
                            p8_evaluation)

# In pipeline order; a stage runs when the config has its section.
STAGES = (
    ("prompts", p1_prompts),
    ("critique_revision", p2_critique_revision),
    ("sft", p3_sft),
    ("pairs", p4_pairs),
    ("ai_labels", p5_ai_labels),
    ("preference_model", p6_preference_model),
    ("ppo", p7_ppo),
    # Stage 7's alternatives; each runs when the config has its section.
    ("rloo", p7_ppo),  # algorithm="rloo"
    ("grpo", p7_ppo),  # algorithm="grpo"
    ("dpo", p7_dpo),
    ("evaluation", p8_evaluation),
)


def resident_gib() -> float:
  """This process's resident memory now (Linux /proc; 0 elsewhere)."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
  except (OSError, ValueError, IndexError):
    return 0.0


def peak_gib() -> float:
  """This process's peak resident memory so far."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def release_memory() -> None:
  """Let go of what a finished stage held: its garbage and the free heap pages."""
  gc.collect()
  libc = ctypes.util.find_library("c")
  if libc:
    try:
      ctypes.CDLL(libc).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
      pass


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      data = json.load(f)
    return data if isinstance(data, dict) else {}
  except (OSError, ValueError):
    return {}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Runs every stage in `config`; returns wall seconds per stage over all attempts."""
  os.makedirs(workdir, exist_ok=True)
  timings_path = os.path.join(workdir, "pipeline_timings.json")
  memory_path = os.path.join(workdir, "pipeline_memory.json")
  timings: dict[str, float] = _read_json(timings_path)
  memory: dict[str, dict[str, float]] = _read_json(memory_path)
  config_path = paths.pipeline_config(workdir)
  configs: dict[str, dict] = _read_json(config_path)
  for name, stage in STAGES:
    if name not in config:
      continue
    logging.info("=== stage %s ===", name)
    configs[name] = json.loads(config[name].to_json())
    with open(config_path + ".tmp", "w") as f:
      json.dump(configs, f, indent=1)
    os.replace(config_path + ".tmp", config_path)
    start = time.perf_counter()
    result = stage.run(config[name], workdir)
    seconds = time.perf_counter() - start
    timings[name] = float(timings.get(name, 0.0)) + seconds
    release_memory()
    previous_peak = float(memory.get(name, {}).get("peak_so_far_gib", 0.0))
    memory[name] = {"resident_after_gib": round(resident_gib(), 3),
                    "peak_so_far_gib": round(max(peak_gib(), previous_peak), 3)}
    logging.info("stage %s: %.0f s (%.0f s over all attempts); resident %.2f GiB after"
                 " release, peak so far %.2f GiB", name, seconds, timings[name],
                 memory[name]["resident_after_gib"], memory[name]["peak_so_far_gib"])
    for path, data in ((timings_path, timings), (memory_path, memory)):
      with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
      os.replace(path + ".tmp", path)
    if getattr(result, "status", "done") == "preempted":  # SIGTERM: saved, now stop
      logging.warning("stage %s was preempted (its checkpoint is saved); later stages"
                      " need it finished, so the pipeline stops here: rerun the same"
                      " command to resume", name)
      break
  return timings


if __name__ == "__main__":
  cli.main(run)
