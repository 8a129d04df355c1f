"""Stage 6, the preference model: the Bradley-Terry loss against its closed form,
calibration, pair batching, learning a synthetic preference, exact resume,
restore + score for PPO, and the phase binary end to end."""

import dataclasses
import functools
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax import paths, records
from cai_jax.checkpoints import load
from cai_jax.model import config as model_config
from cai_jax.model import heads, transformer
from cai_jax.model.sharding import Sharder, make_mesh
from cai_jax import distributed
from cai_jax.data import comparisons
from cai_jax.phases import p6_preference_model as p6
from cai_jax.preference import calibration, saved
from cai_jax.preference import model as pm
from cai_jax.preference.scorer import Scorer
from cai_jax.rl.reward import pm_ids_reward_fn, pm_reward_fn, shares_tokenizer
from cai_jax.text.chat import generation_ids, user_turn
from cai_jax.training import checkpoint, losses, optim
from cai_jax.training.metrics import read_metrics
from cai_jax.configs import preference_model as pm_config
from resume_helpers import assert_same_state, sigterm_at, tree_hashes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = "@"


def label_record(i: int, prompt: str, a: str, b: str, p_a: float, kind: str
                 ) -> records.LabelRecord:
  return records.LabelRecord(
      id=f"pair-{i}", prompt=prompt, kind=kind, response_a=a, response_b=b,
      mode="multiple_choice", models=("feedback",), principle_ids=("harm",),
      logprobs=((((-0.1, -2.3),),),), cot=(), model_p_a=(p_a,), p_a=p_a)


def marker_records(n: int, seed: int) -> list[records.LabelRecord]:
  """Random-text pairs where the response holding MARKER is preferred.

  The marked response is a or b at random, at a random position; its label
  is hard (1 / 0) or soft (0.9 / 0.1).
  """
  rng = np.random.default_rng(seed)
  letters = list("abcdefghijklmnop ")
  out = []
  for i in range(n):
    a, b = ("".join(rng.choice(letters, rng.integers(8, 20))) for _ in range(2))
    at = int(rng.integers(0, len(a) + 1))
    marked = a[:at] + MARKER + a[at:]
    strength = 1.0 if rng.random() < 0.5 else 0.9
    prompt = "".join(rng.choice(letters, 6))
    kind = "red_team" if i % 4 else "helpful"
    if rng.random() < 0.5:
      out.append(label_record(i, prompt, marked, b, strength, kind))
    else:
      out.append(label_record(i, prompt, b, marked, 1.0 - strength, kind))
  return out


def as_comparisons(recs) -> list[comparisons.Comparison]:
  return [comparisons.Comparison(r.id, r.kind, r.prompt, r.response_a, r.response_b, r.p_a)
          for r in recs]


def tiny_config(**train):
  c = pm_config.get_config("tiny")
  c.data.seq_len = 64
  c.data.length_buckets = ()  # one shape: one compilation
  c.train.update(train)
  return c


def write_labels(workdir: str, recs) -> None:
  records.write_shard(os.path.join(workdir, "p5_ai_labels"), 0, recs)


def single_device_sharder() -> Sharder:
  return Sharder(make_mesh((1, 1, 1), jax.devices()[:1]))


@pytest.fixture(scope="module")
def tok():
  return load.byte_tokenizer()


# --- The Bradley-Terry loss -------------------------------------------------------------------


def test_bradley_terry_matches_closed_form_and_gradient():
  rng = np.random.default_rng(0)
  r_a, r_b = rng.normal(size=(2, 64)).astype(np.float32) * 3
  p = rng.uniform(size=64).astype(np.float32)
  total, count = losses.bradley_terry_loss(r_a, r_b, p)
  sig = lambda x: 1 / (1 + np.exp(-x.astype(np.float64)))
  d = r_a - r_b
  expect = -(p * np.log(sig(d)) + (1 - p) * np.log(sig(-d)))
  np.testing.assert_allclose(total, expect.sum(), rtol=1e-5)
  assert count == 64
  grad_a, grad_b = jax.grad(lambda a, b: losses.bradley_terry_loss(a, b, p)[0],
                            argnums=(0, 1))(r_a, r_b)
  np.testing.assert_allclose(grad_a, sig(d) - p, rtol=1e-5, atol=1e-6)  # sigma(d) - p
  np.testing.assert_allclose(grad_b, -(sig(d) - p), rtol=1e-5, atol=1e-6)
  # The same derivative by central differences (float64 reference).
  f = lambda a: np.sum(p * np.logaddexp(0, -(a - r_b)) + (1 - p) * np.logaddexp(0, a - r_b))
  eps = 1e-4
  e0 = np.zeros(64)
  e0[0] = eps
  fd = (f(r_a.astype(np.float64) + e0) - f(r_a.astype(np.float64) - e0)) / (2 * eps)
  np.testing.assert_allclose(grad_a[0], fd, rtol=1e-3)


