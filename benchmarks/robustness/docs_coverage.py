"""Every measured figure of the old BENCHMARKS.md and README.md, looked up in the new documents.

  python benchmarks/robustness/docs_coverage.py
  python benchmarks/robustness/docs_coverage.py --skip=README.md   # before the new README lands

The old files are read from git (`--base`, the commit before the documents were split
by purpose). A figure is a number with a decimal point (0.165, 44.2), a percentage
(37.0%), a ratio (2.86x, 4.7×), a number with thousands separators (44,567), a number
in scientific notation (1e-6), or an interval ([0.090, 0.242]); plain integers are
left out (counts and sizes that every page repeats). Signs are ignored, the minus
signs − and - are one, × is x, and an interval's spaces and plus signs do not count.
A figure is found when it stands on its own (not inside a longer number) in any of
docs/*.md, experiments/**/*.md, README.md or benchmarks/README.md.

Prints found/total and each missing figure with the first old line that holds it;
exits 1 when any is missing.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys

OLD_FILES = ("BENCHMARKS.md", "README.md")
NEW_GLOBS = ("docs/*.md", "experiments/**/*.md", "README.md", "benchmarks/README.md")

_NUM = r"\d+(?:,\d{3})*(?:\.\d+)?"
_INTERVAL = re.compile(rf"\[\s*[-+]?{_NUM}\s*,\s*[-+]?{_NUM}\s*\]")
_FIGURE = re.compile(
    rf"\[[-+]?{_NUM},[-+]?{_NUM}\]"          # an interval, normalised
    rf"|\d+(?:\.\d+)?e-?\d+"                  # 1e-6, 4.5e-6
    rf"|{_NUM}(?:%|x(?![A-Za-z0-9]))?")       # 0.165, 44,567, 37.0%, 2.86x


def normalise(text: str) -> str:
  """One spelling per figure: ASCII minus and x, intervals without spaces or plus signs."""
  text = text.replace("\u2212", "-").replace("\u00d7", "x")
  return _INTERVAL.sub(lambda m: re.sub(r"[\s+]", "", m.group(0)), text)


def is_figure(token: str) -> bool:
  return token.startswith("[") or any(c in token for c in ".,%xe")


def figures(text: str) -> dict[str, int]:
  """Each figure of `text` -> the 1-based line it first appears on."""
  first: dict[str, int] = {}
  for lineno, line in enumerate(normalise(text).split("\n"), 1):
    for m in _FIGURE.finditer(line):
      token = m.group(0)
      if is_figure(token):
        first.setdefault(token, lineno)
  return first


def found(token: str, corpus: str) -> bool:
  return re.search(rf"(?<![\d.,]){re.escape(token)}(?!\d)", corpus) is not None


def old_text(base: str, path: str) -> str:
  try:
    return subprocess.run(["git", "show", f"{base}:{path}"], check=True,
                          capture_output=True, text=True).stdout
  except subprocess.CalledProcessError as e:
    sys.exit(f"git show {base}:{path}: {e.stderr.strip()}; fix: run from the repository "
             f"root with --base naming a commit that has {path}")


def new_files(skip: set[str]) -> list[str]:
  paths = sorted({p for g in NEW_GLOBS for p in glob.glob(g, recursive=True)})
  return [p for p in paths if p not in skip]


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--base", default="0867f6a",
                  help="commit whose BENCHMARKS.md and README.md are the old documents")
  ap.add_argument("--skip", default="",
                  help="comma-separated new files to leave out of the search, e.g. README.md")
  args = ap.parse_args(argv)
  skip = {s for s in args.skip.split(",") if s}
  paths = new_files(skip)
  corpus = "\n".join(normalise(open(p, encoding="utf-8").read()) for p in paths)
  total = missing = 0
  seen: set[str] = set()
  for old in OLD_FILES:
    text = old_text(args.base, old)
    lines = normalise(text).split("\n")
    for token, lineno in figures(text).items():
      if token in seen:
        continue
      seen.add(token)
      total += 1
      if not found(token, corpus):
        missing += 1
        print(f"missing {token}  ({old}:{lineno}: {lines[lineno - 1].strip()[:160]})")
  print(f"{total - missing} of {total} figures found in {len(paths)} files"
        f"{' (skipped: ' + ', '.join(sorted(skip)) + ')' if skip else ''}")
  return 1 if missing else 0


if __name__ == "__main__":
  os.chdir(os.path.dirname(os.path.abspath(__file__)) + "/../..")
  sys.exit(main())
