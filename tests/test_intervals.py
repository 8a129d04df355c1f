"""Intervals (evaluation/intervals.py) against closed forms and large-sample references;
and the benchmarks' paired-runs and red-team refusal-label scripts."""

import math

import json

import numpy as np
import pytest

from cai_jax.evaluation import intervals


# --- intervals ------------------------------------------------------------------------

@pytest.mark.parametrize("k,n,lo,hi", [
    (0, 10, 0.0, 0.27753),  # Wilson's closed form, computed by hand
    (5, 10, 0.23659, 0.76341),
    (10, 10, 0.72247, 1.0),
    (81, 100, 0.72220, 0.87495),
])
def test_wilson_matches_the_closed_form(k, n, lo, hi):
  e = intervals.wilson(k, n)
  assert e.estimate == pytest.approx(k / n)
  assert (e.lo, e.hi) == pytest.approx((lo, hi), abs=1e-4)
  assert e.n == n


def test_wilson_of_nothing_is_undefined_not_zero():
  e = intervals.wilson(0, 0)
  assert e.n == 0 and math.isnan(e.estimate)
  assert e.as_dict() == {"estimate": None, "ci95": [None, None], "n": 0}


def test_bootstrap_mean_matches_the_normal_interval_at_large_n():
  x = np.random.default_rng(3).normal(1.0, 2.0, size=2000)
  e = intervals.bootstrap(x, seed=0)
  half = 1.96 * x.std(ddof=1) / math.sqrt(len(x))
  assert e.estimate == pytest.approx(x.mean())
  assert e.lo == pytest.approx(x.mean() - half, abs=0.2 * half)
  assert e.hi == pytest.approx(x.mean() + half, abs=0.2 * half)


def test_difference_of_independent_means_matches_the_normal_interval_at_large_n():
  """`difference`: mean(a) - mean(b) of independent samples, each resampled on its own; at
  large n its interval is the normal one, 1.96 sqrt(var_a / n_a + var_b / n_b)."""
  rng = np.random.default_rng(4)
  a, b = rng.normal(1.0, 2.0, size=1500), rng.normal(0.2, 2.0, size=500)
  e = intervals.difference(a, b, seed=0)
  est = a.mean() - b.mean()
  half = 1.96 * math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
  assert e.estimate == pytest.approx(est) and e.n == 2000
  assert e.lo == pytest.approx(est - half, abs=0.15 * half)
  assert e.hi == pytest.approx(est + half, abs=0.15 * half)


def test_bootstrap_coverage_is_near_95_percent():
  rng = np.random.default_rng(0)
  covered = 0
  for t in range(200):
    x = rng.exponential(1.0, size=60)
    e = intervals.bootstrap(x, seed=t, resamples=400)
    covered += e.lo <= 1.0 <= e.hi
  assert 0.88 <= covered / 200 <= 0.99


def test_paired_interval_is_narrower_than_unpaired_when_prompts_vary():
  rng = np.random.default_rng(1)
  difficulty = rng.normal(0, 3, size=200)
  a = difficulty + 0.5 + rng.normal(0, 0.3, size=200)
  b = difficulty + rng.normal(0, 0.3, size=200)
  p = intervals.paired(a, b)
  assert p.lo > 0  # the 0.5 shift is seen through the prompts' spread
  ua, ub = intervals.bootstrap(a), intervals.bootstrap(b)
  assert (p.hi - p.lo) < 0.5 * ((ua.hi - ua.lo) + (ub.hi - ub.lo))
  with pytest.raises(ValueError, match="same prompts"):
    intervals.paired(a, b[:-1])


def test_bootstrap_games_resamples_prompts_as_clusters():
  # Two games per prompt that always agree: the interval is that of n=50 prompts.
  rng = np.random.default_rng(2)
  wins = rng.random(50) < 0.7
  games = [(i, float(w)) for i, w in enumerate(wins) for _ in range(2)]
  e = intervals.bootstrap_games(games, lambda gs: float(np.mean(gs)), seed=0)
  assert e.n == 50
  w = intervals.wilson(int(wins.sum()), 50)
  assert (e.hi - e.lo) == pytest.approx(w.hi - w.lo, rel=0.3)


