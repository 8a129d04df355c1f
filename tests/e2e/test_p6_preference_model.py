"""Stage 6 (the preference model) end to end: the comparison mix, learning a synthetic
preference, resume, the binary, LoRA."""

import json
import os
import time

import jax
import numpy as np
import pytest

from cai_jax import paths
from cai_jax.checkpoints import load
from cai_jax.data import comparisons, rollout_prompts
from cai_jax.model.sharding import Sharder, make_mesh
from cai_jax.phases import p6_preference_model as p6
from cai_jax.preference import model as pm
from cai_jax.preference import saved
from cai_jax.preference.scorer import Scorer
from cai_jax.training import checkpoint
from cai_jax.training.metrics import read_metrics

from resume_helpers import assert_same_state, run_phase_binary, sigterm_at, tree_hashes
from test_preference_model import (as_comparisons, marker_records, single_device_sharder,
                                   tiny_config, write_labels)


def test_human_comparisons_mix_and_errors(tmp_path):
  write_labels(str(tmp_path), marker_records(40, seed=3))
  rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(30)]
  jsonl = tmp_path / "helpful.jsonl"
  jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
  csv = tmp_path / "helpful.csv"
  csv.write_text("prompt,chosen,rejected\n" + "".join(
      f"{r['prompt']},{r['chosen']},{r['rejected']}\n" for r in rows))
  c = tiny_config()
  c.data.eval_size = 5
  for path in (jsonl, csv):
    c.data.helpful_comparisons = str(path)
    c.data.helpful_ratio = 0.4
    train, held = p6.load_comparisons(c, str(tmp_path))
    both = train + held
    human = [x for x in both if x.kind == "helpful"]
    assert len(both) == 50 and len(human) == 20  # 30 red-team (AI) : 20 human
    assert all(x.p_a == 1.0 and x.response_a.startswith("good") for x in human)
    assert not any(x.id.startswith("pair-") and x.kind == "helpful" for x in both)
  c.data.helpful_comparisons = ""
  only_red = [x for x in both if x.kind == "red_team"]
  assert comparisons.mix(only_red, [], 0.5, seed=0) == only_red  # nothing to mix: keep all
  assert len(comparisons.mix(only_red, human, 1.0, seed=0)) == len(human)
  c.data.helpful_ratio = None
  train, held = p6.load_comparisons(c, str(tmp_path))
  assert len(train) + len(held) == 40  # every AI label, red-team and helpful
  again = p6.load_comparisons(c, str(tmp_path))
  assert [x.id for x in again[1]] == [x.id for x in held]  # the split is seeded
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
  c.data.helpful_comparisons = str(bad)
  with pytest.raises(ValueError, match="no field .rejected."):
    p6.load_comparisons(c, str(tmp_path))
  with pytest.raises(FileNotFoundError, match="no AI label records"):
    p6.load_comparisons(tiny_config(), str(tmp_path / "empty"))


def test_learns_a_synthetic_preference(tmp_path):
  """Responses holding MARKER are preferred: > 95% held-out accuracy."""
  workdir = str(tmp_path)
  write_labels(workdir, marker_records(576, seed=4))
  # 60 steps at lr 4e-3 (measured: held-out accuracy 1.00, 28 s alone; 120 at 2e-3 took
  # twice as long for the same).
  c = tiny_config(num_steps=60, batch_size=16, eval_batch_size=16, eval_every=60,
                  save_every=60, log_every=20)
  c.data.eval_size = 64
  c.optim.update(lr=4e-3, warmup_steps=10)
  start = time.perf_counter()
  result = p6.run(c, workdir)
  elapsed = time.perf_counter() - start
  print(f"\nmarker PM: held-out accuracy {result.metrics['eval_accuracy']:.3f},"
        f" ECE {result.metrics['eval_ece']:.3f}, loss {result.metrics['eval_loss']:.3f},"
        f" {elapsed:.0f}s")
  assert result.status == "done" and result.step == 60
  assert result.metrics["eval_accuracy"] > 0.95, result.metrics
  first = read_metrics(result.output_dir)[0]
  assert first["step"] == 0 and first["eval_accuracy"] < 0.8  # it was learned, not given
  with open(os.path.join(result.output_dir, "calibration", "step-0000060.json")) as f:
    table = json.load(f)
  assert sum(b["count"] for b in table["bins"]) == 64
  assert table["eval_accuracy"] == result.metrics["eval_accuracy"]

  # PPO's entry point: the trained PM back on another mesh, and its scores.
  mesh = Sharder(make_mesh((1, 8, 1)))
  cfg, params, tok = saved.restore_preference_model(paths.preference_model_dir(workdir, ""),
                                                    mesh)
  assert tree_hashes(params) == tree_hashes(result.state.params)
  assert params["head"]["w"].sharding.mesh.shape["fsdp"] == 8
  recs = marker_records(40, seed=5)[:3]
  rewards = Scorer(cfg, params, tok, max_len=64, batch_size=2, sharder=mesh).score_texts(
      [r.prompt for r in recs], [r.response_a for r in recs])
  batch = comparisons.make_batch(
      comparisons.tokenize_pairs(tok, as_comparisons(recs), 64, "truncate"),
      np.arange(3), 64)
  direct = pm.pair_rewards(result.state.params, batch["tokens"], batch["mask"], cfg, None)
  np.testing.assert_allclose(rewards, np.asarray(direct)[:, 0], rtol=1e-4, atol=1e-5)


