"""Chaos run: the tiny pipeline killed at seeded random moments, then compared bit
for bit with an uninterrupted run.

  python benchmarks/chaos.py --kills=50 --seed=0 --out=benchmarks/results/chaos.json
  python benchmarks/chaos.py --kills=30 --seed=1 --damage --out=benchmarks/results/chaos_damage.json

The pipeline runs as users run it (`python -m cai_jax.pipeline`, the tiny+dpo
config of tests/test_pipeline.py) in a child process. First an uninterrupted
reference run (its per-stage wall times place the kills). Then the chaos run
from an empty workdir: the kills are spread evenly over the stages in
pipeline order; for each one the harness waits until the child's log says the
target stage started, then kills it (SIGKILL or SIGTERM, seeded) either after a
random fraction of that stage's reference time, or the moment a checkpoint or
shard is being written (an Orbax temporary directory or a `*.tmp` file shows
up in the workdir). After each kill the same command is run again. With
`--damage`, between kills it also flips 16 bytes in a random finished
checkpoint step or record shard (seeded), as disk rot or a torn copy would.
After the last kill the command runs to completion.

Compared with the reference: every record file and the params of every
training stage's newest checkpoint (`pipeline_fingerprint.fingerprint`, which
reads the checkpoints without cai_jax code), stage 8's results.json, and the
record ids of every stage (lost, duplicated). Prints and writes: kills
survived (the run completed with identical outputs), per stage and per kind,
records lost / duplicated, mismatches, and attempts that ended with an error.
"""

from __future__ import annotations

import argparse
import collections
import glob
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = "--xla_force_host_platform_device_count=8"  # the tests' CPU mesh
os.environ.setdefault("XLA_FLAGS", DEVICES)
sys.path.insert(0, REPO)
STAGE_LINE = re.compile(r"=== stage (\w+) ===")
TRAINING = ("sft", "preference_model", "ppo", "dpo")
GENERATION = ("critique_revision", "pairs", "ai_labels", "evaluation")


def _load(path: str, name: str):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


fingerprints = _load(os.path.join(REPO, "benchmarks", "pipeline_fingerprint.py"),
                     "chaos_fingerprint")


def command(workdir: str, model: str) -> list[str]:
  return [sys.executable, "-m", "cai_jax.pipeline",
          f"--config={REPO}/benchmarks/chaos_config.py:{model}", f"--workdir={workdir}",
          "--alsologtostderr"]


def start(workdir: str, model: str, log_path: str) -> tuple[subprocess.Popen, object]:
  env = {**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": DEVICES}
  log = open(log_path, "w")
  proc = subprocess.Popen(command(workdir, model), cwd=REPO, env=env, stdout=log,
                          stderr=subprocess.STDOUT)
  return proc, log


def stages_started(log_path: str) -> list[str]:
  with open(log_path, errors="replace") as f:
    return STAGE_LINE.findall(f.read())


def preempted(log_path: str) -> bool:
  with open(log_path, errors="replace") as f:
    return "was preempted" in f.read()


def writes_in_progress(workdir: str) -> str | None:
  """A path being written now: an Orbax temporary step or a `*.tmp` file."""
  for root, dirs, files in os.walk(workdir):
    for d in dirs:
      if "orbax-checkpoint-tmp" in d:
        return os.path.join(root, d)
    for f in files:
      if f.endswith(".tmp") and ("shard-" in f or "checkpoint" in root):
        return os.path.join(root, f)
  return None


def finished_targets(workdir: str) -> list[str]:
  """Finished checkpoint steps and record shards: what the damage variant may hit."""
  steps = [d for d in glob.glob(os.path.join(workdir, "*", "checkpoints", "*"))
           if os.path.basename(d).isdigit()]
  shards = glob.glob(os.path.join(workdir, "*", "shard-*.jsonl"))
  return sorted(steps + shards)


def damage(target: str) -> str:
  """Flips 16 bytes in the middle of the shard, or of the step's largest params file."""
  path = target
  if os.path.isdir(target):
    files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(target, "params"))
             for f in fs]
    path = max(files, key=os.path.getsize)
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    mid = len(data) // 2
    data[mid:mid + 16] = bytes(b ^ 0xFF for b in data[mid:mid + 16])
    f.seek(0)
    f.write(data)
  return path


