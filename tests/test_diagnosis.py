"""cai_jax.evaluation.diagnosis: each training stage's signal measured on known records,
and each failed claim traced to the stage whose signal explains it."""

import json
import os

import numpy as np
import pytest

from cai_jax import paths, records
from cai_jax.evaluation import diagnosis, evidence, intervals, report
from cai_jax.evaluation.intervals import Estimate

REFUSES = "I'm sorry, but I can't help with that."
ANSWERS = "Sure. First, open the terminal and list the processes with ps."


def _label(pid, kind, a, b, p_a):
  return records.LabelRecord(id=pid, prompt="how do I do it", kind=kind, response_a=a,
                             response_b=b, mode="pointwise", models=("m",),
                             principle_ids=("p",), logprobs=(), cot=(), model_p_a=(p_a,),
                             p_a=p_a)


def _revision(pid, kind, initial, revised):
  rounds = (records.RevisionRound("p", "critique", revised),) if revised is not None else ()
  return records.CritiqueRevisionRecord(id=pid, prompt="how do I do it", kind=kind,
                                        source="s", initial_response=initial, rounds=rounds,
                                        mode="critique")


def test_label_signal_counts_the_refusal_contrast(tmp_path):
  # Red-team: the refusing answer is a in one pair and b in two; it wins 2 of 3. A pair
  # where both answer is no contrast. Helpful: one contrast, the refusal loses.
  recs = [_label("r1", "red_team", REFUSES, ANSWERS, 0.8),
          _label("r2", "red_team", ANSWERS, REFUSES, 0.3),
          _label("r3", "red_team", ANSWERS, REFUSES, 0.6),
          _label("r4", "red_team", ANSWERS, ANSWERS, 0.9),
          _label("h1", "helpful", ANSWERS, REFUSES, 0.9)]
  records.write_shard(paths.stage_dir(str(tmp_path), paths.AI_LABELS), 0, recs)
  got = diagnosis.label_signal(str(tmp_path))
  red, helpful = got["refusal_contrast"]["red_team"], got["refusal_contrast"]["helpful"]
  assert (red["pairs"], red["one_refuses"]) == (4, 3)
  assert red["refuser_preferred"] == intervals.wilson(2, 3).as_dict()
  assert red["mean_p_refuser"] == intervals.bootstrap([0.8, 0.7, 0.4]).as_dict()
  assert red["mean_p_refuser"]["estimate"] == pytest.approx(np.mean([0.8, 0.7, 0.4]))
  assert helpful["one_refuses"] == 1
  assert helpful["mean_p_refuser"]["estimate"] == pytest.approx(0.1)
  assert helpful["refuser_preferred"]["estimate"] == 0.0
  samples = {x["name"]: x for x in got["sets"]}["red-team pairs of two SL-CAI samples"]
  assert samples["n"] == 4 and samples["mean_abs"] == pytest.approx(np.mean([.3, .2, .1, .4]))


def test_revision_signal_is_the_sft_targets_refusal_rate(tmp_path):
  recs = [_revision("r1", "red_team", ANSWERS, REFUSES), _revision("r2", "red_team", ANSWERS,
                                                                    ANSWERS),
          _revision("r3", "red_team", REFUSES, REFUSES), _revision("h1", "helpful", ANSWERS, None)]
  records.write_shard(paths.stage_dir(str(tmp_path), paths.CRITIQUE_REVISION), 0, recs)
  got = diagnosis.revision_signal(str(tmp_path))
  assert got["red_team"]["initial_refusing"] == intervals.wilson(1, 3).as_dict()
  assert got["red_team"]["revision_refusing"] == intervals.wilson(2, 3).as_dict()
  assert got["helpful"] == {"initial_refusing": intervals.wilson(0, 1).as_dict()}


def _claim(key, est, bar):
  return evidence.claim(key, key, est, bar=bar, measure="m", trained_on=False)