def test_bradley_terry_mask_extremes_and_optimum():
  r_a = jnp.asarray([200.0, -200.0, 1.0, 5.0])
  r_b = jnp.asarray([-200.0, 200.0, 0.0, jnp.nan])
  p = jnp.asarray([0.0, 1.0, 0.7, 0.5])
  mask = jnp.asarray([True, True, True, False])
  fn = lambda a: losses.bradley_terry_loss(a, r_b, p, mask)[0]
  total, count = losses.bradley_terry_loss(r_a, r_b, p, mask)
  assert count == 3 and np.isfinite(total)
  np.testing.assert_allclose(total, 400 + 400 + 0.7 * np.log1p(np.exp(-1)) +
                             0.3 * np.log1p(np.exp(1)), rtol=1e-5)
  g = jax.grad(fn)(r_a)
  assert np.all(np.isfinite(g)) and g[3] == 0.0  # the masked NaN pair leaks nothing
  # Soft label p: the gradient vanishes exactly at sigma(d) = p.
  for label in (0.1, 0.5, 0.9):
    d_star = np.log(label / (1 - label))
    g = jax.grad(lambda a: losses.bradley_terry_loss(a, jnp.zeros(1), jnp.full(1, label))[0])(
        jnp.full(1, d_star, jnp.float32))
    assert abs(float(g[0])) < 1e-6


def test_half_label_is_symmetric():
  rng = np.random.default_rng(1)
  r_a, r_b = rng.normal(size=(2, 32)).astype(np.float32)
  half = np.full(32, 0.5, np.float32)
  ab = losses.bradley_terry_loss(r_a, r_b, half)[0]
  ba = losses.bradley_terry_loss(r_b, r_a, half)[0]
  np.testing.assert_allclose(ab, ba, rtol=1e-6)
  # ...and swapping a/b with p -> 1 - p is the same comparison for any p.
  p = rng.uniform(size=32).astype(np.float32)
  np.testing.assert_allclose(losses.bradley_terry_loss(r_a, r_b, p)[0],
                             losses.bradley_terry_loss(r_b, r_a, 1 - p)[0], rtol=1e-5)
  # p = 0.5 penalises confidence either way: minimum at r_a = r_b.
  assert float(losses.bradley_terry_loss(r_a, r_a, half)[0]) < float(ab)


# --- Calibration --------------------------------------------------------------------------------


def test_ece_of_calibrated_predictions_is_near_zero():
  rng = np.random.default_rng(0)
  q = rng.uniform(size=200_000)
  ece, table = calibration.calibration(q, q, 10)  # soft labels equal to the prediction
  assert ece < 1e-9
  assert sum(row["count"] for row in table) == len(q)
  outcomes = (rng.uniform(size=q.size) < q).astype(np.float64)  # right q of the time
  ece, table = calibration.calibration(q, outcomes, 10)
  assert ece < 0.01
  for row in table:
    assert abs(row["mean_pred"] - row["mean_label"]) < 0.02
  # Overconfident: says 0.95 where it is right 60% of the time.
  over = np.full(10_000, 0.95)
  ece, _ = calibration.calibration(over, (rng.uniform(size=10_000) < 0.6).astype(float), 10)
  assert abs(ece - 0.35) < 0.02


# --- Pairs in batches -----------------------------------------------------------------------------