def test_resume_refuses_other_data(tmp_path):
  write_labels(str(tmp_path), marker_records(40, seed=6))
  config = tiny_config(num_steps=2, save_every=2, eval_every=100)
  assert p6.run(config, str(tmp_path)).step == 2
  write_labels(str(tmp_path), marker_records(40, seed=7))
  config.train.num_steps = 4
  with pytest.raises(ValueError, match="other data"):
    p6.run(config, str(tmp_path))


@pytest.mark.slow
def test_phase_binary_end_to_end(tmp_path):
  workdir = str(tmp_path / "cai")
  write_labels(workdir, marker_records(24, seed=8))
  run_phase_binary("p6_preference_model",
                   "--config=configs/preference_model.py:tiny", f"--workdir={workdir}",
                   "--config.train.num_steps=4", "--config.train.save_every=2")
  out = paths.stage_dir(workdir, paths.PREFERENCE_MODEL)
  with checkpoint.Checkpointer(os.path.join(out, "checkpoints")) as ckpt:
    assert ckpt.latest_step() == 4 and ckpt.restore_data()["step"] == 4
  lines = read_metrics(out)
  assert [m["step"] for m in lines if "loss" in m] == [1, 2, 3, 4]
  assert {"accuracy", "reward_mean", "reward_std"} <= set(lines[-2]) | set(lines[-1])
  assert [m["step"] for m in lines if "eval_ece" in m] == [0, 4]
  assert sorted(os.listdir(os.path.join(out, "calibration"))) == [
      "step-0000000.json", "step-0000004.json"]
  assert os.listdir(os.path.join(out, "tensorboard"))
  cfg, params, tok = saved.restore_preference_model(paths.preference_model_dir("", workdir),
                                                    single_device_sharder())
  assert cfg.num_layers == 2 and params["head"]["w"].shape == (cfg.dim,)
  assert tok.encode("hi <|im_end|>") == load.byte_tokenizer().encode("hi <|im_end|>")