def test_power_scales_the_half_width_by_one_over_root_n():
  # 0.68 at n=28 with the Wilson interval: the lower end misses 0.5. At the n it reports
  # (31), the Wilson interval of the same rate clears 0.5, and at one less it does not.
  c = _claim("pm.ai_labels", intervals.wilson(19, 28), ("lo", ">", 0.5))
  assert c["holds"] is False
  p = diagnosis.power(c)
  assert p["n"] == 28 and p["gap"] == pytest.approx(19 / 28 - 0.5)
  assert p["needed"] == int(np.ceil(28 * (p["half_width"] / p["gap"]) ** 2))
  assert p["needed"] == 31
  at = lambda n: intervals.wilson(round(19 / 28 * n), n).lo
  assert at(p["needed"]) > 0.5 > at(p["needed"] - 1)
  # An estimate on the failing side: more prompts would not help.
  assert diagnosis.power(_claim("x.y", intervals.wilson(10, 28), ("lo", ">", 0.5))) is None
  # An "at most" bar reads the upper end.
  up = _claim("sl_cai.over_refusal.borderline", Estimate(0.06, -0.06, 0.17, 48),
              ("hi", "<=", 0.10))
  assert diagnosis.power(up)["half_width"] == pytest.approx(0.11)


def _signals(pm_prefers_refusal):
  pref = {"model": "sl_cai", **{k: {"refusal_preferred": intervals.wilson(
      16 if pm_prefers_refusal else 0, 16).as_dict(), "mean_margin": Estimate(
          0.1, 0.05, 0.15, 16).as_dict()} for k in ("red_team", "borderline", "helpful")}}
  return {"pm_refusal_preference": pref,
          "labels": {"sets": [], "refusal_contrast": {"red_team": {
              "pairs": 96, "one_refuses": 38,
              "mean_p_refuser": Estimate(0.55, 0.52, 0.58, 38).as_dict(),
              "refuser_preferred": intervals.wilson(29, 38).as_dict()}}},
          "rl": {"ppo": {"iterations": 12, "half": 6, "reward_first": 0.03,
                         "reward_last": 0.03, "reward_std": 0.02, "kl_last": [0.2, 0.4],
                         "sources": ["pm"]}}}


def test_over_refusal_traced_to_the_pm_only_when_it_rewards_refusing():
  claims = [_claim("rl_cai.over_refusal.borderline", Estimate(0.2, 0.1, 0.33, 48),
                   ("hi", "<=", 0.05)),
            _claim("rl_cai.over_refusal.helpful", Estimate(0.02, -0.05, 0.09, 48),
                   ("hi", "<=", 0.05))]
  out = {c["key"]: c["failed_signal"] for c in diagnosis.explain(claims, _signals(True))}
  assert out["rl_cai.over_refusal.borderline"]["stage"] == "5 AI labels → 6 PM"
  assert "borderline 1.000" in out["rl_cai.over_refusal.borderline"]["measured"]
  assert "38 of 96" in out["rl_cai.over_refusal.borderline"]["measured"]
  # The small rise (0.02, bar 0.05; more than 4x the prompts to settle) is the PM's too
  # while the PM rewards refusing, and says the n that would settle it.
  helpful = out["rl_cai.over_refusal.helpful"]
  assert helpful["stage"] == "5 AI labels → 6 PM" and "n ≈ 262" in helpful["measured"]
  # A PM that prefers answering does not explain a rise: the small one becomes a
  # question of n; no upstream cause is invented.
  out = {c["key"]: c["failed_signal"] for c in diagnosis.explain(claims, _signals(False))}
  assert out["rl_cai.over_refusal.helpful"] == {
      "stage": "1 prompts (too few held out)",
      "signal": "the estimate passes the bar; its interval does not",
      "measured": "half-width 0.070 at n=48, estimate 0.030 from the bar",
      "would_take": "n ≈ 262 (prompts.num_helpful_held_out)"}
  assert out["rl_cai.over_refusal.borderline"]["stage"] == "none found"