def test_pairs_render_and_batch(tok):
  recs = marker_records(5, seed=0)
  comps = as_comparisons(recs)
  data = comparisons.tokenize_pairs(tok, comps, 64, "truncate")
  batch = comparisons.make_batch(data, np.asarray([3, -1, 0]), 64)
  assert batch["tokens"].shape == (3, 2, 64) and batch["p_a"].tolist()[1] == 0.5
  assert not batch["mask"][1].any() and not batch["valid"][1]
  end = tok.token_id("<|im_end|>")
  for row, i in ((0, 3), (2, 0)):
    for j, response in enumerate((comps[i].response_a, comps[i].response_b)):
      ids = batch["tokens"][row, j][batch["mask"][row, j]]
      assert ids[-1] == end  # the score's token ends the assistant turn
      assert response in tok.decode(ids)
    assert batch["p_a"][row] == comps[i].p_a
  # Too long: the start goes, the end-of-turn token stays.
  long = comparisons.Comparison("x", "helpful", "q" * 200, "answer A", "answer B", 1.0)
  cut = comparisons.tokenize_pairs(tok, [long], 32, "truncate")
  assert cut.lengths_E2.tolist() == [[32, 32]] and cut.tokens_E2T[0, 0, -1] == end
  assert tok.decode(cut.tokens_E2T[0, 0]).endswith("answer A")
  with pytest.raises(ValueError, match="more than data.seq_len"):
    comparisons.tokenize_pairs(tok, [long], 32, "error")


