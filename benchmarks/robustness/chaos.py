"""Chaos run: the tiny pipeline killed at seeded random moments, then compared bit
for bit with an uninterrupted run.

  python -m benchmarks.robustness.chaos --kills=50 --seed=0  # -> benchmarks/results/cpu/chaos.json
  python -m benchmarks.robustness.chaos --kills=30 --seed=1 --damage  # -> .../chaos-damage.json
  python -m benchmarks.robustness.chaos --markdown benchmarks/results/cpu/chaos.json  # its table

The pipeline runs as users run it (`python -m cai_jax.pipeline`, the tiny+dpo
config of tests/test_pipeline.py) in a child process. First an uninterrupted
reference run, twice (cold and warm compilation cache: the two must agree; the
warm one's per-stage wall times place the kills). Then the chaos run
from an empty workdir: the kills are spread evenly over the stages in
pipeline order; for each one the harness waits until the child's log says the
target stage started, then kills it (SIGKILL or SIGTERM, seeded) either after a
random fraction of that stage's reference time, or the moment a checkpoint or
shard is being written (an Orbax temporary directory or a `*.tmp` file shows
up in the workdir), and at the latest when the next stage starts. After each
kill the same command is run again. When a run gets to the end before its kill
(the last stage can finish first), that workdir is an episode: it is compared
and the next kills go to a new, empty workdir. With
`--damage`, between kills it also flips 16 bytes in a random finished
checkpoint step (its largest params file) or record shard, each kind with even
odds (seeded), as disk rot or a torn copy would (`cai_jax.faults.damage`).
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

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEVICES = "--xla_force_host_platform_device_count=8"  # the tests' CPU mesh
os.environ.setdefault("XLA_FLAGS", DEVICES)
sys.path.insert(0, REPO)

from benchmarks.common import outputs  # noqa: E402
from benchmarks.robustness import pipeline_fingerprint as fingerprints  # noqa: E402
from cai_jax.faults import damage  # noqa: E402

STAGE_LINE = re.compile(r"=== stage (\w+) ===")
TRAINING = ("sft", "preference_model", "ppo", "dpo")
GENERATION = ("critique_revision", "pairs", "ai_labels", "evaluation")


def command(workdir: str, model: str) -> list[str]:
  return [sys.executable, "-m", "cai_jax.pipeline",
          f"--config=tiny_pipeline:{model}", f"--workdir={workdir}",
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


def temporaries(workdir: str) -> dict[str, float]:
  """{path: mtime} of Orbax temporary steps and `*.tmp` files (writes under way, or
  left by a killed write)."""
  out = {}
  for root, dirs, files in os.walk(workdir):
    for name in [d for d in dirs if "orbax-checkpoint-tmp" in d] + [
        f for f in files if f.endswith(".tmp") and ("shard-" in f or "checkpoint" in root)]:
      try:
        out[os.path.join(root, name)] = os.stat(os.path.join(root, name)).st_mtime_ns
      except FileNotFoundError:  # renamed into place meanwhile
        pass
  return out


def writes_in_progress(workdir: str, left_over: dict[str, float]) -> str | None:
  """A path being written now: a temporary that a killed attempt did not leave as is."""
  for path, mtime in temporaries(workdir).items():
    if left_over.get(path) != mtime:
      return path
  return None


def finished_targets(workdir: str) -> dict[str, list[str]]:
  """Finished checkpoint steps and record shards: what the damage variant may hit."""
  steps = [d for d in glob.glob(os.path.join(workdir, "*", "checkpoints", "*"))
           if os.path.basename(d).isdigit()]
  shards = glob.glob(os.path.join(workdir, "**", "shard-*.jsonl"), recursive=True)
  return {"checkpoint": sorted(steps), "shard": sorted(shards)}


def record_ids(workdir: str) -> dict[str, list[str]]:
  out = {}
  dirs = {os.path.dirname(p) for p in glob.glob(os.path.join(workdir, "**", "shard-*.jsonl"),
                                                 recursive=True)}
  for d in sorted(dirs):
    ids = []
    for path in sorted(glob.glob(os.path.join(d, "shard-*.jsonl"))):
      with open(path, encoding="utf-8") as f:
        ids += [f"{json.loads(line).get('id')}/{json.loads(line).get('model', '')}"
                for line in f if line.strip()]
    if ids:
      out[os.path.relpath(d, workdir)] = ids
  return out


def run_reference(workdir: str, model: str, logs: str, name: str = "reference"
                  ) -> tuple[float, dict[str, float]]:
  t0 = time.perf_counter()
  proc, log = start(workdir, model, os.path.join(logs, f"{name}.log"))
  rc = proc.wait()
  log.close()
  if rc != 0:
    sys.exit(f"the reference run failed (exit {rc}); see {logs}/reference.log")
  with open(os.path.join(workdir, "pipeline_timings.json")) as f:
    return time.perf_counter() - t0, json.load(f)


def _damaged_line(damaged: list[str]) -> str:
  """"13: 7 in checkpoints (p3_sft step 8 x3, ...), 6 shards (...)"."""
  ckpt = collections.Counter(re.sub(r"^[^/]*/([^/]+)/checkpoints/(\d+)/.*$", r"\1 step \2", d)
                             for d in damaged if "/checkpoints/" in d)
  shards = [re.sub(r"^[^/]*/", "", d) for d in damaged if "/checkpoints/" not in d]
  parts = []
  if ckpt:
    parts.append(f"{sum(ckpt.values())} in checkpoints ("
                 + ", ".join(f"{k} x{v}" if v > 1 else k for k, v in ckpt.items()) + ")")
  if shards:
    parts.append(f"{len(shards)} shards (" + ", ".join(f"`{d}`" for d in shards) + ")")
  return f"{len(damaged)}" + (": " + "; ".join(parts) if parts else "")


def markdown(summary: dict) -> str:
  """The Markdown table of one run's figures (`--markdown results.json`)."""
  stages = ", ".join(f"{k} {v}" for k, v in summary["kills_per_stage"].items())
  signals = ", ".join(f"{k} {v}" for k, v in summary["kills_per_signal"].items())
  rows = [
      ("command", f"`{summary['command']}`"),
      ("kills survived", f"{summary['kills_survived']} of {summary['kills']}"
                         f" ({summary['episodes_identical']} of {summary['episodes']}"
                         " episodes identical to the reference)"),
      ("kills per stage", stages), ("kills per signal", signals),
      ("kills while a checkpoint was being written",
       str(summary["kills_while_writing_checkpoint"])),
      ("kills while a shard was being written", str(summary["kills_while_writing_shard"])),
      ("files damaged between kills", _damaged_line(summary["damaged"])),
      ("records lost / duplicated / extra",
       f"{summary['records_lost']} / {summary['records_duplicated']} /"
       f" {summary['records_extra']} (reference: {summary['records_reference']} records)"),
      ("mismatches", f"{summary['mismatches']} of {summary['files_compared_per_episode']}"
                     " files per episode (records, newest params, results.json)"),
      ("attempts that ended in an error", str(len(summary["attempts_with_an_error"]))),
      ("reference runs (cold / warm cache) identical", str(summary["reference_runs_identical"])),
      ("wall time", f"reference {summary['reference_seconds_cold']} s cold,"
                    f" {summary['reference_seconds']} s warm; chaos {summary['chaos_seconds']} s"
                    f" over {summary['attempts']} starts"),
  ]
  return "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def main() -> None:
  if len(sys.argv) == 3 and sys.argv[1] == "--markdown":
    with open(sys.argv[2]) as f:
      print(markdown(json.load(f)))
    return
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--kills", type=int, default=50)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--damage", action="store_true",
                      help="also damage a finished checkpoint or shard between kills")
  parser.add_argument("--damage_prob", type=float, default=0.5)
  parser.add_argument("--root", help="working directory (default: a temporary one)")
  parser.add_argument("--out", default="", help="write the figures as JSON here (default:"
                      " benchmarks/results/<machine>/chaos[-damage].json)")
  args = parser.parse_args()
  out = outputs.path("chaos", args.out, "damage" if args.damage else "",
                     outputs.local_gpu() or "cpu")
  rng = np.random.default_rng(args.seed)
  root = args.root or tempfile.mkdtemp(prefix="cai_chaos_")
  logs = os.path.join(root, "logs")
  os.makedirs(logs, exist_ok=True)
  model = fingerprints.tiny_model(os.path.join(root, "tiny_model"))
  ref_dir = os.path.join(root, "reference")
  for d in [ref_dir] + glob.glob(os.path.join(root, "chaos-*")):
    shutil.rmtree(d, ignore_errors=True)

  # Two uninterrupted runs: the first fills the compilation cache, the second (warm,
  # as every restart of the chaos run is) times the stages that place the kills.
  # They must agree with each other too.
  cold_dir = os.path.join(root, "reference_cold")
  shutil.rmtree(cold_dir, ignore_errors=True)
  cold_seconds, _ = run_reference(cold_dir, model, logs, "reference_cold")
  ref_seconds, ref_stage_seconds = run_reference(ref_dir, model, logs)
  stages = list(ref_stage_seconds)
  print(f"reference runs: {cold_seconds:.0f} s cold, {ref_seconds:.0f} s warm; warm stages"
        f" { {k: round(v, 1) for k, v in ref_stage_seconds.items()} }", flush=True)

  # Kills spread evenly over the stages, in pipeline order; kind and moment seeded.
  plan = [stages[i * len(stages) // args.kills] for i in range(args.kills)]
  kills, errors, damaged, episodes = [], [], [], []
  attempt, episode = 0, {"index": 0, "kills": [], "damaged": []}
  chaos_dir = os.path.join(root, "chaos-0")

  def run_once() -> tuple[int, str]:
    nonlocal attempt
    attempt += 1
    log_path = os.path.join(logs, f"attempt-{attempt:03d}.log")
    proc, log = start(chaos_dir, model, log_path)
    rc = proc.wait()
    log.close()
    return rc, log_path

  def close_episode(complete: bool) -> None:
    """Compares the episode's finished workdir with the reference."""
    nonlocal chaos_dir, episode
    fp = fingerprints.fingerprint(chaos_dir)
    ids = record_ids(chaos_dir)
    episode.update(
        workdir=chaos_dir, completed=complete,
        mismatches=[k for k in sorted(set(ref_fp) | set(fp)) if ref_fp.get(k) != fp.get(k)],
        records_lost=sum(len(set(v) - set(ids.get(k, []))) for k, v in ref_ids.items()),
        records_duplicated=sum(len(v) - len(set(v)) for v in ids.values()),
        records_extra=sum(len(set(v) - set(ref_ids.get(k, []))) for k, v in ids.items()),
        files_compared=len(set(ref_fp) | set(fp)))
    episodes.append(episode)
    print(f"episode {episode['index']}: {len(episode['kills'])} kills, completed {complete},"
          f" {len(episode['mismatches'])} mismatches, lost {episode['records_lost']},"
          f" duplicated {episode['records_duplicated']}", flush=True)
    episode = {"index": episode["index"] + 1, "kills": [], "damaged": []}
    chaos_dir = os.path.join(root, f"chaos-{episode['index']}")

  ref_fp, ref_ids = fingerprints.fingerprint(ref_dir), record_ids(ref_dir)
  t_chaos = time.perf_counter()
  for target in plan:
    attempt += 1
    log_path = os.path.join(logs, f"attempt-{attempt:03d}.log")
    sig = signal.SIGKILL if rng.random() < 0.5 else signal.SIGTERM
    moment = rng.choice(["random", "write"]) if target in TRAINING + GENERATION else "random"
    fraction = float(rng.random())
    left_over = temporaries(chaos_dir)
    proc, log = start(chaos_dir, model, log_path)
    what, deadline, sent, started = None, None, False, []
    while proc.poll() is None:
      time.sleep(0.02)
      started = stages_started(log_path)
      if target not in started:
        continue
      past = started[-1] != target  # the target stage ended: kill now, at the boundary
      if deadline is None:
        deadline = time.perf_counter() + fraction * ref_stage_seconds[target]
      if moment == "write" and not past:
        what = writes_in_progress(chaos_dir, left_over)
        if what is None:
          continue
      elif time.perf_counter() < deadline and not past:
        continue
      proc.send_signal(sig)
      sent = True
      break
    rc = proc.wait()
    log.close()
    if rc not in (0, -signal.SIGKILL, -signal.SIGTERM):
      errors.append({"attempt": attempt, "exit": rc, "log": log_path})
    if sent:
      kill = {"attempt": attempt, "episode": episode["index"],
              "stage": started[-1] if started else target, "signal": signal.Signals(sig).name,
              "moment": moment, "writing": what and os.path.relpath(what, chaos_dir),
              "exit": rc}
      kills.append(kill)
      episode["kills"].append(attempt)
      print(f"attempt {attempt}: {kill['signal']} in {kill['stage']} ({moment}"
            f"{', writing ' + kill['writing'] if what else ''}) -> exit {rc}", flush=True)
    if rc == 0 and not preempted(log_path):  # the pipeline finished before the kill
      print(f"attempt {attempt}: the pipeline finished before the kill in {target}",
            flush=True)
      close_episode(True)
      continue
    if args.damage and rng.random() < args.damage_prob:
      found = finished_targets(chaos_dir)  # a checkpoint or a shard, even odds
      targets = found[rng.choice(["checkpoint", "shard"])] or found["checkpoint"] + found[
          "shard"]
      if targets:
        hit = targets[int(rng.integers(len(targets)))]
        damaged.append(os.path.relpath(damage(hit), root))
        episode["damaged"].append(damaged[-1])
        print(f"  damaged {damaged[-1]}", flush=True)
  # Then to the end (a stage that finds no intact checkpoint left, after a damaged
  # unsealed one failed to restore, says so and stops: one more start).
  if episode["kills"]:
    for _ in range(3):
      rc, log_path = run_once()
      if rc == 0 and not preempted(log_path):
        break
      errors.append({"attempt": attempt, "exit": rc, "log": log_path})
    close_episode(rc == 0 and not preempted(log_path))
  chaos_seconds = time.perf_counter() - t_chaos

  cold_fp = fingerprints.fingerprint(cold_dir)
  clean = [e for e in episodes if e["completed"] and not e["mismatches"]
           and not e["records_lost"] and not e["records_duplicated"]]
  summary = {
      "command": " ".join(["python -m benchmarks.robustness.chaos", f"--kills={args.kills}",
                           f"--seed={args.seed}"] + (["--damage"] if args.damage else [])),
      "kills": len(kills), "kills_survived": sum(len(e["kills"]) for e in clean),
      "episodes": len(episodes), "episodes_identical": len(clean),
      "kills_per_stage": dict(collections.Counter(k["stage"] for k in kills)),
      "kills_per_signal": dict(collections.Counter(k["signal"] for k in kills)),
      "kills_while_writing_checkpoint": sum(1 for k in kills if k["writing"]
                                            and "checkpoint" in k["writing"]),
      "kills_while_writing_shard": sum(1 for k in kills if k["writing"]
                                       and "shard-" in k["writing"]),
      "damaged": damaged,
      "records_reference": sum(len(v) for v in ref_ids.values()),
      "records_lost": sum(e["records_lost"] for e in episodes),
      "records_duplicated": sum(e["records_duplicated"] for e in episodes),
      "records_extra": sum(e["records_extra"] for e in episodes),
      "files_compared_per_episode": len(ref_fp),
      "mismatches": sum(len(e["mismatches"]) for e in episodes),
      "attempts_with_an_error": errors,
      "reference_runs_identical": cold_fp == ref_fp,
      "reference_seconds_cold": round(cold_seconds, 1), "reference_seconds": round(ref_seconds, 1),
      "chaos_seconds": round(chaos_seconds, 1), "attempts": attempt, "root": root,
      "episode_log": episodes, "kill_log": kills,
  }
  print(json.dumps({k: v for k, v in summary.items() if k not in ("kill_log", "episode_log")},
                   indent=1))
  print(outputs.write(out, summary))
  ok = len(clean) == len(episodes) and summary["reference_runs_identical"]
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  main()
