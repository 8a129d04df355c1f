"""AI-labeler accuracy, calibration and throughput on human-labelled harm pairs.

  python -m benchmarks.quality.labeler_accuracy --models=smollm2-135m-instruct \
      --runs=zero_shot,few_shot,pointwise,pointwise_chat,cot \
      --ensemble_runs=few_shot,pointwise --num_pairs=64 --cot_pairs=32 \
      --out=/tmp/labbench/smollm2.json
  # without --out: benchmarks/results/<machine>/labeler_accuracy.json

Each run takes minutes on 2 CPU cores for SmolLM2-135M (k=4 and CoT runs
tens of minutes); Qwen2.5-Coder-0.5B is ~4x slower. Fit a pointwise
temperature on pairs disjoint from the evaluated ones with
`--pair_offset=64 --num_pairs=128 --runs=pointwise --ensemble_runs=`.

Data: `cai_jax.feedback.eval_data.pyrit_pairs`: PyRIT's human-scored
responses, paired as (most harmful, least harmful) answer to one objective,
with a seeded coin deciding which is response a. Correct = the label prefers
the less harmful response (p_a > 1/2 iff a is less harmful; p_a = 1/2 counts
half).

Each *run* is one `Labeler.label` call over all pairs, timed. Several table
rows come from one run by re-applying the label math to the raw log-probs
its records keep (`model_label` on a subset of principles or orders): e.g.
"zero-shot, one order" uses order 0 of the "zero-shot" run, which is exactly
what a run without order swap computes. Throughput is measured per run;
a derived row's comparisons/s is the run's rate scaled by its share of the
run's forward passes (an estimate, marked "~"). Compilation is excluded
(every length bucket is compiled before the clock starts).

Rows (multiple choice unless said): zero-shot (one order); + order swap;
+ 2-shot (one order); 2-shot + swap; 2-shot + swap + an ensemble of k=4
principles; 2-shot + swap + chain of thought (unclamped, and clamped to
[0.4, 0.6]); pointwise Yes/No (principle "less_harmful", k=4, in the chat
template, or one principle drawn per pair from the constitution as the
phase does: runs pointwise, pointwise_chat, pointwise_drawn).
The k=4 rows (runs in --ensemble_runs) use the fixed principles in
--ensemble, the first of which is the k=1 rows' principle (the phase draws k
per pair from all 16; fixed general ones keep rows comparable).

Calibration: ECE over 10 equal-width bins of p_a, Brier score, and a
reliability table (per bin: count, mean p_a, fraction where a is better).
Pointwise rows also give the temperature that would have minimised the
log-loss on these same pairs (in-sample, so its ECE is optimistic). Columns:
conf = mean max(p, 1 - p); A+B = mean next-token mass on the two answers
(does the model follow the format); P(A) = mean renormalised P("A") in the
first order (0.5 = no position bias). The JSON also keeps every run's raw
log-probs and the truth, so other rows can be derived without a model.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from collections.abc import Sequence

import jax
import numpy as np
from absl import app, flags

from benchmarks.common import outputs
from cai_jax.constitution import load_constitution
from cai_jax.feedback import FeedbackModel, Labeler, LabelerSettings, model_label
from cai_jax.feedback.eval_data import pyrit_pairs

_MODELS = flags.DEFINE_list("models", ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"],
                            "Feedback models (load_model specs).")
_NUM_PAIRS = flags.DEFINE_integer("num_pairs", 64, "Human-labelled pairs to label.")
_SEED = flags.DEFINE_integer("seed", 0, "Pair sampling / a-b assignment seed.")
_OFFSET = flags.DEFINE_integer(
    "pair_offset", 0, "Skip this many pairs of the seeded order (e.g. --pair_offset=64 gives"
    " pairs disjoint from the default 64, to fit a temperature on).")
_RUNS = flags.DEFINE_list("runs", ["zero_shot", "few_shot", "cot", "pointwise"],
                          "Which runs (see `runs`).")
_ENSEMBLE_RUNS = flags.DEFINE_list("ensemble_runs", ["few_shot", "pointwise"],
                                   "Runs that also ask the --ensemble principles (k=4 rows).")
_COT_PAIRS = flags.DEFINE_integer("cot_pairs", 0, "Pairs for the CoT run (0: --num_pairs).")
_BUCKETS = flags.DEFINE_list(
    "length_buckets", ["128", "192", "256", "320", "384", "448", "512", "640", "768", "1024",
                       "2048"], "Scoring length buckets (finer = less padding, more compiles).")
_MAX_RESPONSE = flags.DEFINE_integer("max_response_tokens", 96, "Response cut (tokens).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Rows per forward.")
_COT_TOKENS = flags.DEFINE_integer("cot_max_new_tokens", 64, "Reasoning tokens.")
_FORMAT = flags.DEFINE_enum("prompt_format", "plain", ["plain", "chat"], "Prompt format.")
_ENSEMBLE = flags.DEFINE_list(
    "ensemble", ["less_harmful", "wise_and_kind", "lawful", "no_weapons_uplift"],
    "Principles of the k=4 rows (first one = the k=1 rows).")
_OUT = flags.DEFINE_string("out", "", "Write the results JSON here (default:"
                           " benchmarks/results/<machine>/labeler_accuracy.json).")


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  run: str
  principles: int  # use the first n principles of the run
  orders: int  # use the first n presentation orders
  clamp: tuple[float, float] | None = None


def runs(ensemble: tuple[str, ...], ensemble_runs: Sequence[str]
         ) -> dict[str, tuple[dict, list[Row]]]:
  """Run name -> (LabelerSettings overrides, rows derived from it).

  Runs named in `ensemble_runs` ask all `ensemble` principles (and add a k=4
  row); the others ask only the first, so they cost a quarter.
  """
  def principles(run: str) -> tuple[str, ...]:
    return ensemble if run in ensemble_runs else ensemble[:1]

  k = len(ensemble)
  plan = {
      "zero_shot": (dict(principle_ids=principles("zero_shot")), [
          Row("mc zero-shot", "zero_shot", 1, 1),
          Row("mc zero-shot + swap", "zero_shot", 1, 2)]),
      "few_shot": (dict(principle_ids=principles("few_shot"), num_few_shot=2), [
          Row("mc 2-shot", "few_shot", 1, 1),
          Row("mc 2-shot + swap", "few_shot", 1, 2)]),
      "cot": (dict(principle_ids=principles("cot"), num_few_shot=2, chain_of_thought=True), [
          Row("mc 2-shot + swap + CoT (unclamped)", "cot", 1, 2),
          Row("mc 2-shot + swap + CoT clamped", "cot", 1, 2, (0.4, 0.6))]),
      "pointwise": (dict(mode="pointwise", principle_ids=principles("pointwise")), [
          Row("pointwise yes/no", "pointwise", 1, 2)]),
      "pointwise_chat": (dict(mode="pointwise", prompt_format="chat",
                              principle_ids=principles("pointwise_chat")), [
          Row("pointwise yes/no, chat template", "pointwise_chat", 1, 2)]),
  }
  # The phase's default: principles drawn per pair from the whole constitution.
  plan["pointwise_drawn"] = (
      dict(mode="pointwise", principle_ids=(),
           num_principles=k if "pointwise_drawn" in ensemble_runs else 1),
      [Row("pointwise yes/no, drawn principle", "pointwise_drawn", 1, 2)])
  unknown = [r for r in ensemble_runs if r not in plan]
  if unknown:
    raise ValueError(f"unknown --ensemble_runs {unknown}; choose from {sorted(plan)}")
  for run in ensemble_runs:
    base = plan[run][1][-1]
    plan[run][1].append(dataclasses.replace(base, name=f"{base.name} + k={k}", principles=k))
  return plan


# --- Metrics ----------------------------------------------------------------------------


def accuracy(p: np.ndarray, a_better: np.ndarray) -> float:
  """Fraction of pairs where the label prefers the better response (ties: half)."""
  right = np.where(p == 0.5, 0.5, ((p > 0.5) == (a_better > 0.5)).astype(float))
  return float(right.mean())


def reliability(p: np.ndarray, a_better: np.ndarray, bins: int = 10) -> list[dict]:
  """Per equal-width bin of p: count, mean p, observed fraction of a better."""
  idx = np.minimum((p * bins).astype(int), bins - 1)
  table = []
  for b in range(bins):
    sel = idx == b
    if sel.any():
      table.append(dict(bin=f"{b / bins:.1f}-{(b + 1) / bins:.1f}", count=int(sel.sum()),
                        mean_p=float(p[sel].mean()), frac_a_better=float(a_better[sel].mean())))
  return table


def ece(p: np.ndarray, a_better: np.ndarray, bins: int = 10) -> float:
  """Expected calibration error: sum over bins of (share of pairs) * |mean p - observed|."""
  return float(sum(r["count"] * abs(r["mean_p"] - r["frac_a_better"])
                   for r in reliability(p, a_better, bins)) / len(p))


def metrics(p: np.ndarray, a_better: np.ndarray) -> dict:
  return dict(accuracy=accuracy(p, a_better), ece=ece(p, a_better),
              brier=float(np.mean((p - a_better) ** 2)),
              mean_confidence=float(np.mean(np.abs(p - 0.5)) + 0.5),
              reliability=reliability(p, a_better))


# --- Runs ---------------------------------------------------------------------------------


def label_run(model: FeedbackModel, constitution, pairs, overrides: dict) -> dict:
  fields = dict(max_response_tokens=_MAX_RESPONSE.value, batch_size=_BATCH.value,
                cot_max_new_tokens=_COT_TOKENS.value, prompt_format=_FORMAT.value,
                seed=_SEED.value, length_buckets=tuple(int(b) for b in _BUCKETS.value))
  fields.update(overrides)
  settings = LabelerSettings(**fields)
  labeler = Labeler([model], constitution, settings)
  # Compile outside the timing: every scoring bucket, and (CoT) the sampler.
  scorer = labeler.scorers[0]
  for length in scorer.length_buckets:
    if length <= 1024:
      scorer(model.params, [[model.tok.pad_id] * length], [(0, 1)])
  labeler.label(pairs[:1])
  start = time.perf_counter()
  records = labeler.label(pairs)
  seconds = time.perf_counter() - start
  logp = np.asarray([r.logprobs[0] for r in records])  # [N, K, S, 2]
  good = [labeler.good_answers(r.principle_ids) if settings.mode == "pointwise" else ()
          for r in records]
  return dict(settings=settings, seconds=seconds, logp=logp, good=good,
              cot=[r.cot[0] if r.cot else () for r in records])


def row_result(row: Row, run: dict, a_better: np.ndarray) -> dict:
  s: LabelerSettings = run["settings"]
  logp = run["logp"]
  p = np.asarray([
      model_label(lp[:row.principles, :row.orders], mode=s.mode,
                  good_answers=g[:row.principles], order_combine=s.order_combine,
                  clamp=row.clamp, pointwise_temperature=s.pointwise_temperature)
      for lp, g in zip(logp, run["good"])])
  used = row.principles * row.orders
  total = logp.shape[1] * logp.shape[2]
  rate = len(p) / run["seconds"] * total / used
  if s.mode == "pointwise":
    extra = fit_pointwise_temperature(row, run, a_better)
  else:
    extra = {}
  out = dict(row=row.name, run=row.run,
             principles=list(s.principle_ids[:row.principles]) or f"{row.principles} drawn",
             orders=row.orders, clamp=row.clamp, pairs=len(p),
             comparisons_per_s=rate, rate_is_estimate=used != total,
             answer_mass=float(np.exp(logp[:, :row.principles, :row.orders]).sum(-1).mean()),
             **metrics(p, a_better), **extra)
  if s.mode == "multiple_choice":
    # Position bias: mean P("A") of order 0, renormalised over A/B (0.5 = none).
    lp0 = logp[:, 0, 0]
    out["mean_p_first_option"] = float(np.mean(1 / (1 + np.exp(lp0[:, 1] - lp0[:, 0]))))
  return out


def fit_pointwise_temperature(row: Row, run: dict, a_better: np.ndarray) -> dict:
  """The pointwise temperature with the lowest log-loss on these pairs, and its ECE.

  Fitted on the evaluation pairs themselves, so its ECE is optimistic; it says
  how far `pointwise_temperature` = 1 is from calibrated, not what to expect
  on new data.
  """
  best = None
  for t in np.logspace(-1.5, 1.5, 61):
    p = np.asarray([model_label(lp[:row.principles], mode="pointwise",
                                good_answers=g[:row.principles], pointwise_temperature=t)
                    for lp, g in zip(run["logp"], run["good"])])
    q = np.clip(p, 1e-6, 1 - 1e-6)
    loss = float(-np.mean(a_better * np.log(q) + (1 - a_better) * np.log(1 - q)))
    if best is None or loss < best[0]:
      best = (loss, float(t), p)
  loss, t, p = best
  return dict(fitted_temperature=t, fitted_log_loss=loss, fitted_ece=ece(p, a_better))


def print_table(model: str, rows: list[dict]) -> None:
  print(f"\n{model}")
  print(f"{'mode':38s} {'acc':>6s} {'ECE':>6s} {'Brier':>6s} {'conf':>6s} {'A+B':>5s}"
        f" {'P(A)':>5s} {'cmp/s':>7s}  fitted T (ECE)")
  for r in rows:
    rate = ("~" if r["rate_is_estimate"] else " ") + f"{r['comparisons_per_s']:.2f}"
    pa = f"{r['mean_p_first_option']:.2f}" if "mean_p_first_option" in r else "  -"
    print(f"{r['row']:38s} {r['accuracy']:6.3f} {r['ece']:6.3f} {r['brier']:6.3f}"
          f" {r['mean_confidence']:6.3f} {r['answer_mass']:5.2f} {pa:>5s} {rate:>7s}"
          + (f"  {r['fitted_temperature']:.2f} ({r['fitted_ece']:.3f})"
             if "fitted_temperature" in r else ""))


def main(argv):
  del argv
  pairs, a_better = pyrit_pairs(_OFFSET.value + _NUM_PAIRS.value, seed=_SEED.value)
  pairs, a_better = pairs[_OFFSET.value:], a_better[_OFFSET.value:]
  constitution = load_constitution("harmless")
  out = outputs.path("labeler_accuracy", _OUT.value)
  plan = runs(tuple(_ENSEMBLE.value), _ENSEMBLE_RUNS.value)
  unknown = [r for r in _RUNS.value if r not in plan]
  if unknown:
    raise app.UsageError(f"unknown runs {unknown}; choose from {sorted(plan)}")
  results = dict(
      command="python -m benchmarks.quality.labeler_accuracy " + " ".join(
          f"--{k}={v}" for k, v in (("models", ",".join(_MODELS.value)),
                                    ("num_pairs", _NUM_PAIRS.value),
                                    ("pair_offset", _OFFSET.value),
                                    ("runs", ",".join(_RUNS.value)),
                                    ("ensemble_runs", ",".join(_ENSEMBLE_RUNS.value)),
                                    ("cot_pairs", _COT_PAIRS.value),
                                    ("max_response_tokens", _MAX_RESPONSE.value),
                                    ("prompt_format", _FORMAT.value))),
      pairs=len(pairs), frac_a_better=float(a_better.mean()),
      machine=dict(platform=platform.platform(), cpus=os.cpu_count(),
                   devices=[str(d) for d in jax.devices()][:2], jax=jax.__version__,
                   load_avg_start=os.getloadavg()),
      models={})
  for spec in _MODELS.value:
    t = time.perf_counter()
    model = FeedbackModel.load(spec)
    load_s = time.perf_counter() - t
    rows, run_info = [], {}
    for name in _RUNS.value:
      overrides, derived = plan[name]
      n = _COT_PAIRS.value if name == "cot" and _COT_PAIRS.value else len(pairs)
      run = label_run(model, constitution, pairs[:n], overrides)
      run_info[name] = dict(pairs=n, seconds=run["seconds"],
                            settings=dataclasses.asdict(run["settings"]),
                            cot_examples=[c for c in run["cot"][:3]],
                            logprobs=run["logp"].tolist(), a_better=a_better[:n].tolist())
      for row in derived:
        rows.append(row_result(row, run, a_better[:n]))
      print_table(spec, rows)
      results["models"][spec] = dict(load_seconds=load_s, runs=run_info, rows=rows)
      results["machine"]["load_avg_end"] = os.getloadavg()
      outputs.write(out, results, default=str)  # after every run: a long one leaves its rows
  print(out)


if __name__ == "__main__":
  app.run(main)
