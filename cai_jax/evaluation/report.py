"""The run's Markdown report: `<workdir>/report/report.md` plus PNG plots.

Every number is read from the run's files: stage 8's `results.json`, stage 7's
`metrics.jsonl`, stage 6's `calibration/step-*.json`. A section whose input
is missing says which file is missing instead of being left out, so a report
of a partial pipeline shows what is still to run.

  python -m cai_jax.evaluation.report --workdir=runs/cai
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from cai_jax import paths
from cai_jax.evaluation.answers import OVER_REFUSAL_SETS

REPORT_DIR = paths.REPORT
JUDGES = (("pm", "preference model (stage 6)"), ("judge", "judge model (config `judge`)"))
SECTIONS = ("Claims", "Choices", "Signals by stage", "Models",
            "Harmlessness-helpfulness frontier", "Refusal and harm by prompt set", "Instruments", "Harmlessness vs helpfulness Elo", "PM harmlessness score by revision round",
            "PPO training curves", "Feedback-model accuracy", "Labeler calibration",
            "Sample answers", "Notes")
# (stage, config fields) the "Choices" section names: what the presets decide.
CHOICES = (
    ("critique_revision", ("model", "reviser", "mode", "num_rounds", "num_few_shot",
                           "max_new_tokens")),
    ("sft", ("train.num_epochs", "optim.lr")),
    ("pairs", ("revision_pairs", "refusal_pairs", "max_new_tokens")),
    ("ai_labels", ("feedback_models", "mode", "helpful_labels", "num_principles",
                   "pointwise_temperature")),
    ("preference_model", ("model", "lora.rank", "data.helpful_ratio", "data.eval_size", "train.num_epochs",
                          "optim.lr")),
    *((rl, ("algorithm", "learner.iterations", "rollout.batch_size",
            "rollout.samples_per_prompt", "rollout.max_new_tokens", "optim.lr", "kl.coef",
            "reward.sources")) for rl in ("ppo", "rloo", "grpo")),
    ("dpo", ("dpo.beta", "dpo.loss_type", "train.num_epochs", "optim.lr")),
    ("evaluation", ("judge.model", "num_red_team", "num_helpful", "num_borderline",
                    "external_source", "num_external",
                    "max_new_tokens")),
)
PPO_CURVES = (("reward", "PM reward"), ("kl", "KL(policy || SL-CAI)"),
              ("response_length", "response length (tokens)"))


def fmt(x: Any, digits: int = 3) -> str:
  """A number as the report prints it; "n/a" for missing or non-finite values."""
  if x is None or isinstance(x, str) or not np.isfinite(x):
    return "n/a"
  return f"{x:.{digits}f}"


def cell(text: str, limit: int = 300) -> str:
  """Text safe inside a Markdown table cell."""
  text = text if len(text) <= limit else text[:limit] + "…"
  return text.replace("|", "\\|").replace("\r", "").replace("\n", "<br>") or "(empty)"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
  return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
          + ["| " + " | ".join(r) + " |" for r in rows] + [""])


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _save(fig, out_dir: str, name: str) -> str:
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, name), dpi=110)
  _plt().close(fig)
  return name


def _missing(lines: list[str], why: str) -> None:
  lines += [f"_Not available: {why}_", ""]


# --- Sections ------------------------------------------------------------------------------


def claims_table(claims: Sequence[dict]) -> list[str]:
  """The claims as a Markdown table (also what the published claims block is made from)."""
  def ci(c):
    lo, hi = c["ci95"]
    return "n/a" if lo is None or hi is None else f"[{fmt(lo)}, {fmt(hi)}]"
  def failed(c):
    f = c.get("failed_signal")
    return cell(f"stage {f['stage']}: {f['signal']}") if f else ""
  verdict = {True: "yes", False: "**no**", None: "n/a"}
  rows = [[cell(c["claim"]), fmt(c["estimate"]), ci(c), str(c["n"]), verdict[c["holds"]],
           cell(c.get("measure", "")), "yes" if c.get("took_part_in_training") else "no",
           failed(c), cell(c.get("note", ""))] for c in claims]
  return table(["claim", "estimate", "95% CI", "n", "holds", "measure",
                "measure took part in training", "stage whose signal failed", "note"], rows)


def failed_list(claims: Sequence[dict]) -> list[str]:
  """Each failed claim with what its failed signal measured and what it would take."""
  from cai_jax.evaluation import diagnosis
  by_cause: dict[str, list[dict]] = {}  # claims failing for one measured cause, listed once
  for c in claims:
    if c.get("failed_signal"):
      by_cause.setdefault(diagnosis.sentence(c), []).append(c)
  lines = ["- " + "; ".join(f"**{c['claim']}** ({fmt(c['estimate'])})" for c in cs)
           + f": {why}" for why, cs in by_cause.items()]
  return (["Why each failing claim fails, traced to the stage whose signal failed"
           " (`cai_jax.evaluation.diagnosis`, measured from that stage's files):", ""]
          + lines + [""]) if lines else []


# --- The published claims block (docs/results.md) ---------------------------------------

BEGIN, END = "<!-- evidence:begin -->", "<!-- evidence:end -->"
PUBLISHER = "python -m benchmarks.quality.evidence"  # the command that writes the block


def day_rate(decode: str) -> str:
  """The day's speed beside a wall time: transformers' decode rate from a decode result
  (`benchmarks/perf/decode.py`) measured the same day (a shared box varies up to 3x);
  "" without one."""
  if not decode:
    return ""
  with open(decode) as f:
    runs = json.load(f)["runs"]
  row = next((r for r in runs if r.get("hf_tokens_per_s")), None)
  if row is None:
    raise ValueError(f"{decode}: no run with hf_tokens_per_s; run benchmarks/perf/decode.py"
                     " with transformers")
  return (f", on a day when transformers decoded {row['hf_tokens_per_s']:.1f} tok/s at batch"
          f" {row['batch']} (`{decode}`)")


def pipeline_seconds(workdir: str) -> tuple[dict | None, str]:
  """The run's seconds per stage (`pipeline_timings.json`; None without it) and a note
  on where they come from when not all from there."""
  path = os.path.join(workdir, "pipeline_timings.json")
  if not os.path.exists(path):
    return None, ""
  with open(path) as f:
    timings = json.load(f)
  if "evaluation" in timings:
    return timings, ""
  # Stage 8 wrote its results but the pipeline did not record the stage (it failed
  # after them, e.g. in the report): its own per-section seconds.
  with open(paths.results_file(workdir)) as f:
    timings["evaluation"] = sum(json.load(f).get("seconds", {}).values())
  return timings, "; stage 8's from its results.json `seconds`, as the pipeline did not record it"


def claims_block(claims: list[dict], source: str, timings: dict | None,
                 timings_note: str = "", decode: str = "") -> str:
  """The published claims table between the `BEGIN` and `END` markers: how many hold,
  the run's wall time (with the day's decode rate of the result `decode`), the table
  and why each failing claim fails; `source` names the claims file it is made from."""
  from cai_jax.evaluation.evidence import headline
  claims = headline(claims)
  held = sum(c["holds"] is True for c in claims)
  failed = sum(c["holds"] is False for c in claims)
  lines = [BEGIN, "",
           f"Generated by `{PUBLISHER}` from `{source}`:"
           f" {held} of {len(claims)} claims hold, {failed} do not, the rest could not be"
           " tested or are descriptive.", ""]
  if timings:
    total = sum(v for v in timings.values() if isinstance(v, (int, float)))
    lines += [f"Pipeline wall time {total / 60:.1f} min (per stage in"
              f" `pipeline_timings.json`{timings_note}){day_rate(decode)}.", ""]
  lines += claims_table(claims) + failed_list(claims) + [END]
  return "\n".join(lines)


def rewrite_block(path: str, block: str) -> None:
  """Replaces the text between the `BEGIN` and `END` markers of the file `path` (markers
  included) with `block`, atomically."""
  if not os.path.isfile(path):
    raise ValueError(f"{path}: no such file; name the document that holds the claims block")
  with open(path) as f:
    text = f.read()
  if BEGIN not in text or END not in text:
    raise ValueError(f"{path}: no {BEGIN} ... {END} block to rewrite; add the two markers")
  text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def claims_section(results: dict, lines: list[str]) -> None:
  claims = results.get("claims")
  if not claims:
    _missing(lines, "results.json has no claims (stage 8 predates cai_jax.evaluation.evidence)")
    return
  from cai_jax.evaluation.evidence import headline
  claims = headline(claims)
  held = sum(c["holds"] is True for c in claims)
  failed = sum(c["holds"] is False for c in claims)
  lines += [f"{held} of {len(claims)} claims hold, {failed} do not, "
            f"{len(claims) - held - failed} could not be tested or are descriptive."
            " Differences are paired on the prompts both models answered (bootstrap over"
            " prompts); rates use Wilson intervals. A claim whose measure took part in"
            " training (the policy was optimised towards it) can be fooled: lean on the"
            " others.", ""]
  lines += claims_table(claims)
  lines += failed_list(claims)


def rates_section(results: dict, lines: list[str]) -> None:
  from cai_jax.evaluation import intervals
  m = results.get("measures", {})
  kinds, refusal = m.get("kinds", {}), m.get("refusal", {})
  if not refusal:
    _missing(lines, "no per-answer measures in results.json")
    return
  harm, cut = m.get("judge_harm", {}), results.get("judge_validation", {}).get("threshold")
  sets = (("red_team", "held_out", "red-team (held out)"), ("helpful", "held_out", "helpful"),
          *(("helpful", key, name) for key, name in OVER_REFUSAL_SETS.items()))
  rows = []
  for name, cats in refusal.items():
    for kind, split, label in sets:
      ids = [i for i, ks in kinds.items() if tuple(ks) == (kind, split) and i in cats]
      if not ids:
        continue
      c = [cats[i] for i in ids]
      ref = intervals.rate([x != "complies" for x in c])
      expl = intervals.rate([x == "refuses_explains" for x in c])
      hs = [harm.get(name, {}).get(i) for i in ids]
      hr = (str(intervals.rate([h > cut for h in hs])) if cut is not None
            and all(h is not None for h in hs) else "n/a")
      rows.append([name, label, str(ref), str(expl), hr])
  lines += table(["model", "prompt set", "refusal rate (model-free)",
                  "refuses and explains / offers an alternative",
                  "harmful rate (judge at threshold)"], rows)


def instruments_section(results: dict, lines: list[str]) -> None:
  rv = results.get("refusal_validation", {})
  rows = []
  for split, v in rv.items():
    a = v["accuracy"]
    rows.append([f"refusal measure, PyRIT {split}", fmt(a["estimate"]),
                 f"[{fmt(a['ci95'][0])}, {fmt(a['ci95'][1])}]", str(a["n"]), "accuracy"])
  jv = results.get("judge_validation", {})
  if "held_out" in jv:
    for key in ("auc", "accuracy"):
      a = jv["held_out"][key]
      rows.append([f"judge {results.get('judge', {}).get('spec')}, PyRIT harm held out",
                   fmt(a["estimate"]), f"[{fmt(a['ci95'][0])}, {fmt(a['ci95'][1])}]",
                   str(a["n"]), "ROC-AUC" if key == "auc" else
                   f"accuracy at threshold {fmt(jv['threshold'])} (chosen on"
                   f" {jv['tune']['n']} tune rows)"])
  lines += table(["instrument", "estimate", "95% CI", "n", "metric"], rows) if rows else []
  if "missing" in jv:
    _missing(lines, f"judge validation: {jv['missing']}")


def _field(config: dict, dotted: str) -> Any:
  for part in dotted.split("."):
    if not isinstance(config, dict) or part not in config:
      return None
    config = config[part]
  return config


def choices_section(workdir: str, lines: list[str]) -> None:
  configs, source = paths.stage_configs(workdir)
  if not configs:
    _missing(lines, f"{paths.pipeline_config(workdir)} and the stages' config.json")
    return
  rows = [[stage, field, cell(json.dumps(v, ensure_ascii=False))]
          for stage, fields in CHOICES if stage in configs
          for field in fields if (v := _field(configs[stage], field)) is not None]
  lines += [f"What this run was configured to do, from {source}.", ""]
  lines += table(["stage", "field", "value"], rows)


def signals_section(results: dict | None, workdir: str, lines: list[str]) -> None:
  """What each training stage's signal measured (`cai_jax.evaluation.diagnosis`), so a
  claim that fails can be traced to the stage whose signal was too weak."""
  from cai_jax.evaluation import diagnosis
  s = (results or {}).get("signals") or diagnosis.measure(workdir, results)
  est = diagnosis.stored
  rows = []
  for kind, r in s.get("revisions", {}).items():
    revised = f" → {est(r['revision_refusing'])}" if "revision_refusing" in r else ""
    rows.append(["2 critique-revision", f"{kind} prompts: refusal rate (model-free measure),"
                 " initial answer" + (" → last revision" if revised else ""),
                 est(r["initial_refusing"]) + revised])
  labels = s.get("labels", {})
  t = labels.get("pointwise_temperature")
  sharpened = ("" if t is None else f"; at pointwise temperature {t}: a lower one moves p away"
               " from 0.5 without changing which answer is preferred")
  for x in labels.get("sets", []):
    rows.append(["5 AI labels", x["name"],
                 f"n={x['n']}; mean \\|p − 0.5\\| {fmt(x['mean_abs'])}; b preferred in"
                 f" {fmt(x['b_preferred'])}; p in [{fmt(x['min'])}, {fmt(x['max'])}]{sharpened}"])
  for kind, v in labels.get("refusal_contrast", {}).items():
    rows.append(["5 AI labels", f"{kind} pairs where exactly one answer refuses: the refusing"
                 " answer preferred (fraction; mean P(refusing answer better))",
                 f"{v['one_refuses']} of {v['pairs']} pairs; {est(v['refuser_preferred'])};"
                 f" {est(v['mean_p_refuser'])}"])
  # The stage's PM, and with pms="by_kind" (the harmlessness PM then) its helpfulness PM.
  for key, label in (("pm", "6 PM"), ("pm_helpful", "6 helpful PM")):
    pm = s.get(key)
    if pm:
      first, last = pm["accuracy"]
      kinds = "; ".join(f"{k} {fmt(a)} → {fmt(b)}" for k, (a, b) in pm["by_kind"].items())
      rows.append([label, f"held-out accuracy, step {pm['first_step']} → {pm['last_step']}",
                   f"{fmt(first)} → {fmt(last)} on {pm['decided']} decided pairs ({kinds})"])
      rows.append([label, "held-out reward std (the spread PPO's rewards can have)",
                   fmt(pm["reward_std"])])
    pref = s.get(f"{key}_refusal_preference")
    if pref:
      def said(v):
        return f"{est(v['refusal_preferred'])}; margin {est(v['mean_margin'])}"
      rows.append([label, f"prefers a flat refusal to {pref['model']}'s non-refusing answer"
                   " (fraction of prompts; mean reward margin)",
                   "; ".join(f"{k} {said(v)}" for k, v in pref.items()
                             if isinstance(v, dict) and "refusal_preferred" in v)])
  for name, r in s.get("rl", {}).items():
    label = f"7 {name.upper()}"
    rows.append([label, f"reward, first {r['half']} → last {r['half']} iterations (mean)",
                 f"{fmt(r['reward_first'])} → {fmt(r['reward_last'])}; per-iteration"
                 f" std {fmt(r['reward_std'])}"])
    if r["kl_last"]:
      rows.append([label, "KL(policy ‖ SL-CAI), last half (mean, max)",
                   f"{fmt(r['kl_last'][0])}, {fmt(r['kl_last'][1])}"])
  if not rows:
    _missing(lines, "no stage-2 records, stage-5 labels, stage-6 calibration or stage-7"
             " metrics in the workdir")
    return
  lines += ["How strong each training stage's signal was. A claim fails when an upstream"
            " signal is weak: SFT targets that refuse teach refusing; labels near 0.5 give the"
            " PM little to learn; labels where refusing wins red-team pairs and seldom loses"
            " a helpful one teach the PM to reward refusing; a PM whose rewards barely differ"
            " gives PPO no trend to climb.", ""]
  lines += table(["stage", "signal", "measured"], rows)


def frontier_section(results: dict, out_dir: str, lines: list[str]) -> None:
  """Fig. 2's frontier: each model's four rates with intervals, each model's paired
  difference from SL-CAI and whether it dominates SL-CAI (by those intervals), and the
  figure."""
  from cai_jax.evaluation import frontier
  from cai_jax.evaluation.evidence import FRONTIER, FRONTIER_VS_SL_CAI
  pts = frontier.from_claims(results.get("claims", []), FRONTIER)
  if not pts:
    _missing(lines, "no frontier coordinates among the claims (stage 8 predates them, or no"
             " model's answers were measured)")
    return
  lines += ["One point per model, every rate over stage 8's held-out prompts with its 95%"
            " interval (Wilson; bootstrap for the win rate). The paper's Fig. 2 asks for a"
            " model more harmless *without* becoming evasive: lower harmful and over-refusal"
            " rates, a higher red-team refusal rate and helpfulness win rate.", ""]
  lines += table(*frontier.table(pts))
  diffs = frontier.from_claims(results.get("claims", []), FRONTIER_VS_SL_CAI)
  if diffs:
    verdict = {True: "dominates", False: "does not dominate",
               None: "cannot be compared (an interval is missing)"}
    header = ["model minus SL-CAI"] + [
        "helpfulness win rate against SL-CAI on held-out helpful prompts, minus 0.5 (judge)"
        if k == "help_win" else label for k, label, _ in frontier.AXES]
    rows = [[n] + [str(d[k]) if k in d else "n/a" for k, _, _ in frontier.AXES]
            for n, d in diffs.items()]
    lines += ["Each model minus SL-CAI over the prompts both answered (paired bootstrap)."
              " Dominance is decided by these intervals: no axis's interval wholly on the"
              " worse side, one wholly on the better.", ""]
    lines += table(header, rows)
    lines += [*(f"- **{n}** {verdict[frontier.dominates(d)]} SL-CAI"
                for n, d in diffs.items() if n != "initial"), ""]
  path = frontier.figure(pts, os.path.join(out_dir, "frontier.png"))
  if path:
    lines += ["![Harmlessness-helpfulness frontier](frontier.png)", ""]


def models_section(results: dict, lines: list[str]) -> None:
  rows = [[name, m["status"], f"`{m['spec']}`", str(m.get("answers", "n/a")),
           fmt(m.get("mean_answer_chars"), 1)] for name, m in results["models"].items()]
  lines += table(["model", "status", "spec", "answers", "mean answer chars"], rows)
  p = results["prompts"]
  lines += [f"Held-out prompts: {p['red_team']} red-team, {p['helpful']} helpfulness.", ""]


def elo_section(results: dict, out_dir: str, lines: list[str]) -> None:
  names = results["evaluated_models"]
  for key, title in JUDGES:
    data = results.get(key, {})
    lines += [f"### Judged by the {title}", ""]
    if key == "judge" and data.get("spec"):
      lines += [f"Judge: `{data['spec']}` ({data['mode']}); independent of training:"
                f" {'yes' if data['independent'] else 'NO'} ({data['note']}).", ""]
    if "missing" in data or not names:
      _missing(lines, data.get("missing", "no model was evaluated"))
      continue
    harm, helpf = data["harmlessness"], data["helpfulness"]
    rows = [[n, fmt(harm["elo"][n], 1), fmt(helpf["elo"][n], 1),
             fmt(harm["overall_win_rate"][n]), fmt(helpf["overall_win_rate"][n])]
            for n in names]
    lines += [f"Elo: Bradley-Terry maximum likelihood, {names[0]} = 0;"
              f" {harm['num_games']} harmlessness and {helpf['num_games']} helpfulness"
              " comparisons.", ""]
    lines += table(["model", "harmlessness Elo", "helpfulness Elo", "harmlessness win rate",
                    "helpfulness win rate"], rows)
    pair_rows = [[f"{a} vs {b}", fmt(harm["win_rate"][a][b]), fmt(helpf["win_rate"][a][b])]
                 for i, a in enumerate(names) for b in names[i + 1:]]
    if pair_rows:
      lines += table(["pair", "harmlessness win rate (first)", "helpfulness win rate (first)"],
                     pair_rows)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4))
    for n in names:
      ax.scatter(helpf["elo"][n], harm["elo"][n], s=60)
      ax.annotate(n, (helpf["elo"][n], harm["elo"][n]), textcoords="offset points",
                  xytext=(5, 5))
    ax.set_xlabel("helpfulness Elo")
    ax.set_ylabel("harmlessness Elo")
    ax.set_title(f"Harmlessness vs helpfulness ({key})")
    ax.grid(alpha=0.3)
    lines += [f"![Elo ({key})]({_save(fig, out_dir, f'elo_{key}.png')})", ""]


def rounds_section(results: dict, out_dir: str, lines: list[str]) -> None:
  r = results.get("revision_rounds", {})
  if "missing" in r:
    _missing(lines, r["missing"])
    return
  lines += [f"{r['count']} stage-2 red-team prompts ({r['mode']} mode); round 0 is the"
            " initial answer. Fraction whose last revision scores above the initial"
            f" answer: {fmt(r['improved_fraction'])}.", ""]
  lines += table(["revision round", "mean PM score", "std. error"],
                 [[str(k), fmt(m), fmt(s)] for k, m, s in zip(r["rounds"], r["mean"],
                                                              r["stderr"])])
  plt = _plt()
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.errorbar(r["rounds"], r["mean"], yerr=r["stderr"], marker="o", capsize=3)
  ax.set_xlabel("number of revisions")
  ax.set_ylabel("PM harmlessness score")
  ax.set_xticks(r["rounds"])
  ax.grid(alpha=0.3)
  lines += [f"![PM score by revision round]({_save(fig, out_dir, 'revision_rounds.png')})", ""]


def ppo_section(workdir: str, out_dir: str, lines: list[str]) -> None:
  from cai_jax.training.metrics import METRICS_FILE, read_metrics
  d = paths.stage_dir(workdir, paths.PPO)
  if not os.path.exists(os.path.join(d, METRICS_FILE)):
    _missing(lines, f"{os.path.join(d, METRICS_FILE)} (stage 7 has not run)")
    return
  rows = read_metrics(d)
  present = [(k, label) for k, label in PPO_CURVES if any(k in m for m in rows)]
  if not present:
    _missing(lines, f"{d}/{METRICS_FILE} has none of {[k for k, _ in PPO_CURVES]}")
    return
  summary = []
  plt = _plt()
  fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3.2), squeeze=False)
  for ax, (k, label) in zip(axes[0], present):
    pts = [(m["step"], float(m[k])) for m in rows if k in m]
    steps, vals = zip(*pts)
    ax.plot(steps, vals, marker=".")
    ax.set_xlabel("PPO iteration")
    ax.set_title(label)
    ax.grid(alpha=0.3)
    summary.append([k, str(len(pts)), fmt(vals[0]), fmt(vals[-1]), str(steps[-1])])
  lines += table(["metric", "points", "first", "last", "last iteration"], summary)
  lines += [f"![PPO curves]({_save(fig, out_dir, 'ppo_curves.png')})", ""]


def accuracy_section(results: dict, out_dir: str, lines: list[str]) -> None:
  acc = results.get("labeler_accuracy", {})
  if "missing" in acc:
    _missing(lines, acc["missing"])
    return
  if not acc["models"]:
    _missing(lines, "no feedback model could be loaded")
    return
  specs = list(acc["models"])
  settings = [r["setting"] for r in acc["models"][specs[0]]["rows"]]
  lines += [f"{acc['num_pairs']} PyRIT human-scored harm pairs (the less harmful response"
            f" is correct; a is better in {fmt(acc['frac_a_better'])} of them); ensemble ="
            f" {', '.join(acc['principles'])}.", ""]
  by = {s: {r["setting"]: r for r in acc["models"][s]["rows"]} for s in specs}
  lines += table(["setting"] + [f"{s} ({fmt(acc['models'][s]['params_millions'], 1)}M)"
                                f" acc / ECE" for s in specs],
                 [[st] + [f"{fmt(by[s][st]['accuracy'])} / {fmt(by[s][st]['ece'])}"
                          if st in by[s] else "n/a" for s in specs] for st in settings])
  plt = _plt()
  fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(settings)), 3.5))
  width = 0.8 / len(specs)
  for k, s in enumerate(specs):
    ax.bar(np.arange(len(settings)) + k * width,
           [by[s][st]["accuracy"] if st in by[s] else np.nan for st in settings], width,
           label=s)
  ax.axhline(0.5, color="gray", ls="--", lw=1)
  ax.set_xticks(np.arange(len(settings)) + 0.4 - width / 2)
  ax.set_xticklabels(settings, rotation=30, ha="right", fontsize=8)
  ax.set_ylabel("accuracy")
  ax.set_ylim(0, 1)
  ax.legend(fontsize=7)
  lines += [f"![Feedback-model accuracy]({_save(fig, out_dir, 'labeler_accuracy.png')})", ""]


def latest_pm_calibration(workdir: str) -> dict | None:
  files = sorted(glob.glob(os.path.join(paths.calibration_dir(workdir),
                                        "step-*.json")))
  if not files:
    return None
  with open(files[-1]) as f:
    return json.load(f)


def calibration_section(results: dict, workdir: str, out_dir: str, lines: list[str]) -> None:
  curves = []  # (label, [(mean predicted, observed, count)])
  acc = results.get("labeler_accuracy", {})
  for spec, m in acc.get("models", {}).items():
    for row in m["rows"]:
      curves.append((f"{spec}: {row['setting']}",
                     [(b["mean_pred"], b["mean_label"], b["count"]) for b in row["reliability"]]))
  if not curves:
    _missing(lines, "labeler reliability tables (labeler accuracy above)")
  pm = latest_pm_calibration(workdir)
  if pm is None:
    _missing(lines, f"{paths.calibration_dir(workdir)}/step-*.json (stage 6)")
  else:
    lines += [f"Preference model, held-out AI-labelled pairs at step {pm['step']}:"
              f" ECE {fmt(pm.get('eval_ece'))}, accuracy {fmt(pm.get('eval_accuracy'))}.", ""]
    curves.append((f"PM step {pm['step']}",
                   [(b["mean_pred"], b["mean_label"], b["count"]) for b in pm["bins"]
                    if b["count"]]))
  if not curves:
    return
  plt = _plt()
  fig, ax = plt.subplots(figsize=(5.5, 5))
  ax.plot([0, 1], [0, 1], color="gray", ls="--", lw=1)
  for label, pts in curves:
    if pts:
      x, y, _ = zip(*pts)
      ax.plot(x, y, marker="o", label=label)
  ax.set_xlabel("predicted P(a better)")
  ax.set_ylabel("observed frequency (label)")
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1)
  ax.legend(fontsize=6)
  lines += [f"![Reliability diagram]({_save(fig, out_dir, 'calibration.png')})", ""]


def samples_section(results: dict, lines: list[str]) -> None:
  samples = results.get("samples", [])
  if not samples:
    _missing(lines, "no stage-2 records to take sample prompts from")
    return
  names = results["evaluated_models"]
  header = ["prompt", "initial (stage 2)", "revised (stage 2)"] + [f"{n} answer" for n in names]
  lines += table(header, [[cell(s["prompt"]), cell(s["initial"]), cell(s["revised"])]
                          + [cell(s["answers"].get(n, "")) for n in names] for s in samples])


def build_report(results: dict | None, workdir: str, out_dir: str) -> str:
  """The Markdown text (plots are written to `out_dir` as a side effect)."""
  lines = ["# Constitutional AI evaluation report", "",
           f"Run directory: `{os.path.abspath(workdir)}`.", ""]
  res_path = paths.results_file(workdir)
  for title in SECTIONS:
    lines += [f"## {title}", ""]
    if title == "PPO training curves":
      ppo_section(workdir, out_dir, lines)
    elif title == "Choices":
      choices_section(workdir, lines)
    elif title == "Signals by stage":
      signals_section(results, workdir, lines)
    elif results is None:
      _missing(lines, f"{res_path} (stage 8 has not run)")
    elif title == "Claims":
      claims_section(results, lines)
    elif title == "Models":
      models_section(results, lines)
    elif title == "Harmlessness-helpfulness frontier":
      frontier_section(results, out_dir, lines)
    elif title == "Refusal and harm by prompt set":
      rates_section(results, lines)
    elif title == "Instruments":
      instruments_section(results, lines)
    elif title == "Harmlessness vs helpfulness Elo":
      elo_section(results, out_dir, lines)
    elif title == "PM harmlessness score by revision round":
      rounds_section(results, out_dir, lines)
    elif title == "Feedback-model accuracy":
      accuracy_section(results, out_dir, lines)
    elif title == "Labeler calibration":
      calibration_section(results, workdir, out_dir, lines)
    elif title == "Sample answers":
      samples_section(results, lines)
    elif title == "Notes":
      lines += [f"- {n}" for n in results.get("notes", [])] or ["None."]
      lines.append("")
  return "\n".join(lines)


def write_report(workdir: str) -> str:
  """Writes `<workdir>/report/report.md` and its plots; returns the report's path."""
  out_dir = paths.stage_dir(workdir, paths.REPORT)
  os.makedirs(out_dir, exist_ok=True)
  res_path = paths.results_file(workdir)
  results = None
  if os.path.exists(res_path):
    with open(res_path) as f:
      results = json.load(f)
  text = build_report(results, workdir, out_dir)
  path = os.path.join(out_dir, "report.md")
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)
  return path


def main() -> None:
  from absl import app, flags
  workdir = flags.DEFINE_string("workdir", None, "Pipeline working directory.", required=True)
  app.run(lambda argv: print(write_report(workdir.value)))


if __name__ == "__main__":
  main()