def test_lora_pm_resumes_bit_identically_and_restores_merged(tmp_path):
  """LoRA PM: adapters and head train on the frozen backbone; SIGTERM resume is bit
  identical; `restore_preference_model` rebuilds the named base, merges the adapters,
  and scores as the training view did."""
  from cai_jax.checkpoints import hf
  from cai_jax.checkpoints import load
  from cai_jax.model import lora
  byte_tok = load.byte_tokenizer()
  cfg0, base0 = load.random_model("tiny_llama", byte_tok, None, jax.random.key(7))
  model_dir = str(tmp_path / "base")
  hf.save_hf(base0, cfg0, model_dir, tokenizer=byte_tok)
  config = tiny_config(num_steps=6, save_every=100, eval_every=3)
  config.model, config.lora.rank, config.lora.alpha = model_dir, 4, 8.0
  config.optim.lr = 1e-2
  for d in ("full", "resumed"):
    write_labels(str(tmp_path / d), marker_records(40, seed=5))
  full = p6.run(config, str(tmp_path / "full"))
  assert set(full.state.params) == {"adapters", "head"}

  kill_at_3 = sigterm_at(3)

  assert p6.run(config, str(tmp_path / "resumed"), should_stop=kill_at_3).step == 3
  resumed = p6.run(config, str(tmp_path / "resumed"))
  assert resumed.status == "done" and resumed.step == 6
  assert_same_state(full.state, resumed.state, ("params", "opt_state"))
  cfg, params, tok = saved.restore_preference_model(
      paths.preference_model_dir(str(tmp_path / "resumed"), ""), single_device_sharder())
  assert set(params) == {"backbone", "head"}
  _, base, _ = load.load_model(model_dir)
  recs = marker_records(40, seed=5)[:4]
  batch = comparisons.make_batch(
      comparisons.tokenize_pairs(tok, as_comparisons(recs), 64, "truncate"), np.arange(4), 64)
  view = lora.scalar_view(resumed.state.params, base, lora.LoraSpec.from_config(config.lora))
  want = pm.pair_rewards(view, batch["tokens"], batch["mask"], cfg, None)
  got = pm.pair_rewards(params, batch["tokens"], batch["mask"], cfg, None)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
  assert float(np.abs(np.asarray(want) - np.asarray(pm.pair_rewards(
      {"backbone": base, "head": resumed.state.params["head"]}, batch["tokens"],
      batch["mask"], cfg, None))).max()) > 1e-4  # the adapters changed the scores


