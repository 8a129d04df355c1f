"""The pipeline's peak resident memory against its stages run alone.

  python -m benchmarks.perf.stage_memory --config=configs/pipeline.py:cpu \
      --workdir=runs/mem --through=sft --alone=critique_revision,sft
  # -> benchmarks/results/<machine>/stage_memory.json

1. Runs the pipeline (in a fresh process) up to and including `--through`, from
   `--workdir` (empty, or partly done: finished stages are skipped, so only an
   empty workdir measures every stage). Its `pipeline_memory.json` gives the
   process's peak so far after each stage; the stage during which the peak rose
   is where the pipeline's peak happened.
2. For each stage in `--alone`: copies the workdir without that stage's output
   directory and runs that stage alone in a fresh process, with the same
   section of the same pipeline config; its peak is the child's `ru_maxrss`.
3. Prints and writes, per stage, the pipeline's peak at the end of that stage
   and the stage's peak alone, and the ratio of the pipeline's overall peak to
   the largest stage-alone peak (the layout issue's bound is ~1.1).

Memory is what is compared, so other jobs on the cores change the times here,
not the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from benchmarks.common import outputs
from cai_jax import paths

_CHILD = r"""
import importlib.util, sys
from absl import logging as absl_logging
absl_logging.set_verbosity(absl_logging.WARNING)
path, arg, mode, workdir, name = sys.argv[1:6]
spec = importlib.util.spec_from_file_location("pipeline_config", path)
module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
config = module.get_config(arg)
from cai_jax import pipeline
if mode == "pipeline":
  keep = [n for n, _ in pipeline.STAGES]
  keep = keep[:keep.index(name) + 1]
  for section in list(config.keys()):
    if section not in keep:
      del config[section]
  pipeline.run(config, workdir)
else:
  dict(pipeline.STAGES)[name].run(config[name], workdir)
"""

# Pipeline section -> the stage's output directory (paths.py's names).
_OUTPUT = {"prompts": paths.PROMPTS, "critique_revision": paths.CRITIQUE_REVISION,
           "sft": paths.SFT, "pairs": paths.PAIRS, "ai_labels": paths.AI_LABELS,
           "preference_model": paths.PREFERENCE_MODEL, "ppo": paths.PPO,
           "dpo": paths.DPO, "evaluation": paths.EVALUATION}


def _child(config: str, mode: str, workdir: str, name: str, log: str) -> tuple[float, float]:
  """Runs one child; returns (its peak RSS in GiB, wall seconds)."""
  path, _, arg = config.partition(":")
  start = time.perf_counter()
  with open(log, "w") as f:
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, path, arg or "cpu", mode,
                             workdir, name], stdout=f, stderr=subprocess.STDOUT,
                            cwd=os.getcwd())
    _, status, usage = os.wait4(proc.pid, 0)
  seconds = time.perf_counter() - start
  if os.waitstatus_to_exitcode(status) != 0:
    sys.exit(f"stage_memory: the {mode} run of {name} failed; see {log}")
  return usage.ru_maxrss / 2**20, seconds  # KiB on Linux


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/pipeline.py:cpu")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--through", default="sft", help="last pipeline stage to run")
  parser.add_argument("--alone", default="sft", help="comma-separated stages to run alone")
  parser.add_argument("--out", default="", help="write the figures as JSON here (default:"
                      " benchmarks/results/<machine>/stage_memory.json)")
  args = parser.parse_args()
  alone = [s for s in args.alone.split(",") if s]
  for name in [args.through, *alone]:
    if name not in _OUTPUT:
      sys.exit(f"stage_memory: unknown stage {name!r}; stages are {sorted(_OUTPUT)}")

  os.makedirs(args.workdir, exist_ok=True)
  peak, seconds = _child(args.config, "pipeline", args.workdir, args.through,
                         os.path.join(args.workdir, "stage_memory_pipeline.log"))
  with open(os.path.join(args.workdir, "pipeline_memory.json")) as f:
    in_pipeline = json.load(f)
  rows = {name: {"pipeline_peak_so_far_gib": v["peak_so_far_gib"],
                 "pipeline_resident_after_gib": v["resident_after_gib"]}
          for name, v in in_pipeline.items()}

  for name in alone:
    copy = os.path.abspath(args.workdir.rstrip("/") + f".alone_{name}")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(args.workdir, copy, ignore=lambda d, names: (
        [_OUTPUT[name]] if os.path.abspath(d) == os.path.abspath(args.workdir) else []))
    stage_peak, stage_seconds = _child(args.config, "alone", copy, name,
                                       os.path.join(copy, "stage_memory_alone.log"))
    rows.setdefault(name, {}).update({"alone_peak_gib": round(stage_peak, 3),
                                      "alone_seconds": round(stage_seconds, 1)})
    shutil.rmtree(copy, ignore_errors=True)

  largest = max(r["alone_peak_gib"] for r in rows.values() if "alone_peak_gib" in r)
  result = {"config": args.config, "through": args.through,
            "pipeline_peak_gib": round(peak, 3), "pipeline_seconds": round(seconds, 1),
            "largest_alone_peak_gib": largest,
            "pipeline_over_largest_alone": round(peak / largest, 3), "stages": rows}
  print(json.dumps(result, indent=1))
  print(outputs.write(outputs.path("stage_memory", args.out, device_kind=outputs.local_gpu()
                                   or "cpu"), result))


if __name__ == "__main__":
  main()