def test_microbatches_and_sharding_keep_pairs_together(tok):
  sharder = single_device_sharder()
  comps = as_comparisons(marker_records(8, seed=2))
  batch = comparisons.make_batch(comparisons.tokenize_pairs(tok, comps, 64, "truncate"),
                                 np.arange(8), 64)
  cfg, backbone = load.random_model("tiny_llama", tok, sharder, jax.random.key(0))
  params = {"backbone": backbone, "head": heads.init_head(cfg, jax.random.key(1))}
  params["head"]["w"] = params["head"]["w"] * 100  # rewards far from 0: differences show
  loss_fn = functools.partial(pm.pm_loss_fn, cfg=cfg, sharder=None)
  acc = jax.jit(optim.accumulate_gradients, static_argnums=(0, 3))
  g1, s1 = acc(loss_fn, params, batch, 1)
  g4, s4 = acc(loss_fn, params, batch, 4)
  np.testing.assert_allclose(s4["loss_sum"], s1["loss_sum"], rtol=1e-5)
  assert s4["pairs"] == s1["pairs"] == 8
  for a, b in zip(jax.tree.leaves(g4), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # Each pair's two rewards are the rewards of its two conversations alone.
  r_B2 = pm.pair_rewards(params, batch["tokens"], batch["mask"], cfg, None)
  alone = Scorer(cfg, params, tok, max_len=64, batch_size=2).score_texts(
      [comps[5].prompt] * 2, [comps[5].response_a, comps[5].response_b])
  np.testing.assert_allclose(r_B2[5], alone, rtol=1e-4, atol=1e-5)
  # On an 8-device mesh (pairs over data x fsdp) the rewards are the same.
  mesh = Sharder(make_mesh((2, 2, 2)))
  placed = jax.device_put(params, heads.scalar_model_shardings(cfg, mesh))
  sharded = jax.jit(functools.partial(pm.eval_step, cfg=cfg, sharder=mesh))(
      placed, distributed.batch_to_global(batch, comparisons.batch_shardings(mesh)))
  np.testing.assert_allclose(sharded, r_B2, rtol=1e-4, atol=1e-5)


# --- Data mix ---------------------------------------------------------------------------------


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


# --- Training ------------------------------------------------------------------------------------


def test_learns_a_synthetic_preference(tmp_path):
  """Responses holding MARKER are preferred: > 95% held-out accuracy."""
  workdir = str(tmp_path)
  write_labels(workdir, marker_records(576, seed=4))
  c = tiny_config(num_steps=120, batch_size=16, eval_batch_size=16, eval_every=120,
                  save_every=120, log_every=40)
  c.data.eval_size = 64
  c.optim.update(lr=2e-3, warmup_steps=10)
  start = time.perf_counter()
  result = p6.run(c, workdir)
  elapsed = time.perf_counter() - start
  print(f"\nmarker PM: held-out accuracy {result.metrics['eval_accuracy']:.3f},"
        f" ECE {result.metrics['eval_ece']:.3f}, loss {result.metrics['eval_loss']:.3f},"
        f" {elapsed:.0f}s")
  assert result.status == "done" and result.step == 120
  assert result.metrics["eval_accuracy"] > 0.95, result.metrics
  first = read_metrics(result.output_dir)[0]
  assert first["step"] == 0 and first["eval_accuracy"] < 0.8  # it was learned, not given
  with open(os.path.join(result.output_dir, "calibration", "step-0000120.json")) as f:
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


# --- The phase binary ----------------------------------------------------------------------------


@pytest.mark.slow
def test_phase_binary_end_to_end(tmp_path):
  workdir = str(tmp_path / "cai")
  write_labels(workdir, marker_records(24, seed=8))
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
  cmd = [sys.executable, "-m", "cai_jax.phases.p6_preference_model",
         "--config=configs/preference_model.py:tiny", f"--workdir={workdir}",
         "--config.train.num_steps=4", "--config.train.save_every=2"]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "status='done'" in proc.stdout
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


# --- The one scorer ------------------------------------------------------------


@pytest.mark.parametrize("mesh_shape,batch_size", [(None, None), (None, 3), ((2, 2, 2), None),
                                                   ((1, 8, 1), 5)], ids=str)
def test_ppo_reward_equals_the_pm_training_forward(tok, mesh_shape, batch_size):
  """The score PPO's reward gives a rollout (decode, re-render, one scorer) equals the
  PM-training forward (`pair_rewards` on a right-padded [B, 2, T] batch) on the same
  conversation, whatever the scorer's padding, batch size or mesh."""
  cfg = model_config.tiny_llama(vocab_size=tok.vocab_size, max_seq_len=256)
  params = {"backbone": transformer.init_params(cfg, jax.random.key(3)),
            "head": heads.init_head(cfg, jax.random.key(4))}
  params["head"]["w"] = params["head"]["w"] * 100.0  # scores far from 0: a mix-up shows
  comps = [dataclasses.replace(c, response_a=c.response_a.strip(),
                               response_b=c.response_b.strip())  # decoded rollouts are stripped
           for c in as_comparisons(marker_records(7, seed=9))]
  data = comparisons.tokenize_pairs(tok, comps, 96, "truncate")
  batch = comparisons.make_batch(data, np.arange(len(comps)), 96)  # every row padded to 96
  train_B2 = np.asarray(pm.pair_rewards(params, batch["tokens"], batch["mask"], cfg, None))

  sharder = None if mesh_shape is None else Sharder(make_mesh(mesh_shape))
  placed = params if sharder is None else jax.device_put(
      params, heads.scalar_model_shardings(cfg, sharder))
  scorer = Scorer(cfg, placed, tok, max_len=96, sharder=sharder, batch_size=batch_size)
  reward_fn = pm_reward_fn(scorer, tok)
  for j, response in ((0, "response_a"), (1, "response_b")):
    # What the policy samples: the response's tokens, then the end-of-turn token.
    rows = [tok.encode(getattr(c, response), add_bos=False) + [tok.token_id("<|im_end|>")]
            for c in comps]
    M = max(len(r) for r in rows) + 3  # rollouts are right-padded to max_new_tokens
    tokens_BM = np.full((len(rows), M), tok.pad_id, np.int32)
    for i, r in enumerate(rows):
      tokens_BM[i, :len(r)] = r
    lengths_B = np.asarray([len(r) for r in rows])
    rewards = reward_fn([c.prompt for c in comps], tokens_BM, lengths_B)
    np.testing.assert_allclose(rewards, train_B2[:, j], rtol=1e-5, atol=1e-5)
    # The device-side path (issue 13): the sampled ids after the prompt's ids, no
    # text round trip; equal on the same rollouts, and for rollouts cut before
    # their end-of-turn token (both paths append one).
    assert shares_tokenizer(tok, tok)
    prompts = [c.prompt for c in comps]
    ids_fn = pm_ids_reward_fn(scorer, {p: generation_ids(tok, user_turn(p)) for p in prompts})
    np.testing.assert_allclose(ids_fn(prompts, tokens_BM, lengths_B), train_B2[:, j],
                               rtol=1e-5, atol=1e-5)
    # (Where the cut leaves trailing whitespace the text path strips it and scores
    # other ids: the ids path scores exactly what was sampled; those rows are left out.)
    cut_B = lengths_B - 2
    same = np.array([tok.decode(t[:n]) == tok.decode(t[:n]).strip()
                     for t, n in zip(tokens_BM, cut_B)])
    assert same.sum() >= 4
    np.testing.assert_allclose(ids_fn(prompts, tokens_BM, cut_B)[same],
                               reward_fn(prompts, tokens_BM, cut_B)[same], rtol=1e-5, atol=1e-5)


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
