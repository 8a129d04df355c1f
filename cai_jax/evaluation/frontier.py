"""The harmlessness-helpfulness frontier (the paper's Fig. 2): one point per evaluated
model, each coordinate a rate over stage 8's held-out prompts with its 95% interval.

Harmlessness: the judge's harmful-answer rate and the model-free refusal rate on the
held-out red-team prompts. Helpfulness: the model-free refusal rate on the safe prompts
that sound dangerous (every over-refusal set stage 8 answered, pooled: the evasive
failure) and the judge's helpfulness win rate against the first evaluated model (the
initial one) on the held-out helpful prompts.

A model dominates another when it is at least as good on every axis and better on one.
`paired` measures each axis as a difference over the prompts both models answered (the
rates' paired difference, the direct helpfulness win rate minus one half), bootstrapped
over prompts; `dominates` asks it of those intervals: no axis's interval wholly on the
worse side, one wholly on the better. Overlapping per-model intervals decide nothing: two
rates of 0.08 [0.05, 0.14] and 0.15 [0.10, 0.21] on the same 144 prompts overlap, while
their paired difference can exclude 0.
"""

from __future__ import annotations

import math
from typing import Any

from cai_jax.evaluation import intervals
from cai_jax.evaluation.answers import OVER_REFUSAL_SETS
from cai_jax.evaluation.intervals import Estimate

# (key, what it measures, True when lower is better)
AXES = (
    ("harm_rate", "harmful-answer rate on held-out red-team prompts (judge)", True),
    ("red_team_refusal", "refusal rate on held-out red-team prompts (model-free)", False),
    ("over_refusal", "refusal rate on safe prompts that sound dangerous (model-free)", True),
    ("help_win", "helpfulness win rate against the initial model on held-out helpful"
                 " prompts (judge)", False),
)


def _measures(results: dict[str, Any]):
  """Stage 8's per-answer measures (refusal categories, judge harm and helpfulness
  log-odds, the harm threshold) and the prompt ids of the three sets: held-out red-team,
  every over-refusal set, held-out helpful."""
  m = results.get("measures", {})
  kinds = {i: tuple(k) for i, k in m.get("kinds", {}).items()}
  red = sorted(i for i, k in kinds.items() if k == ("red_team", "held_out"))
  safe = sorted(i for i, k in kinds.items() if k[0] == "helpful" and k[1] in OVER_REFUSAL_SETS)
  ok = sorted(i for i, k in kinds.items() if k == ("helpful", "held_out"))
  return (m.get("refusal", {}), m.get("judge_harm", {}), m.get("judge_helpful", {}),
          results.get("judge_validation", {}).get("threshold"), (red, safe, ok))


def points(results: dict[str, Any], *, seed: int = 0) -> dict[str, dict[str, Estimate]]:
  """model -> axis -> Estimate, for every model stage 8 answered with; an axis whose
  measure is missing (no judge, no threshold) is left out of that model's point."""
  refusal, harm, helpful, cut, (red, safe, ok) = _measures(results)
  names = [n for n in results.get("evaluated_models", ()) if n in refusal]
  ref = names[0] if names else None
  out: dict[str, dict[str, Estimate]] = {}
  for name in names:
    cats = refusal[name]
    p: dict[str, Estimate] = {}
    judged = [i for i in red if i in harm.get(name, {})]
    if cut is not None and judged:
      p["harm_rate"] = intervals.rate([harm[name][i] > cut for i in judged])
    p["red_team_refusal"] = intervals.rate([cats[i] != "complies" for i in red if i in cats])
    p["over_refusal"] = intervals.rate([cats[i] != "complies" for i in safe if i in cats])
    shared = [i for i in ok if i in helpful.get(name, {}) and i in helpful.get(ref, {})]
    if shared and name != ref:
      p["help_win"] = intervals.win_rate([helpful[name][i] for i in shared],
                                         [helpful[ref][i] for i in shared], seed=seed)
    elif shared:  # the reference against itself: one half by definition, no interval
      p["help_win"] = Estimate(0.5, float("nan"), float("nan"), len(shared))
    out[name] = {k: v for k, v in p.items() if v.n}
  return out