def test_roc_auc_against_pairwise_counting():
  rng = np.random.default_rng(4)
  s = rng.integers(0, 5, size=40).astype(float)  # many ties
  y = rng.integers(0, 2, size=40)
  pos, neg = s[y == 1], s[y == 0]
  expected = np.mean([(p > q) + 0.5 * (p == q) for p in pos for q in neg])
  assert intervals.roc_auc(s, y) == pytest.approx(expected)
  assert math.isnan(intervals.roc_auc([1, 2, 3], [0, 0, 0]))  # no positives: undefined
  e = intervals.auc_interval(s, y)
  assert e.lo <= e.estimate <= e.hi


# --- the benchmarks' scripts -----------------------------------------------------------


def test_paired_runs_pairs_the_same_prompts_of_two_runs(tmp_path):
  """evaluation.paired_runs: refusal-rate differences of two runs' models on the
  prompts both answered, per set, by the paired bootstrap."""
  import json
  import os
  from cai_jax.evaluation import paired_runs
  from cai_jax import paths
  kinds = {"r1": ["red_team", "held_out"], "r2": ["red_team", "held_out"],
           "b1": ["red_team", "borderline"], "b2": ["red_team", "borderline"],
           "h1": ["helpful", "held_out"], "s1": ["red_team", "sample"]}
  runs = {"x": {"r1": "refuses", "r2": "complies", "b1": "refuses", "b2": "refuses_explains",
                "h1": "complies", "s1": "refuses"},
          "y": {"r1": "complies", "r2": "complies", "b1": "complies", "b2": "refuses",
                "h1": "complies"}}
  for name, refusals_ in runs.items():
    path = paths.results_file(str(tmp_path / name))
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
      json.dump({"measures": {"kinds": kinds, "refusal": {"m": refusals_}}}, f)
  out = paired_runs.compare(f"{tmp_path / 'x'}:m", f"{tmp_path / 'y'}:m", seed=0)["sets"]
  want = {"red_team": ([1, 0], [0, 0]), "borderline": ([1, 1], [0, 1]),
          "helpful": ([0], [0])}
  for name, (a, b) in want.items():
    assert out[name]["refusal_rate_difference_a_minus_b"] == intervals.paired(
        a, b, seed=0).as_dict(), name
  # The PM's reward: two models of one run, from measures.pm_reward or, for runs from
  # before it, the PM's game rows; two runs' PMs do not compare.
  x = str(tmp_path / "x")
  rewards = {"a": {"r1": 0.5, "r2": 0.1, "h1": -0.2}, "b": {"r1": 0.2, "r2": 0.3, "h1": -0.4}}
  with open(paths.results_file(x), "w") as f:
    json.dump({"measures": {"kinds": kinds, "refusal": {}, "pm_reward": rewards}}, f)
  got = paired_runs.compare(f"{x}:a", f"{x}:b", seed=0, measure="pm_reward")["sets"]
  key = "pm_reward_difference_a_minus_b"
  assert got["red_team"][key] == intervals.paired([0.5, 0.1], [0.2, 0.3], seed=0).as_dict()
  assert got["held_out"][key] == intervals.paired([0.5, 0.1, -0.2], [0.2, 0.3, -0.4],
                                                  seed=0).as_dict()
  assert "borderline" not in got  # stage 8's PM scores held-out answers only
  with open(paths.results_file(x), "w") as f:
    json.dump({"measures": {"kinds": kinds, "refusal": {}}}, f)
  with open(os.path.join(paths.stage_dir(x, paths.EVALUATION), "comparisons.jsonl"), "w") as f:
    for i in ("r1", "r2", "h1"):
      f.write(json.dumps({"judge": "pm", "id": i, "a": "a", "b": "b",
                          "reward_a": rewards["a"][i], "reward_b": rewards["b"][i]}) + "\n")
      f.write(json.dumps({"judge": "judge", "id": i, "a": "a", "b": "b",
                          "reward_a": 9.0, "reward_b": 9.0}) + "\n")
  assert paired_runs.compare(f"{x}:a", f"{x}:b", seed=0, measure="pm_reward")["sets"] == got
  with pytest.raises(ValueError, match="one run"):
    paired_runs.compare(f"{x}:a", f"{tmp_path / 'y'}:m", seed=0, measure="pm_reward")


