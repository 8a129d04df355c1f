"""The test suite's time per file, from pytest's JUnit XML: where the suite's minutes go.

  python -m pytest -q --junitxml=/tmp/suite.xml          # the README's test command + a report
  python -m benchmarks.robustness.suite_time /tmp/suite.xml [/tmp/other.xml] \
      [--wall=1284,1100] [--out=benchmarks/results/cpu/suite_time.json]

Per test file: the tests' summed seconds (setup + call + teardown, as JUnit records them
on the worker that ran them) and their count; with two reports, both side by side and
the difference. `--wall` gives each run's wall seconds (pytest's own last line) to set
beside the summed seconds: with two xdist workers the wall time is at least half the sum.
Prints a Markdown table; `--out` also writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import collections
import json
import xml.etree.ElementTree as ET


def per_file(junit_path: str) -> dict[str, tuple[float, int]]:
  """{test file (module path): (summed seconds, tests)} of one JUnit XML report."""
  seconds, count = collections.Counter(), collections.Counter()
  for case in ET.parse(junit_path).getroot().iter("testcase"):
    module = case.get("classname", "")
    seconds[module] += float(case.get("time", 0.0))
    count[module] += 1
  return {m: (seconds[m], count[m]) for m in seconds}


def table(runs: list[dict[str, tuple[float, int]]], walls: list[float]) -> tuple[list[str], dict]:
  files = sorted({f for r in runs for f in r}, key=lambda f: -max(r.get(f, (0, 0))[0]
                                                                  for r in runs))
  head = ["file"] + [f"run {i + 1} s (tests)" for i in range(len(runs))]
  if len(runs) == 2:
    head.append("difference s")
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for f in files:
    cells = [f"`{f}`"] + [f"{r[f][0]:.1f} ({r[f][1]})" if f in r else "-" for r in runs]
    if len(runs) == 2:
      cells.append(f"{runs[1].get(f, (0, 0))[0] - runs[0].get(f, (0, 0))[0]:+.1f}")
    lines.append("| " + " | ".join(cells) + " |")
  totals = [sum(s for s, _ in r.values()) for r in runs]
  cells = ["**all**"] + [f"{t:.1f} ({sum(n for _, n in r.values())})"
                         for t, r in zip(totals, runs)]
  if len(runs) == 2:
    cells.append(f"{totals[1] - totals[0]:+.1f}")
  lines.append("| " + " | ".join(cells) + " |")
  if walls:
    lines += ["", "Wall seconds (pytest's last line): " + ", ".join(
        f"run {i + 1} {w:.0f} s (summed test seconds / 2 = {t / 2:.0f} s)"
        for i, (w, t) in enumerate(zip(walls, totals))) + "."]
  return lines, {"runs": [{"files": {f: {"seconds": s, "tests": n} for f, (s, n) in r.items()},
                           "summed_seconds": t, **({"wall_seconds": walls[i]}
                                                   if i < len(walls) else {})}
                          for i, (r, t) in enumerate(zip(runs, totals))]}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("junit", nargs="+", help="one or two pytest --junitxml reports")
  parser.add_argument("--wall", default="", help="each run's wall seconds, comma-separated")
  parser.add_argument("--out", default="", help="also write the figures as JSON here")
  args = parser.parse_args()
  if len(args.junit) > 2:
    parser.error("give one or two reports")
  walls = [float(w) for w in args.wall.split(",") if w]
  lines, data = table([per_file(p) for p in args.junit], walls)
  print("\n".join(lines))
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"reports": args.junit, **data}, f, indent=1)


if __name__ == "__main__":
  main()