def test_two_pms_by_kind_then_the_gated_reward_resume_bit_identically(tmp_path):
  """pms="by_kind": a harmlessness PM on the red-team comparisons (the stage's own
  directory) and a helpfulness PM on the helpful ones (`helpful/`), each held out on
  its kind only; a run stopped inside the second PM resumes to both PMs of the
  uninterrupted run. Stage 7's `gated` reward reads both, logs each, and a stopped RL
  run resumes bit-identically (its running moments ride in the checkpoint)."""
  import itertools

  import test_p7_ppo
  from cai_jax.data import prompts
  from cai_jax.evaluation import evidence
  from cai_jax.phases import p7_ppo
  c = tiny_config(num_steps=4, save_every=100, eval_every=4)
  c.pms, c.data.eval_size = "by_kind", 12
  for d in ("full", "resumed"):
    write_labels(str(tmp_path / d), marker_records(48, seed=5))
    test_p7_ppo.write_prompts(str(tmp_path / d), n=8)
  full = p6.run(c, str(tmp_path / "full"))
  calls = itertools.count(1)  # 4 steps of the harm PM, then the helpful PM's second
  part = p6.run(c, str(tmp_path / "resumed"), should_stop=lambda step: next(calls) == 6)
  assert part.status == "preempted" and part.step == 2
  assert part.output_dir == paths.pm_out(str(tmp_path / "resumed"), paths.HELPFUL_PM)
  resumed = p6.run(c, str(tmp_path / "resumed"))
  assert resumed.status == "done" and resumed.step == 4
  assert_same_state(full.state, resumed.state)
  sharder = single_device_sharder()
  train_c, held_c = p6.load_comparisons(c, str(tmp_path / "full"))
  for which, kind, other in (("", "red_team", "helpful"),
                             (paths.HELPFUL_PM, "helpful", "red_team")):
    dirs = [paths.pm_out(str(tmp_path / d), which) for d in ("full", "resumed")]
    a, b = (saved.restore_preference_model(d, sharder)[1] for d in dirs)
    assert tree_hashes(a) == tree_hashes(b), which
    cal_dir = paths.calibration_dir(str(tmp_path / "full"), which)
    assert sorted(os.listdir(cal_dir)) == ["step-0000000.json", "step-0000004.json"]
    with open(os.path.join(cal_dir, "step-0000004.json")) as f:
      metrics = json.load(f)
    assert metrics["eval_pairs"] == sum(x.kind == kind for x in held_c) > 0
    assert f"eval_accuracy_{kind}" in metrics and f"eval_accuracy_{other}" not in metrics
  assert paths.preference_model_dir("", str(tmp_path / "full")) == paths.pm_out(
      str(tmp_path / "full"))
  # Stage 8 and the report read each: the diagnosis's signal per PM, and the helpful
  # PM's refusal preference on SL-CAI's answers (here: helpful prompts, hand-written).
  from cai_jax.evaluation import diagnosis
  from cai_jax.evaluation.answers import AnswerRecord
  from cai_jax.configs import evaluation as eval_config
  from cai_jax.evaluation import judges
  signals = diagnosis.measure(str(tmp_path / "full"))
  assert set(signals["pm"]["by_kind"]) == {"red_team"}
  assert set(signals["pm_helpful"]["by_kind"]) == {"helpful"}
  answers = {"sl_cai": {f"h{i}": AnswerRecord(f"h{i}", f"How do I bake bread {i}?", "helpful",
                                              "held_out", "sl_cai", f"Mix flour {i} and bake.")
                        for i in range(3)}}
  tiny_eval = eval_config.get_config("tiny")
  pref = judges.helpful_pm_refusal_preference(tiny_eval, str(tmp_path / "full"), sharder,
                                              answers, ["sl_cai"])
  assert pref["model"] == "sl_cai" and pref["helpful"]["refusal_preferred"]["n"] == 3
  assert "missing" in judges.helpful_pm_refusal_preference(
      tiny_eval, str(tmp_path / "nowhere"), sharder, answers, ["sl_cai"])

  rl = test_p7_ppo.tiny_config(iterations=2)
  rl.reward_model, rl.reward.sources = "", "gated"
  rl.rollout.batch_size = 8
  rl.probe.every, rl.probe.num_prompts = 1, 3  # before training and after each iteration
  held = {}
  for kind in ("red_team", "helpful"):
    held[kind] = [prompts.PromptRecord(id=f"{kind}-held-{i}", prompt=f"held {kind} {i}?",
                                       source="test", kind=kind) for i in range(5)]
    for d in ("full", "resumed"):
      prompts.write_jsonl(held[kind], paths.prompts_file(str(tmp_path / d), kind, "held_out"))
  rl_full = p7_ppo.run(rl, str(tmp_path / "full"))
  assert p7_ppo.run(rl, str(tmp_path / "resumed"), should_stop=lambda it: it == 1).step == 1
  rl_resumed = p7_ppo.run(rl, str(tmp_path / "resumed"))
  assert rl_resumed.status == "done" and rl_resumed.step == 2
  assert_same_state(rl_full.state, rl_resumed.state)
  untimed = lambda m: {k: v for k, v in m.items() if not k.endswith("_s")}
  assert untimed(rl_full.metrics) == untimed(rl_resumed.metrics)
  # The harm PM judged exactly each batch's red-team prompts (write_prompts: rows 0-7
  # of the 16 are red-team).
  logged = read_metrics(rl_full.output_dir)
  shares = [m["reward/gated/harm_share"] for m in logged if "reward/gated/harm_share" in m]
  want = [np.mean(rollout_prompts.prompt_rows(16, 8, rl.seed, it) < 8) for it in range(2)]
  assert shares == pytest.approx(want)
  assert all("reward/gated/helpful_pm" in m for m in logged if "reward" in m)
  # The probe: the first 3 held-out prompts of each kind at iterations 0, 1, 2, the same
  # prompts each time; the resumed run's rows (its rerun after the checkpoint deduped)
  # are the uninterrupted run's; the probe's answers touch no running moment (each PM's
  # count is the 16 rollouts of the 2 iterations).
  rows = evidence.read_probe(paths.probe_file(str(tmp_path / "full"), paths.PPO))
  want_prompts = [r.prompt for kind in ("red_team", "helpful") for r in held[kind][:3]]
  assert [r["iteration"] for r in rows] == [0, 1, 2]
  assert all(r["prompts"] == want_prompts and len(r["scores"]) == 6 for r in rows)
  assert rows == evidence.read_probe(paths.probe_file(str(tmp_path / "resumed"), paths.PPO))
  assert [m["probe/reward"] for m in logged if "probe/reward" in m] == pytest.approx(
      [np.mean(r["scores"]) for r in rows[1:]])
  with checkpoint.Checkpointer(os.path.join(rl_full.output_dir, "checkpoints")) as ckpt:
    norm = ckpt.restore_data()["reward_norm"]
  assert norm["gated/harm"]["count"] == norm["gated/helpful"]["count"] == 16
