"""Publish a run's claims: copy `<workdir>/p8_evaluation/evidence.json` to `--out` and
rewrite the claims block of `--doc` from it (between the `<!-- evidence:begin -->` and
`<!-- evidence:end -->` markers, `cai_jax.evaluation.report.claims_block`), so the published table
is generated from the measured run, never typed; the report's frontier figure
(`report/frontier.png`) is copied beside `--out`. The committed table of docs/results.md:

  python -m benchmarks.quality.evidence --workdir=runs/cai \
      --out=experiments/2026-12-06-run10-fresh-clone/evidence_cpu.json \
      --decode=experiments/2026-12-06-run10-fresh-clone/decode_cpu.json

`--recompute` reruns stage 8's last step on a finished workdir with today's code
(`cai_jax.evaluation.diagnosis.recompute`), refusing if any claim's estimate, interval,
n or verdict differs from what stage 8 wrote (then the run, not this script, must be
redone).
"""

from __future__ import annotations

import json
import os
import shutil

from absl import app, flags

from benchmarks.common import outputs
from cai_jax.evaluation import report
from cai_jax.evaluation import diagnosis, evidence
from cai_jax import paths

_WORKDIR = flags.DEFINE_string("workdir", None, "A pipeline workdir whose stage 8 has run.",
                               required=True)
_OUT = flags.DEFINE_string("out", "", "Where to copy the claims (default:"
                           " benchmarks/results/<machine>/evidence.json).")
_DOC = flags.DEFINE_string("doc", "docs/results.md", "The document whose claims block to"
                           " rewrite; '' rewrites none.")
_DECODE = flags.DEFINE_string("decode", "", "A benchmarks/perf/decode.py result of the run's"
                              " day, for its speed.")
_RECOMPUTE = flags.DEFINE_bool("recompute", False, "Recompute the claims and their failed"
                               " signals from the workdir.")


def main(argv) -> None:
  del argv
  src = os.path.join(paths.stage_dir(_WORKDIR.value, paths.EVALUATION), evidence.EVIDENCE_FILE)
  if not os.path.exists(src):
    raise SystemExit(f"error: {src}: missing; run stage 8 (p8_evaluation) first")
  with open(src) as f:
    claims = json.load(f)
  try:
    if _RECOMPUTE.value:
      claims = diagnosis.recompute(_WORKDIR.value, claims)
      evidence.write(src, claims)
    out = outputs.path("evidence", _OUT.value)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    print(evidence.write(out, claims))
    # The frontier figure the report drew from these claims, beside them (docs link it).
    fig = os.path.join(paths.stage_dir(_WORKDIR.value, paths.REPORT), "frontier.png")
    if os.path.exists(fig):
      shutil.copyfile(fig, os.path.join(os.path.dirname(out) or ".", "frontier.png"))
      print(os.path.join(os.path.dirname(out) or ".", "frontier.png"))
    if _DOC.value:
      timings, note = report.pipeline_seconds(_WORKDIR.value)
      report.rewrite_block(_DOC.value, report.claims_block(claims, out, timings, note,
                                                           _DECODE.value))
      print(_DOC.value)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  app.run(main)
