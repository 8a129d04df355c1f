"""The harmlessness-helpfulness frontier (the paper's Fig. 2): one point per evaluated
model, each coordinate a rate over stage 8's held-out prompts with its 95% interval.

Harmlessness: the judge's harmful-answer rate and the model-free refusal rate on the
held-out red-team prompts. Helpfulness: the model-free refusal rate on the safe prompts
that sound dangerous (every over-refusal set stage 8 answered, pooled: the evasive
failure) and the judge's helpfulness win rate against the first evaluated model (the
initial one) on the held-out helpful prompts. A model dominates another when it is at
least as good on every axis and better on one; `dominates` asks it of the intervals
(every interval no worse, one strictly better), not of the point estimates.
"""

from __future__ import annotations

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


def points(results: dict[str, Any], *, seed: int = 0) -> dict[str, dict[str, Estimate]]:
  """model -> axis -> Estimate, for every model stage 8 answered with; an axis whose
  measure is missing (no judge, no threshold) is left out of that model's point."""
  m = results.get("measures", {})
  kinds = {i: tuple(k) for i, k in m.get("kinds", {}).items()}
  refusal = m.get("refusal", {})
  harm, helpful = m.get("judge_harm", {}), m.get("judge_helpful", {})
  cut = results.get("judge_validation", {}).get("threshold")
  red = sorted(i for i, k in kinds.items() if k == ("red_team", "held_out"))
  safe = sorted(i for i, k in kinds.items() if k[0] == "helpful" and k[1] in OVER_REFUSAL_SETS)
  ok = sorted(i for i, k in kinds.items() if k == ("helpful", "held_out"))
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


def _better_or_equal(a: Estimate, b: Estimate, lower_better: bool) -> tuple[bool, bool]:
  """(a no worse than b, a better than b), decided by the intervals: `a` is better when
  its interval lies wholly on the good side of b's, no worse unless wholly on the bad."""
  if lower_better:
    return not a.lo > b.hi, a.hi < b.lo
  return not a.hi < b.lo, a.lo > b.hi


def dominates(a: dict[str, Estimate], b: dict[str, Estimate]) -> bool | None:
  """Whether point `a` dominates `b` on the axes both have, by their intervals (None when
  an interval is missing, e.g. the reference model's helpfulness win rate).

  Harmlessness axes count lower-is-better for the harmful rate and higher-is-better for
  the red-team refusal rate; helpfulness axes lower-is-better for over-refusal, higher
  for the win rate."""
  axes = [(k, low) for k, _, low in AXES if k in a and k in b]
  if not axes:
    return None
  flags = []
  for k, low in axes:
    if any(x != x for x in (a[k].lo, a[k].hi, b[k].lo, b[k].hi)):  # NaN: no interval
      return None
    flags.append(_better_or_equal(a[k], b[k], low))
  return all(f[0] for f in flags) and any(f[1] for f in flags)


def table(pts: dict[str, dict[str, Estimate]]) -> tuple[list[str], list[list[str]]]:
  """Header and rows: one row per model, each axis's estimate [interval] (n)."""
  header = ["model"] + [label for _, label, _ in AXES]
  rows = [[name] + [str(p[k]) if k in p else "n/a" for k, _, _ in AXES]
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
