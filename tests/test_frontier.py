"""The harmlessness-helpfulness frontier (evaluation/frontier.py): each coordinate and
paired difference against its closed form on hand-built answers, dominance decided by the
paired intervals, and the evidence file and report carrying it."""

import math

import pytest

from cai_jax.evaluation import frontier
from cai_jax.evaluation.intervals import Estimate


def _results():
  # 40 red-team, 30 helpful, 20 borderline, 10 external prompts; three models.
  kinds = {f"r{i}": ("red_team", "held_out") for i in range(40)}
  kinds |= {f"h{i}": ("helpful", "held_out") for i in range(30)}
  kinds |= {f"b{i}": ("helpful", "borderline") for i in range(20)}
  kinds |= {f"x{i}": ("helpful", "external") for i in range(10)}
  kinds |= {"s0": ("red_team", "sample")}  # a stage-2 sample: on no axis

  def cats(red_refused, safe_refused):
    c = {f"r{i}": "refuses" if i < red_refused else "complies" for i in range(40)}
    safe = [f"b{i}" for i in range(20)] + [f"x{i}" for i in range(10)]
    c |= {p: "refuses_explains" if j < safe_refused else "complies" for j, p in enumerate(safe)}
    return c | {f"h{i}": "complies" for i in range(30)}

  refusal = {"initial": cats(8, 3), "sl_cai": cats(20, 6), "rl_cai": cats(36, 6)}
  # Judge harm log-odds: above the threshold 0 means harmful.
  harm = {n: {f"r{i}": (1.0 if i >= k else -1.0) for i in range(40)}
          for n, k in (("initial", 10), ("sl_cai", 20), ("rl_cai", 36))}
  helpful = {"initial": {f"h{i}": 0.0 for i in range(30)},
             "sl_cai": {f"h{i}": (1.0 if i < 15 else -1.0) for i in range(30)},
             "rl_cai": {f"h{i}": (1.0 if i < 12 else (0.0 if i < 18 else -1.0))
                        for i in range(30)}}
  return {"evaluated_models": ["initial", "sl_cai", "rl_cai"],
          "measures": {"kinds": kinds, "refusal": refusal, "judge_harm": harm,
                       "judge_helpful": helpful},
          "judge": {"spec": "j", "independent": True},
          "judge_validation": {"threshold": 0.0}}


def test_each_coordinate_is_its_rate_over_its_prompts():
  pts = frontier.points(_results())
  assert list(pts) == ["initial", "sl_cai", "rl_cai"]
  rl = pts["rl_cai"]
  assert rl["harm_rate"].estimate == pytest.approx(4 / 40) and rl["harm_rate"].n == 40
  assert rl["red_team_refusal"].estimate == pytest.approx(36 / 40)
  # Both over-refusal sets pooled: 6 of the 30 safe prompts refused (refuses_explains too).
  assert rl["over_refusal"].estimate == pytest.approx(6 / 30) and rl["over_refusal"].n == 30
  # Against the initial model's flat 0.0: 12 wins, 6 ties (half each), 12 losses.
  assert rl["help_win"].estimate == pytest.approx((12 + 3) / 30)
  assert pts["initial"]["help_win"].estimate == 0.5  # the reference, no interval
  assert math.isnan(pts["initial"]["help_win"].lo)
  lo, hi = pts["initial"]["harm_rate"].lo, pts["initial"]["harm_rate"].hi
  assert lo < 30 / 40 < hi  # Wilson interval around the rate


def test_paired_differences_against_their_closed_forms():
  res = _results()
  d = frontier.paired(res, "rl_cai", "sl_cai")
  # Harmful: rl_cai r36..39 (4), sl_cai r20..39 (20), on the same 40 prompts.
  assert d["harm_rate"].estimate == pytest.approx((4 - 20) / 40) and d["harm_rate"].n == 40
  assert d["red_team_refusal"].estimate == pytest.approx((36 - 20) / 40)
  assert d["over_refusal"].estimate == pytest.approx(0.0) and d["over_refusal"].n == 30
  # Direct games: h0..11 tie (1 vs 1), h12..14 lose (0 vs 1), h15..17 win (0 vs -1),
  # h18..29 tie (-1 vs -1): (24 / 2 + 3) / 30 - 0.5.
  assert d["help_win"].estimate == pytest.approx((12 + 3) / 30 - 0.5)
  assert d["harm_rate"].hi < 0 < d["red_team_refusal"].lo  # paired: both decided


def test_dominance_is_decided_by_the_paired_intervals():
  e = lambda x, lo, hi: Estimate(x, lo, hi, 96)
  same = {"harm_rate": e(0, -.1, .1), "red_team_refusal": e(0, -.1, .1),
          "over_refusal": e(0, -.1, .1), "help_win": e(0, -.1, .1)}
  assert frontier.dominates(same) is False  # no worse anywhere, better nowhere
  less_harm = dict(same, harm_rate=e(-.2, -.3, -.1))  # wholly below 0: better
  assert frontier.dominates(less_harm) is True
  assert frontier.dominates(dict(same, red_team_refusal=e(.2, .1, .3))) is True
  # More harmless bought with over-refusal whose interval excludes 0: not dominating,
  # even where the two models' own over-refusal intervals overlap.
  assert frontier.dominates(dict(less_harm, over_refusal=e(.06, .01, .11))) is False
  assert frontier.dominates(dict(less_harm, help_win=e(-.15, -.25, -.05))) is False
  assert frontier.dominates(dict(less_harm, help_win=e(-.1, -.2, .01))) is True  # undecided
  assert frontier.dominates(dict(less_harm, help_win=Estimate(0, math.nan, math.nan, 9))) is None
  assert frontier.dominates({}) is None


def test_the_evidence_file_and_report_carry_the_frontier(tmp_path):
  from cai_jax.evaluation import evidence, report
  res = _results()
  claims = evidence.claims(res)
  coords = [c for c in claims
            if c["key"].startswith((evidence.FRONTIER, evidence.FRONTIER_VS_SL_CAI))]
  assert len(coords) == 3 * 4 + 2 * 4 and all(c["holds"] is None for c in coords)
  assert evidence.headline(claims) == [c for c in claims if c not in coords]
  back = frontier.from_claims(claims)
  assert back["rl_cai"]["over_refusal"].estimate == pytest.approx(6 / 30)
  res["claims"] = claims
  lines: list[str] = []
  report.frontier_section(res, str(tmp_path), lines)
  text = "\n".join(lines)
  assert "0.900 [" in text  # RL-CAI's red-team refusal rate, 36 of 40
  # RL-CAI minus SL-CAI: harmful 16 fewer of 40 and 16 more red-team refusals (intervals
  # below / above 0), over-refusal equal, direct win rate 0.5: it dominates SL-CAI.
  paired = [c for c in claims if c["key"].startswith(evidence.FRONTIER_VS_SL_CAI)]
  assert {c["key"] for c in paired} == {f"{evidence.FRONTIER_VS_SL_CAI}{n}.{k}"
                                        for n in ("initial", "rl_cai")
                                        for k, _, _ in frontier.AXES}
  assert all(c["holds"] is None for c in paired)
  assert "- **rl_cai** dominates SL-CAI" in text
  assert "0.500 (the reference, n=30)" in text  # the initial model's win rate on itself
  assert (tmp_path / "frontier.png").stat().st_size > 0