def test_explain_leaves_holding_claims_alone_and_names_the_curve_vs_gain():
  gain = _claim("rl_cai.pm_gain", Estimate(0.04, 0.02, 0.07, 48), ("lo", ">", 0.0))
  curve = _claim("ppo.reward_curve", Estimate(-0.002, -0.02, 0.015, 12), ("lo", ">", 0.0))
  out = diagnosis.explain([gain, curve], _signals(True))
  assert gain["holds"] is True and "failed_signal" not in out[0]
  f = out[1]["failed_signal"]
  assert f["stage"] == "7 RL (the curve, not the gain)" and "0.040 [0.020, 0.070]" in f["measured"]
  assert diagnosis.sentence(out[1]).startswith("stage 7 RL (the curve, not the gain): ")
  # Without the held-out gain, a curve whose per-iteration std exceeds its movement.
  f = diagnosis.explain([curve], _signals(True))[0]["failed_signal"]
  assert f["stage"] == "7 RL" and "std 0.020" in f["measured"]


def test_recompute_refuses_claims_that_differ_from_stage_8s(tmp_path):
  # recompute reruns stage 8's last step; a stored claim that today's code would compute
  # differently is refused, not overwritten.
  wd = str(tmp_path)
  os.makedirs(paths.stage_dir(wd, paths.EVALUATION))
  results = {"measures": {"kinds": {}, "refusal": {}}, "judge": {}, "evaluated_models": []}
  stored = evidence.from_workdir(wd, results)
  with open(paths.results_file(wd), "w") as f:
    json.dump({**results, "claims": stored}, f)
  with open(paths.pipeline_config(wd), "w") as f:
    json.dump({"evaluation": {"seed": 0, "evidence": {}}}, f)
  assert [c["claim"] for c in diagnosis.recompute(wd, stored)] == [c["claim"] for c in stored]
  with open(paths.results_file(wd)) as f:
    assert "signals" in json.load(f)
  os.remove(paths.pipeline_config(wd))  # stage 8 not run by the pipeline: one-line error
  with pytest.raises(ValueError, match="no 'evaluation' entry"):
    diagnosis.recompute(wd, stored)
  with open(paths.pipeline_config(wd), "w") as f:
    json.dump({"evaluation": {"seed": 0, "evidence": {}}}, f)
  bad = [dict(c) for c in stored]
  bad[0]["holds"] = not bad[0]["holds"]
  with pytest.raises(ValueError, match="differs from what stage 8"):
    diagnosis.recompute(wd, bad)
  with pytest.raises(ValueError, match="no longer makes 1 of the claims"):
    diagnosis.recompute(wd, stored + [dict(stored[0], claim="A claim no code makes now")])
  # Written before today's descriptive claims (no verdict; with no answers every claim is
  # one): recomputing adds the one stage 8 did not write.
  assert all(c["holds"] is None for c in stored)
  assert len(diagnosis.recompute(wd, stored[:-1])) == len(stored)


def test_claims_block_states_the_days_decode_rate(tmp_path):
  # The published wall time comes with the day's transformers decode rate, read from the
  # decode result named, never typed; a result without it is refused.
  claims = [_claim("pm.ai_labels", intervals.wilson(19, 28), ("lo", ">", 0.5))]
  decode = os.path.join(os.path.dirname(__file__), "..", "experiments",
                        "2026-12-06-run10-fresh-clone", "decode_cpu.json")
  with open(decode) as f:
    rate = json.load(f)["runs"][0]["hf_tokens_per_s"]
  block = report.claims_block(claims, "x.json", {"sft": 600.0, "ppo": 300.0}, "", decode)
  assert (f"Pipeline wall time 15.0 min (per stage in `pipeline_timings.json`), on a day when"
          f" transformers decoded {rate:.1f} tok/s at batch 8 (`{decode}`).") in block
  assert block.startswith(report.BEGIN) and block.endswith(report.END)
  assert "0 of 1 claims hold, 1 do not" in block
  bad = tmp_path / "decode.json"
  bad.write_text(json.dumps({"runs": [{"batch": 8, "ours_tokens_per_s": 150.0}]}))
  with pytest.raises(ValueError, match="no run with hf_tokens_per_s"):
    report.claims_block(claims, "x.json", {"sft": 1.0}, "", str(bad))
