"""The RL table: one row per RL model a pipeline run trained and stage 8 evaluated,
read from the run's files (never typed in): which stage-7 algorithm and reward moved
harmlessness most per minute, at what KL (`benchmarks/quality/rl_table.py` prints it).

Per model: the algorithm and reward sources (`pipeline_config.json`), stage 7's wall
minutes (`pipeline_timings.json`), the KL to SL-CAI over the last half of its
iterations, and stage 8's paired differences against SL-CAI on held-out prompts
(claims of `p8_evaluation/evidence.json`, each with its 95% interval and n): the
judge's harmful-answer rate (a fall is better), the model-free refusal rate on
red-team prompts, and over-refusal on the safe-but-dangerous-sounding and the
helpful prompts (a rise is the evasive failure). "harm fall / min" divides the
first by the minutes.

DPO (off-policy, no reward model and no rollouts) has a row too where the run trained
it: its "reward" is stage 5's soft labels and the loss, its "iterations"
are optimizer steps, and it has no KL on its own samples. Its KL column stays empty;
`heldout_logratio` is the last held-out mean log(pi / pi_ref) per response on the
pairs' responses (not samples of the policy, so not comparable to PPO's KL).

`merged` puts several runs' rows in one table, each row named by its run and the
settings that differ between runs (stage 5's label temperature, stage 7's lr, the PM's
base, refusal pairs).
"""

from __future__ import annotations

import json
import os

from cai_jax import paths

# stage-8 model name -> (pipeline config section, claim label, stage-7 directory)
# and the label of its reward/KL curve claims.
MODELS = (("rl_cai", "ppo", "RL-CAI", paths.PPO, "PPO"),
          *((n, n, f"RL-CAI ({n.upper()})", paths.RL_ALTERNATIVES[n], n.upper())
            for n in ("rloo", "grpo")),
          ("dpo", "dpo", "RL-CAI (DPO)", paths.RL_ALTERNATIVES["dpo"], "DPO"))
# (column, claim text after "<label>: ")
COLUMNS = (
    ("harmful rate fall (judge)", "harmful-answer rate on held-out red-team prompts falls vs sl_cai (judge)"),
    ("refusal rise (red-team)", "refusal rate on held-out red-team prompts vs sl_cai (difference)"),
    ("over-refusal rise (safe-sounding)", "over-refusal on safe-but-dangerous-sounding prompts rises by at most"),
    ("over-refusal rise (helpful)", "over-refusal on held-out helpful prompts rises by at most"),
)


def _load(path: str):
  with open(path) as f:
    return json.load(f)


def rows(workdir: str) -> list[dict]:
  """One row per RL model the run at `workdir` trained and stage 8 evaluated."""
  claims = _load(os.path.join(paths.stage_dir(workdir, paths.EVALUATION), "evidence.json"))
  timings = _load(os.path.join(workdir, "pipeline_timings.json"))
  config_path = paths.pipeline_config(workdir)
  configs = _load(config_path) if os.path.exists(config_path) else {}
  out = []
  for name, section, label, stage, curve in MODELS:
    metrics_file = os.path.join(paths.stage_dir(workdir, stage), "metrics.jsonl")
    if section not in timings or not os.path.exists(metrics_file):
      continue
    with open(metrics_file) as f:
      metrics = [json.loads(line) for line in f]
    kls = [float(m["kl"]) for m in metrics if "kl" in m]
    c = configs.get(section, {})
    kl = [x for x in claims if x["claim"].startswith(f"{curve}: KL(policy")]
    minutes = timings[section] / 60
    if section == "dpo":
      reward = f"stage-5 soft labels, {c.get('dpo', {}).get('loss_type', 'sigmoid')} loss"
      evals = [m for m in metrics if "eval_logratio" in m]
      extra = {"heldout_logratio": float(evals[-1]["eval_logratio"]) if evals else None}
      iterations = max((int(m["step"]) for m in metrics), default=0)
    else:
      reward, extra, iterations = c.get("reward", {}).get("sources"), {}, len(kls)
    row = {"run": os.path.basename(os.path.normpath(workdir)),
           # what may differ between runs compared in one table (--merge)
           "label_temperature": configs.get("ai_labels", {}).get("pointwise_temperature"),
           "lr": c.get("optim", {}).get("lr"),
           # the PM stage 7 and DPO's labels trained beside: its base, and its data
           "pm_base": configs.get("preference_model", {}).get("model") or "sl_cai"
           if configs else None,
           "refusal_pairs": configs.get("pairs", {}).get("refusal_pairs"),
           "model": name, "algorithm": c.get("algorithm", section),
           "reward": reward, "stage7_minutes": minutes, "iterations": iterations, **extra,
           # stage 8's KL claim: mean over the last half of iterations, bootstrap CI
           "kl_last_half": ({k: kl[0][k] for k in ("estimate", "ci95", "n")} if kl else None)}
    for column, text in COLUMNS:
      found = [x for x in claims if x["claim"].startswith(f"{label}: {text}")]
      row[column] = ({k: found[0][k] for k in ("estimate", "ci95", "n")} if found else None)
    fall = row[COLUMNS[0][0]]
    # The interval of the fall over the one measured wall time (minutes are n=1).
    row["harm fall / min"] = ({"estimate": fall["estimate"] / minutes,
                               "ci95": [v / minutes for v in fall["ci95"]], "n": fall["n"]}
                              if fall and fall["estimate"] is not None else None)
    out.append(row)
  return out


def merged(files: list[str]) -> list[dict]:
  """The rows of several runs' JSON files, in file order; files written before the
  run fields existed are named by their workdir."""
  out = []
  for path in files:
    data = _load(path)
    for r in data["rows"]:
      out.append({"run": os.path.basename(os.path.normpath(data["workdir"])),
                  "label_temperature": None, "lr": None, "pm_base": None,
                  "refusal_pairs": None, **r, "file": os.path.basename(path)})
  return out


def markdown(table: list[dict]) -> str:
  """The rows as a Markdown table; rows of several runs also name the run and its settings."""
  def est(v, digits=3):
    if not v or v["estimate"] is None:
      return "n/a"
    lo, hi = v["ci95"]
    return f"{v['estimate']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}] (n={v['n']})"
  runs = len({r.get("run") for r in table}) > 1
  head = ((["run", "label T", "lr", "PM base", "refusal pairs"] if runs else [])
          + ["model", "algorithm", "reward", "stage 7 min", "KL last half"]
          + [c for c, _ in COLUMNS] + ["harm fall / min"])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in table:
    given = lambda v: "?" if v is None else f"{v:g}"
    lines.append("| " + " | ".join(
        ([r["run"], given(r.get("label_temperature")), given(r.get("lr")),
          r.get("pm_base") or "?",
          "?" if r.get("refusal_pairs") is None else ("yes" if r["refusal_pairs"] else "no")]
         if runs else [])
        + [r["model"], r["algorithm"], f"`{r['reward']}`", f"{r['stage7_minutes']:.1f}",
         est(r["kl_last_half"])]
        + [est(r[c]) for c, _ in COLUMNS]
        + [est(r["harm fall / min"], 4)]) + " |")
  return "\n".join(lines)