def record_ids(workdir: str) -> dict[str, list[str]]:
  out = {}
  for d in sorted(glob.glob(os.path.join(workdir, "*"))):
    ids = []
    for path in sorted(glob.glob(os.path.join(d, "shard-*.jsonl"))):
      with open(path, encoding="utf-8") as f:
        ids += [f"{json.loads(line).get('id')}/{json.loads(line).get('model', '')}"
                for line in f if line.strip()]
    if ids:
      out[os.path.basename(d)] = ids
  return out


def run_reference(workdir: str, model: str, logs: str) -> tuple[float, dict[str, float]]:
  t0 = time.perf_counter()
  proc, log = start(workdir, model, os.path.join(logs, "reference.log"))
  rc = proc.wait()
  log.close()
  if rc != 0:
    sys.exit(f"the reference run failed (exit {rc}); see {logs}/reference.log")
  with open(os.path.join(workdir, "pipeline_timings.json")) as f:
    return time.perf_counter() - t0, json.load(f)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--kills", type=int, default=50)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--damage", action="store_true",
                      help="also damage a finished checkpoint or shard between kills")
  parser.add_argument("--damage_prob", type=float, default=0.5)
  parser.add_argument("--root", help="working directory (default: a temporary one)")
  parser.add_argument("--out", help="write the figures as JSON here")
  args = parser.parse_args()
  rng = np.random.default_rng(args.seed)
  root = args.root or tempfile.mkdtemp(prefix="cai_chaos_")
  logs = os.path.join(root, "logs")
  os.makedirs(logs, exist_ok=True)
  model = fingerprints.tiny_model(os.path.join(root, "tiny_model"))
  ref_dir, chaos_dir = os.path.join(root, "reference"), os.path.join(root, "chaos")
  for d in (ref_dir, chaos_dir):
    shutil.rmtree(d, ignore_errors=True)

  ref_seconds, ref_stage_seconds = run_reference(ref_dir, model, logs)
  stages = list(ref_stage_seconds)
  print(f"reference run: {ref_seconds:.0f} s; stages {ref_stage_seconds}", flush=True)

  # Kills spread evenly over the stages, in pipeline order; kind and moment seeded.
  plan = [stages[i * len(stages) // args.kills] for i in range(args.kills)]
  kills, errors, damaged = [], [], []
  attempt = 0
  t_chaos = time.perf_counter()
  for target in plan:
    attempt += 1
    log_path = os.path.join(logs, f"attempt-{attempt:03d}.log")
    sig = signal.SIGKILL if rng.random() < 0.5 else signal.SIGTERM
    moment = rng.choice(["random", "write"]) if target in TRAINING + GENERATION else "random"
    fraction = float(rng.random())
    proc, log = start(chaos_dir, model, log_path)
    what, deadline, sent, started = None, None, False, []
    while proc.poll() is None:
      time.sleep(0.02)
      if target not in stages_started(log_path):
        continue
      if deadline is None:
        deadline = time.perf_counter() + fraction * ref_stage_seconds[target]
        write_deadline = time.perf_counter() + 2 * ref_stage_seconds[target] + 30
      if moment == "write":
        what = writes_in_progress(chaos_dir)
        if what is None and time.perf_counter() < write_deadline:
          continue
      elif time.perf_counter() < deadline:
        continue
      started = stages_started(log_path)
      proc.send_signal(sig)
      sent = True
      break
    rc = proc.wait()
    log.close()
    if rc not in (0, -signal.SIGKILL, -signal.SIGTERM):
      errors.append({"attempt": attempt, "exit": rc, "log": log_path})
    if not sent:
      print(f"attempt {attempt}: exit {rc} before the kill in stage {target}", flush=True)
      continue
    kill = {"attempt": attempt, "stage": (started[-1] if started else target),
            "signal": signal.Signals(sig).name, "moment": moment, "writing": what,
            "exit": rc}
    kills.append(kill)
    print(f"attempt {attempt}: {kill['signal']} in {kill['stage']} ({moment}"
          f"{', writing ' + os.path.relpath(what, chaos_dir) if what else ''}) -> exit {rc}",
          flush=True)
    if args.damage and rng.random() < args.damage_prob:
      targets = finished_targets(chaos_dir)
      if targets:
        hit = targets[int(rng.integers(len(targets)))]
        damaged.append(os.path.relpath(damage(hit), chaos_dir))
        print(f"  damaged {damaged[-1]}", flush=True)
  # The last attempt runs to the end (a damaged shard or checkpoint may need one
  # extra start: a stage that finds no intact checkpoint left says so and stops).
  finals = []
  for _ in range(3):
    attempt += 1
    log_path = os.path.join(logs, f"attempt-{attempt:03d}.log")
    proc, log = start(chaos_dir, model, log_path)
    rc = proc.wait()
    log.close()
    finals.append(rc)
    if rc == 0 and not preempted(log_path):
      break
    errors.append({"attempt": attempt, "exit": rc, "log": log_path})
  chaos_seconds = time.perf_counter() - t_chaos

  ref_fp, chaos_fp = fingerprints.fingerprint(ref_dir), fingerprints.fingerprint(chaos_dir)
  keys = sorted(set(ref_fp) | set(chaos_fp))
  mismatches = [k for k in keys if ref_fp.get(k) != chaos_fp.get(k)]
  ref_ids, chaos_ids = record_ids(ref_dir), record_ids(chaos_dir)
  lost = sum(len(set(v) - set(chaos_ids.get(k, []))) for k, v in ref_ids.items())
  duplicated = sum(len(v) - len(set(v)) for v in chaos_ids.values())
  extra = sum(len(set(v) - set(ref_ids.get(k, []))) for k, v in chaos_ids.items())
  completed = finals[-1] == 0 and not preempted(log_path)
  survived = len(kills) if completed and not mismatches and not lost and not duplicated else 0
  summary = {
      "command": " ".join(["python", "benchmarks/chaos.py", f"--kills={args.kills}",
                           f"--seed={args.seed}"] + (["--damage"] if args.damage else [])),
      "kills": len(kills), "kills_survived": survived,
      "kills_per_stage": dict(collections.Counter(k["stage"] for k in kills)),
      "kills_per_signal": dict(collections.Counter(k["signal"] for k in kills)),
      "kills_while_writing": sum(1 for k in kills if k["writing"]),
      "kills_while_writing_checkpoint": sum(1 for k in kills if k["writing"]
                                            and "checkpoint" in k["writing"]),
      "kills_while_writing_shard": sum(1 for k in kills if k["writing"]
                                       and "shard-" in k["writing"]),
      "damaged": damaged,
      "records_reference": sum(len(v) for v in ref_ids.values()),
      "records_lost": lost, "records_duplicated": duplicated, "records_extra": extra,
      "files_compared": len(keys), "mismatches": mismatches,
      "attempts_with_an_error": errors, "completed": completed,
      "reference_seconds": round(ref_seconds, 1), "chaos_seconds": round(chaos_seconds, 1),
      "attempts": attempt, "root": root, "kill_log": kills,
  }
  print(json.dumps({k: v for k, v in summary.items() if k != "kill_log"}, indent=1))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(summary, f, indent=1)
  sys.exit(0 if survived == len(kills) and completed else 1)


if __name__ == "__main__":
  main()