def paired(results: dict[str, Any], a: str, b: str, *, seed: int = 0
           ) -> dict[str, Estimate]:
  """axis -> model `a` minus model `b` over the prompts both answered (bootstrap over
  prompts): the paired difference of each rate, and for `help_win` the judge's direct
  helpfulness win rate of `a` against `b` minus 0.5. An axis either model lacks is left out."""
  refusal, harm, helpful, cut, (red, safe, ok) = _measures(results)
  out: dict[str, Estimate] = {}

  def both(ids, table):
    return [i for i in ids if i in table.get(a, {}) and i in table.get(b, {})]

  if cut is not None and both(red, harm):
    ids = both(red, harm)
    out["harm_rate"] = intervals.paired([harm[a][i] > cut for i in ids],
                                        [harm[b][i] > cut for i in ids], seed=seed)
  for axis, ids in (("red_team_refusal", both(red, refusal)),
                    ("over_refusal", both(safe, refusal))):
    if ids:
      out[axis] = intervals.paired([refusal[a][i] != "complies" for i in ids],
                                   [refusal[b][i] != "complies" for i in ids], seed=seed)
  ids = both(ok, helpful)
  if ids:
    w = intervals.win_rate([helpful[a][i] for i in ids], [helpful[b][i] for i in ids],
                           seed=seed)
    out["help_win"] = Estimate(w.estimate - 0.5, w.lo - 0.5, w.hi - 0.5, w.n)
  return out


def from_claims(claims: list[dict[str, Any]], prefix: str = "frontier.") -> dict[str, dict[str, Estimate]]:
  """The points back from the evidence file's descriptive claims (`<prefix><model>.<axis>`),
  so a report shows the numbers the run wrote."""
  out: dict[str, dict[str, Estimate]] = {}
  for c in claims:
    key = c.get("key", "")
    if key.startswith(prefix) and c.get("estimate") is not None:
      name, axis = key[len(prefix):].rsplit(".", 1)
      out.setdefault(name, {})[axis] = Estimate.from_dict(c)
  return out


def dominates(diff: dict[str, Estimate]) -> bool | None:
  """Whether a model dominates another, from `paired(results, a, b)`: no axis's interval
  wholly on the worse side and one wholly on the better (lower is better for the harmful
  and over-refusal rates, higher for the red-team refusal rate and the win rate). None when
  no axis, or an axis without an interval, is there to decide it."""
  flags = []
  for k, _, lower_better in AXES:
    if k not in diff:
      continue
    d = diff[k]
    if not (math.isfinite(d.lo) and math.isfinite(d.hi)):
      return None
    worse, better = (d.lo > 0, d.hi < 0) if lower_better else (d.hi < 0, d.lo > 0)
    flags.append((not worse, better))
  if not flags:
    return None
  return all(f[0] for f in flags) and any(f[1] for f in flags)


def table(pts: dict[str, dict[str, Estimate]]) -> tuple[list[str], list[list[str]]]:
  """Header and rows: one row per model, each axis's estimate [interval] (n)."""
  header = ["model"] + [label for _, label, _ in AXES]
  cell = lambda e: (str(e) if math.isfinite(e.lo) else
                    f"{e.estimate:.3f} (the reference, n={e.n})")
  rows = [[name] + [cell(p[k]) if k in p else "n/a" for k, _, _ in AXES]
          for name, p in pts.items()]
  return header, rows


def figure(pts: dict[str, dict[str, Estimate]], path: str) -> str | None:
  """Two panels, both with 95% intervals on each axis: harmful rate against over-refusal,
  red-team refusal rate against helpfulness win rate. Written to `path` (PNG); None when no
  model has both coordinates of either panel."""
  panels = (("over_refusal", "harm_rate"), ("help_win", "red_team_refusal"))
  if not any(x in p and y in p for p in pts.values() for x, y in panels):
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  label = {k: t for k, t, _ in AXES}
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
  for ax, (x, y) in zip(axes, panels):
    for name, p in pts.items():
      if x not in p or y not in p:
        continue
      ex, ey = p[x], p[y]
      err = lambda e: ([[max(e.estimate - e.lo, 0)], [max(e.hi - e.estimate, 0)]]
                       if e.lo == e.lo else None)
      ax.errorbar(ex.estimate, ey.estimate, xerr=err(ex), yerr=err(ey), fmt="o", capsize=3)
      ax.annotate(name, (ex.estimate, ey.estimate), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel(label[x], fontsize=8)
    ax.set_ylabel(label[y], fontsize=8)
    ax.grid(alpha=0.3)
  axes[0].set_title("harmful (down) vs evasive (left): better is toward the origin", fontsize=9)
  axes[1].set_title("refuses harm (up) vs helpful (right): better is up and right",
                    fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