def test_red_team_refusal_labels_builds_both_contrasts(tmp_path):
  """evaluation.refusal_labels: each red-team prompt's SL-CAI sample and its initial
  answer, each against the same canned refusal, and each helpful prompt's sample against
  its refusal; revision pairs are not contrasts; the summary counts the refusal as
  preferred where p(a) < 0.5."""
  from cai_jax.evaluation import refusal_labels as rtl
  from cai_jax import records
  from cai_jax.data import refusals
  from cai_jax import paths
  P = records.ResponsePair
  pairs = [P(id="r1" + records.REVISION_PAIR_SUFFIX, prompt="hack", kind="red_team",
             response_a="initial r1", response_b="revised r1"),
           P(id="r1", prompt="hack", kind="red_team", response_a="sa", response_b="sb"),
           P(id="r2", prompt="steal", kind="red_team", response_a="ta", response_b="tb"),
           P(id="h1", prompt="bake", kind="helpful", response_a="ha", response_b="hb")]
  records.write_shard(paths.stage_dir(str(tmp_path), paths.PAIRS), 0, pairs)
  got = rtl.contrasts(str(tmp_path))
  assert [(p.response_a, p.response_b) for p in got["sample"]] == [
      ("sa", refusals.refusal_for("r1")), ("ta", refusals.refusal_for("r2"))]
  assert [(p.prompt, p.response_a, p.response_b) for p in got["initial"]] == [
      ("hack", "initial r1", refusals.refusal_for("r1"))]
  assert [(p.kind, p.response_a, p.response_b) for p in got["helpful"]] == [
      ("helpful", "ha", refusals.refusal_for("h1"))]
  row = rtl.summarise(np.array([0.2, 0.3, 0.7, 0.5]), seed=0)
  assert row["refusal_preferred"] == intervals.wilson(2, 4).as_dict()
  assert row["mean_margin"]["estimate"] == pytest.approx(0.175)
  assert row["mean_p_refusal_preferred"]["estimate"] == pytest.approx(0.575)
  assert row["p_range"] == pytest.approx([0.3, 0.8])
  # --baseline pairs two runs' labels by pair id (the other run's order may differ).
  mine = {"ids": ["x", "y", "z"], "p_refusal": [0.9, 0.6, 0.5]}
  base = {"ids": ["z", "x", "w"], "p_refusal": [0.4, 0.7, 0.1]}
  diff = rtl.paired_to(mine, base, seed=0)
  assert diff["mean_margin"]["n"] == 2
  assert diff["mean_margin"]["estimate"] == pytest.approx(np.mean([0.4 - 0.2, 0.0 - 0.1]))
  assert diff["refusal_preferred"]["estimate"] == pytest.approx(np.mean([1 - 1, 0 - 0]))


def test_estimate_reads_back_what_as_dict_wrote():
  """Benchmarks print stored intervals through `Estimate.__str__`, read back from JSON."""
  for e in (intervals.wilson(3, 7), intervals.paired([1.0, 0.0, 1.0], [0.0, 0.0, 1.0], seed=0)):
    assert intervals.Estimate.from_dict(json.loads(json.dumps(e.as_dict()))) == e
  missing = intervals.Estimate.from_dict({"estimate": None, "ci95": [None, None], "n": 0})
  assert str(missing) == "n/a (n=0)"
